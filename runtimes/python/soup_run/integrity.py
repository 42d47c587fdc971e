"""Verify a specialist against its manifest before loading it (SHA-256 and size of every file).

The manifest (`manifest.json`, written by `soup-export`) sits in the export directory, one level
above `onnx/`; its `files` table maps relative paths to {sha256, bytes}. Every file of the model
directory that the table lists is checked; a file listed but missing, shorter or different is an
error, as is a model directory without a manifest (unless verification is turned off).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from soup_run.contract import MANIFEST
from soup_run.errors import RunError


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_manifest(model_dir: Path) -> tuple[Path, str] | None:
    """(manifest path, prefix of the model dir's files in its table), or None."""
    for root, prefix in ((model_dir, ""), (model_dir.parent, model_dir.name + "/")):
        if (root / MANIFEST).is_file():
            return root / MANIFEST, prefix
    return None


def verify(model_dir: Path) -> int:
    """Check every file of `model_dir` listed in the manifest; returns how many were checked."""
    found = find_manifest(model_dir)
    if found is None:
        raise RunError(f"no {MANIFEST} in {model_dir} or its parent, so the model cannot be verified; "
                       "pass the directory written by `soup-export build`, or --no-verify to run it unverified")
    path, prefix = found
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as exc:
        raise RunError(f"{path} is not a soup-export manifest ({exc}); rebuild the export") from None
    listed = {rel[len(prefix):]: entry for rel, entry in files.items() if rel.startswith(prefix)}
    if not listed:
        raise RunError(f"{path} lists no file of {model_dir.name}/; pass the export directory itself")
    for rel, entry in sorted(listed.items()):
        target = model_dir / rel
        if not target.is_file():
            raise RunError(f"{target} is missing (the manifest lists it); the model is incomplete: copy it again")
        if target.stat().st_size != entry["bytes"]:
            raise RunError(f"{target} has {target.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                           "the file is truncated or was modified; copy the model again")
        if sha256(target) != entry["sha256"]:
            raise RunError(f"{target} does not match its SHA-256 in the manifest: the model was modified or "
                           "corrupted; copy it again (or pass --no-verify if you changed it on purpose)")
    return len(listed)
