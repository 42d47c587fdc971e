"""`soup-train release`: what the export servers need from a run, and nothing else.

A release directory is a checkpoint without its training state: config.json (the run, the
domains, the step it was released from), model.safetensors (the soup's weights, fp32 or bf16),
checksums.json (their SHA-256, size and modification time, recorded while they were written, so
that export never reads the bank again to hash it), tokenizer.json and domains/ (Algorithm 3's
embedder and centroids). The optimizer's moments (twice the weights in fp32) stay behind.
`soup-export` takes a release directory wherever it takes a checkpoint.

The weights are read through a shared read-only map and written tensor by tensor: memory holds
one tensor (converted, for bf16), never the soup. The directory is staged beside its target and
renamed into place only once complete; a replaced release is kept until then.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from soup_train.checkpoint import (FORMAT, TOKENIZER, WEIGHTS, read_info, record_checksum, resolve_checkpoint, step_dir,
                                   stream_tensors)
from soup_train.data.domains import DOMAINS_DIR as DOMAINS
from soup_train.errors import CheckpointError
from soup_train.model.soup_math import COEF_PREFIX
from soup_train.safetensors_map import MappedSafetensors
from soup_train.staging import staged

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def release(run: Path, out: Path, step: int | None = None, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the release of `run`'s checkpoint (its latest, or `step`) into `out`; returns `out`."""
    ckpt = _checkpoint(Path(run), step)
    info = read_info(ckpt)
    target = _target(Path(out), ckpt, force)
    with staged(target) as tmp:
        config = {**info.to_dict(), "release": {"checkpoint": ckpt.name, "dtype": dtype}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copy2(ckpt / TOKENIZER, tmp / TOKENIZER)
        if (ckpt / DOMAINS).is_dir():
            shutil.copytree(ckpt / DOMAINS, tmp / DOMAINS)
        copy_weights(ckpt / WEIGHTS, tmp / WEIGHTS, DTYPES[dtype])
    return target


def copy_weights(src: Path, dest: Path, dtype: torch.dtype) -> str:
    """`src`'s tensors into `dest` one at a time, floating-point ones in `dtype` (the coefficient MLP
    stays fp32: it is small, and alpha is computed from it for every customer); the SHA-256 is
    recorded beside `dest`. Returns it."""
    mapped = MappedSafetensors(src)

    def stored(name: str) -> torch.dtype:
        t_dtype = mapped[name].dtype
        return dtype if t_dtype.is_floating_point and not name.startswith(COEF_PREFIX) else t_dtype

    specs = [(name, stored(name), tuple(mapped.header[name]["shape"])) for name in mapped.header]
    digest = stream_tensors(dest, specs, ((name, mapped[name].to(want)) for name, want, _ in specs),
                            {"format": FORMAT}, hashed=True)
    record_checksum(dest, digest)
    return digest


def _checkpoint(run: Path, step: int | None) -> Path:
    if step is None:
        return resolve_checkpoint(run)
    ckpt = step_dir(run, step)
    if not (ckpt / "config.json").is_file():
        kept = sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
        raise CheckpointError(f"{run} has no checkpoint of step {step}"
                              + (f"; it keeps {', '.join(kept)}" if kept else "; pass a run directory"))
    return ckpt


def _target(out: Path, ckpt: Path, force: bool) -> Path:
    target = out.resolve()
    if target == ckpt.resolve() or ckpt.resolve() in target.parents or target in ckpt.resolve().parents:
        raise CheckpointError(f"--out {out} is the checkpoint or inside it; choose a directory outside the run")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--out {out} exists and is a file; choose a directory name")
    if target.exists() and not force:
        raise CheckpointError(f"{out} already exists; pass --force to replace it or choose another --out")
    if target.exists() and any(target.iterdir()) and not _is_release(target):
        raise CheckpointError(f"{out} is not a release (no config.json naming one); --force replaces only a release: "
                              "choose another --out")
    return target


def _is_release(path: Path) -> bool:
    try:
        return "release" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
