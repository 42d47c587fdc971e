"""Logging for the command-line tools: one format, rank 0 speaks, noisy libraries quieted."""
from __future__ import annotations

import logging
import os


def setup_logging(verbose: bool) -> None:
    """INFO on rank 0 (WARNING on the others), DEBUG with `verbose`; plain messages unless verbose."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    for noisy in ("httpx", "datasets", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
