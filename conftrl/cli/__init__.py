"""What the command-line entry points share: a user's mistake ends as one line, not a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf.errors import MissingMandatoryValue


@contextmanager
def mistakes_reported(command: str, *mistakes: type[BaseException]) -> Iterator[None]:
    """Exit with status 1 and `<command>: <message>` on stderr when one of `mistakes`, or a
    required key left unset (`???`), is raised inside; any other exception keeps its traceback
    (it is a bug, not a mistake)."""
    try:
        yield
    except MissingMandatoryValue as error:
        raise SystemExit(f"{command}: {error.full_key} is required ({error.full_key}=...; --help lists the keys)") from None
    except mistakes as error:
        raise SystemExit(f"{command}: {error}") from None
