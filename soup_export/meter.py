"""Public metering hooks of an export: the CPU time of its per-customer file work by part.

The fast executor marks its parts (`section("hashing")`, ...); they cost one global read when no
meter is installed. `tools/bench_export.py` installs one with `metering()` to report where a batch's
per-customer time goes, without reaching into private functions.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

PARTS = ("hashing", "data-file writes", "other files", "manifest")


class Meter:
    """Thread CPU seconds and bytes per part, from every thread of the pass."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, part: str, seconds: float, nbytes: int) -> None:
        with self.lock:
            self.seconds[part] += seconds
            self.bytes[part] += nbytes


_meter: Meter | None = None


@contextlib.contextmanager
def metering():
    """Install a Meter for the duration of the block and yield it."""
    global _meter
    saved, _meter = _meter, Meter()
    try:
        yield _meter
    finally:
        _meter = saved


@contextlib.contextmanager
def section(part: str, nbytes: int = 0):
    """Count the block's thread CPU time (and `nbytes`) to `part`, if a meter is installed. A
    section inside another section of the same thread counts to both."""
    meter = _meter
    if meter is None:
        yield
        return
    start = time.thread_time()
    try:
        yield
    finally:
        meter.add(part, time.thread_time() - start, nbytes)
