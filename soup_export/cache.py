"""soup's user cache and file hashing (importable without torch or onnx).

Caches live in $XDG_CACHE_HOME/soup/<name> (~/.cache/soup when unset): a bank's SHA-256 keyed by
its path, size and mtime (`sha256/`), transformers' config files keyed by their inputs
(`hf-configs/`), and the compiled int4 kernel with its read calibration (`native/`). Every entry
is written to a temporary name and renamed; an unwritable cache is skipped, an unreadable entry
made again. Deleting the directory is always safe.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read through one small reused buffer (hashlib.file_digest)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def cached_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, cached in ~/.cache/soup/sha256 keyed by its absolute path,
    size and mtime_ns: checkpoints are written once, and hashing a large bank on every export
    would cost more than the export itself. The checkpoint directory is never written to."""
    stat = path.stat()
    cache = user_cache("sha256") / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    def make() -> str:
        log.info("hashing %s (no SHA-256 recorded for it as it is now); the digest is cached for later exports", path)
        return file_sha256(path)

    return cached_json(cache, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, make,
                       lambda digest: isinstance(digest, str) and len(digest) == 64)


def cached_json(cache: Path, key: dict, make: Callable[[], T], valid: Callable[[object], bool] = lambda value: True) -> T:
    """The JSON value saved in `cache` for this `key` (JSON types only), or `make()`, saved there for
    next time (written to a temporary name and renamed; an unwritable cache is skipped, and an
    unreadable or invalid entry is made again)."""
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key and valid(saved["value"]):
            return saved["value"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable
        pass
    value = make()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}) + "\n")
        tmp.replace(cache)
    except OSError:  # no writable cache: made every time
        pass
    return value


def user_cache(name: str) -> Path:
    """soup's cache directory `name`: $XDG_CACHE_HOME/soup/name (~/.cache when unset or empty; the
    system's temporary directory when there is no home either)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory (some containers)
            base = str(Path(tempfile.gettempdir()) / f"soup-cache-{os.getuid() if hasattr(os, 'getuid') else 0}")
    return Path(base) / "soup" / name
