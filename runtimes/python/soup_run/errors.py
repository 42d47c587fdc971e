"""The one user-facing error, and reading a user's text file through it.

The CLI prints a RunError's message on one line and exits 2, never a traceback; the message names
what is wrong and what to do.
"""
from __future__ import annotations

from pathlib import Path


class RunError(Exception):
    """A model directory, prompt file or option is not what the runner needs; the message says what to do."""


def read_text(path: Path, name: str, hint: str) -> str:
    """The UTF-8 text of a user's file; a RunError naming it (as `name`) if it is missing, unreadable or
    not UTF-8. `hint` says what to pass instead of something that is not a file."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{name} is not a file; {hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunError(f"{name} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                       "save it as UTF-8") from None
    except OSError as exc:
        raise RunError(f"{name} cannot be read ({exc.strerror or exc}); check that you may read it") from None
