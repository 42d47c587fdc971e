"""SIGTERM for the export commands: a request to stop, honoured before any output is committed.

The handler raises `Stopped` (a SystemExit) in the main thread wherever it interrupts it, so that an
export's staged output is removed and a replaced one kept, as on any other failure. Raised at an
arbitrary point, though, the exception can be swallowed: measured, a third of the SIGTERMs sent
while `soup-export build` prepared its parity data arrived inside the lazy import of numpy.random
(a compiled module's initialisation), lost their exception there, and the export ran to the end
with exit status 0. So the request is also recorded, and `check()` raises it again at the points
that must not be passed once a stop was asked for: before a staged output replaces its target,
and between the tensors of the bank pass and the customers of an export (so a long batch stops
within one step). Outside the CLI (the library API) no handler is installed and `check()` does nothing.
"""
from __future__ import annotations

import signal

_requested: int | None = None  # the signal received, once one was


class Stopped(SystemExit):
    """SIGTERM, raised in the main thread: the export's own clean-up runs as on any failure."""


def install() -> None:
    """Handle SIGTERM as a request to stop (the main thread only, as for any Python signal handler)."""
    signal.signal(signal.SIGTERM, _stop)


def _stop(signum, frame) -> None:
    global _requested
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    _requested = signum
    raise Stopped(128 + signum)


def check() -> None:
    """Raise `Stopped` if a stop was asked for (its first exception may have been lost where it was raised)."""
    if _requested is not None:
        raise Stopped(128 + _requested)
