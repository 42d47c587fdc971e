"""All-or-nothing directories: built under a temporary name beside their target and renamed into
place only when complete; a directory being replaced is kept until the new one is in place."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(target: Path, before_commit: Callable[[], None] | None = None):
    """Yield a fresh temporary directory beside `target`; if the body succeeds (and
    `before_commit()` raises nothing), move any old `target` aside, rename the new one in, then
    delete the old one. On any failure, or a stop between the two renames, the old one stays."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():  # a kill between the two renames of an earlier run: put it back
        old.rename(target)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if before_commit is not None:
            before_commit()
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        if old.exists() and not target.exists():  # stopped between the two renames: the old one back
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
