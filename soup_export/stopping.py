"""SIGTERM for the export commands: a request to stop, honoured before any output is committed.

The handler raises `Stopped` (a SystemExit) in the main thread wherever it interrupts it, so that an
export's staged output is removed and a replaced one kept, as on any other failure. Raised at an
arbitrary point, though, the exception can be swallowed: measured, a third of the SIGTERMs sent
while `soup-export build` prepared its parity data arrived inside the lazy import of numpy.random
(a compiled module's initialisation), lost their exception there, and the export ran to the end
with exit status 0. So the request is also recorded, and `check()` raises it again at the points
that must not be passed once a stop was asked for: before a staged output replaces its target,
and between the tensors of the bank pass and the customers of an export (so a long batch stops
within one step). A command that finishes with a stop asked for exits 143 all the same. Outside
the CLI (the library API) no handler is installed and `check()` does nothing.
"""
from __future__ import annotations

import contextlib
import signal

_requested: int | None = None  # the signal received while `sigterm_stops` was in force, if one was


class Stopped(SystemExit):
    """SIGTERM, raised in the main thread: the export's own clean-up runs as on any failure."""


@contextlib.contextmanager
def sigterm_stops():
    """SIGTERM as a request to stop for the body (the main thread only, as for any Python signal
    handler); the previous handler and a clear request afterwards, so a later export in the same
    process is not stopped by an old signal. A stop whose exception was lost in the body is raised
    when it ends."""
    global _requested
    previous, _requested = signal.signal(signal.SIGTERM, _stop), None
    try:
        yield
        check()
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested = None


def _stop(signum, frame) -> None:
    global _requested
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    _requested = signum
    raise Stopped(128 + signum)


def check() -> None:
    """Raise `Stopped` if a stop was asked for (its first exception may have been lost where it was raised)."""
    if _requested is not None:
        raise Stopped(128 + _requested)


def requested() -> bool:
    """Whether a stop was asked for (and not yet cleared by the end of `sigterm_stops`)."""
    return _requested is not None
