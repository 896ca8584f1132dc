"""What the command-line entry points share: a user's mistake ends as one line, not a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def mistakes_reported(command: str, *mistakes: type[BaseException]) -> Iterator[None]:
    """Exit with status 1 and `<command>: <message>` on stderr when one of `mistakes` is raised
    inside; any other exception keeps its traceback (it is a bug, not a mistake)."""
    try:
        yield
    except mistakes as error:
        raise SystemExit(f"{command}: {error}") from None
