"""The one user-facing error: the CLI prints its message and exits 2, never a traceback."""
from __future__ import annotations


class RunError(Exception):
    """A model directory, prompt file or option is not what the runner needs; the message says what to do."""
