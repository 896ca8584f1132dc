"""The commands the Markdown docs show, read from the files themselves.

A command is a line of a fenced code block (with its backslash continuations joined and its
trailing `# comment` removed), or an inline code span, that starts with a program a user
runs. Each is run from a fresh working directory by tests/docs/test_documented_commands.py,
with only the "quick" suffix docs/training.md documents appended, and with the paths a user
would have (a model, a data folder, a run's time stamp) replaced by small stand-ins.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("python", "make", "wandb", "torchrun", "srun", "sbatch")

_FENCE = re.compile(r"^\s*```")
_INLINE = re.compile(r"`((?:python|make|torchrun|srun|sbatch|wandb) [^`]+)`")


@dataclass(frozen=True)
class Command:
    document: str  # path relative to the repository
    line: int
    text: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def documented_commands(documents: list[Path] = DOCUMENTS) -> list[Command]:
    """Every command of `documents`, in the order a reader meets them, without repeats."""
    commands, seen = [], set()
    for path in documents:
        for line, text in _commands_of(path.read_text()):
            if text not in seen:
                seen.add(text)
                commands.append(Command(str(path.relative_to(REPO)), line, text))
    return commands


def _commands_of(markdown: str) -> list[tuple[int, str]]:
    found, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if _FENCE.match(line):
            in_block = not in_block
            continue
        if in_block:
            if not pending:
                start = number
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            text = _without_comment(pending).strip()
            pending = ""
            if text.split(" ", 1)[0] in PROGRAMS:
                found.append((start, " ".join(text.split())))
        else:
            found += [(number, match) for match in _INLINE.findall(line)]
    return found


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: leave the line to fail loudly when run
        return line
    return shlex.join(words) if words else ""
