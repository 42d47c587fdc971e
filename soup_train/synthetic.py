"""Synthetic soup checkpoints of any shapes, written tensor by tensor.

Benchmarks and tests of export at the scale users train (the `paper-110m` preset: a 28.6 GB bank
at 64 experts in fp32) need a checkpoint of those shapes without training one and without ever
holding it: every tensor is written in pieces (one expert at a time), from one block of random
values reused at random offsets, so writing runs at the disk's speed. The weights look like a
freshly initialised soup (shared matrices N(0, init_std^2), norms 1, experts N(0, expert_std^2 / n),
a trained-looking coefficient MLP at its initialisation). The domains, tokenizer and domain map
come from a prepared data directory (`soup-train prepare`), so every export command works on it.
The checkpoint records its weights' SHA-256, as `soup-train fit` does.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from soup_train.checkpoint import FORMAT, CheckpointInfo, record_checksum, step_dir, write_latest
from soup_train.config import RunConfig
from soup_train.data.domains import copy_domain_files
from soup_train.data.shards import DomainShards
from soup_train.model.soup import meta_soup
from soup_train.stream import SafetensorsWriter

POOL = 1 << 24  # random values drawn once (64 MB in fp32); every piece is a slice of them, scaled


def write_synthetic_checkpoint(run_dir: Path, run: RunConfig, data_dir: Path, dtype: torch.dtype = torch.float32,
                               seed: int = 0, step: int = 1) -> Path:
    """`run_dir/checkpoints/step_N` of a soup of `run`'s shapes, in `dtype` (fp32 or bf16), over the
    domains of `data_dir` (its `run.data.domains` view); returns the checkpoint directory. Memory:
    the pool and one expert's slice of one tensor. Written to a temporary name and renamed."""
    view = run.data.domains
    shards = DomainShards.open(Path(data_dir), view, "train")
    soup = meta_soup(run.model, run.soup, len(shards.names))
    params = list(soup.named_parameters())
    final = step_dir(Path(run_dir), step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = CheckpointInfo(run, list(shards.names), view, [float(x) for x in shards.natural()], step)
        (tmp / "config.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        copy_domain_files(Path(data_dir), tmp)
        generator = torch.Generator().manual_seed(seed)
        pool = torch.randn(POOL, generator=generator)
        writer = SafetensorsWriter(tmp / "model.safetensors", [(n, dtype, tuple(p.shape)) for n, p in params],
                                   {"format": FORMAT}, hashed=True)
        try:
            for name, p in params:
                writer.write_pieces(name, _pieces(name, tuple(p.shape), run, pool, generator))
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        record_checksum(tmp / "model.safetensors", digest)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_latest(Path(run_dir), final.name)
    return final


def _pieces(name: str, shape: tuple[int, ...], run: RunConfig, pool: torch.Tensor, generator: torch.Generator):
    """The tensor `name` in pieces along its first dimension: an expert bank one expert at a time,
    any other tensor whole."""
    n = run.soup.n_experts
    if name.startswith("experts."):
        std = run.soup.expert_std / math.sqrt(max(n, 1))
        for _ in range(shape[0]):
            yield _values(shape[1:], std, pool, generator)
    elif name.startswith("shared.") and name.endswith("norm.weight"):
        yield torch.ones(shape)
    elif name.startswith("shared."):
        yield _values(shape, run.model.init_std, pool, generator)
    else:  # the coefficient MLP: small, as nn.Linear initialises it
        fan_in = shape[-1] if len(shape) > 1 else 1
        yield _values(shape, 1 / math.sqrt(3 * fan_in), pool, generator)


def _values(shape: tuple[int, ...], std: float, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`prod(shape)` values of std `std`: the pool from a random offset, wrapped around."""
    size = int(np.prod(shape, dtype=np.int64))
    start = int(torch.randint(0, POOL, (1,), generator=generator))
    if start + size <= POOL:
        values = pool[start:start + size]
    else:
        values = torch.cat([pool[start:]] + [pool] * ((size - (POOL - start)) // POOL + 1))[:size]
    return (values * std).view(shape)
