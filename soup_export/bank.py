"""A soup checkpoint opened for export: the bank of shared and expert tensors, mapped, never loaded.

`Bank` checks a checkpoint's completeness from headers alone, knows its SHA-256 (the one recorded
when it was written, or hashed once and cached), computes alpha = coefficient MLP(h), and yields
the bank tensor by tensor as views of the read-only map (`safetensors_map`). Everything that fuses
Theta(h) = S + sum_j alpha_j E_j calls `soup_math`'s one definition of it: `fused` for a batch's
mixes, `instantiate` for one dense state, `soup_logits` for the soup's own forward one layer at
a time (parity (a)). Peak memory is a tensor, not the soup.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from soup_export.cache import cached_sha256, file_sha256
from soup_train.safetensors_map import BANK_DTYPES, MappedSafetensors, safetensors_header
from soup_train.checkpoint import (CHECKSUMS, TOKENIZER, WEIGHTS, CheckpointInfo, read_info, recorded_checksum,
                                   resolve_checkpoint)
from soup_train.config import ModelConfig, SoupConfig
from soup_train.errors import CheckpointError
from soup_train.model.soup import CoefficientMLP
from soup_train.model.soup_math import COEF_PREFIX, SHARED_PREFIX, combine_many, expert_keys, instantiate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bank:
    """A checkpoint opened for fusion: its info, path, hash and dense tensor shapes."""

    path: Path
    info: CheckpointInfo
    sha256: str
    shapes: dict[str, tuple[int, ...]]  # dense name -> shape, in checkpoint order

    @classmethod
    def open(cls, path: Path, verify: bool = False) -> "Bank":
        """The checkpoint (or a run's latest) at `path`, its completeness checked (nothing read but
        headers). Its SHA-256 is the one recorded when it was written; `verify` hashes the weights and
        compares (a full read of the bank). A checkpoint with no record is hashed once (cached)."""
        ckpt = resolve_checkpoint(Path(path))
        info = read_info(ckpt)
        weights = ckpt / WEIGHTS
        header = safetensors_header(weights)[0]
        other = sorted({e["dtype"] for e in header.values()} - set(BANK_DTYPES))
        if other:
            raise CheckpointError(f"{weights} holds {', '.join(other)} tensors; export reads fp32, bf16 and fp16 "
                                  "checkpoints: convert it to one of those")
        stored = {k: tuple(entry["shape"]) for k, entry in header.items()}
        check_complete(ckpt, info, stored)
        if not (ckpt / TOKENIZER).is_file():
            raise CheckpointError(f"{ckpt} has no tokenizer.json; the checkpoint is incomplete: copy it again")
        shapes = {k[len(SHARED_PREFIX):]: s for k, s in stored.items() if k.startswith(SHARED_PREFIX)}
        return cls(ckpt, info, weights_sha256(weights, verify), shapes)

    @property
    def weights(self) -> Path:
        """The checkpoint's weights (the bank)."""
        return self.path / WEIGHTS

    @property
    def tokenizer(self) -> Path:
        """The checkpoint's tokenizer.json."""
        return self.path / TOKENIZER

    def alpha(self, h: np.ndarray) -> torch.Tensor:
        """alpha = w(h) with the checkpoint's coefficient MLP (fp32)."""
        with torch.no_grad():
            return self.coefficient_mlp(torch.as_tensor(h, dtype=torch.float32)).float()

    @cached_property
    def coefficient_mlp(self) -> CoefficientMLP:
        """The checkpoint's coefficient MLP, read once per opened bank (a batch asks it for every mix)."""
        mlp = CoefficientMLP(len(self.info.domains), self.info.run.soup)
        mapped = self.map()
        mlp.load_state_dict({k[len(COEF_PREFIX):]: mapped[k] for k in mapped.header if k.startswith(COEF_PREFIX)})
        return mlp.eval()

    def tensors(self, names: list[str] | None = None, progress: bool = False,
                mapped: MappedSafetensors | None = None) -> Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Tensor-major: (dense name, shared tensor in fp32, its expert tensors as stored) as views of
        the memory-mapped checkpoint (no copy; a 16-bit shared tensor is converted, one tensor), one
        tensor at a time, in checkpoint order or the order of `names`; through `mapped` (a map of this
        bank's weights) or a new map. A 16-bit bank stays 16-bit: `combine` converts it a block at a
        time (a 128-expert embedding bank is 12.6 GB in fp32)."""
        tensors = self.map() if mapped is None else mapped
        names = list(self.shapes) if names is None else names
        for i, name in enumerate(tqdm(names, desc="fuse", unit="tensor", disable=not progress, leave=False)):
            tensors.prefetch([self.keys(n) for n in names[i:i + 2]])  # the disk reads ahead while this one is fused
            shared, *experts = (tensors[k] for k in self.keys(name))
            yield name, _fp32(shared), tuple(experts)

    def skeleton(self):
        """The instantiated model's modules on the meta device (structure only, nothing allocated)."""
        from soup_train.model.soup import meta_soup

        run = self.info.run
        return meta_soup(run.model, run.soup, len(self.info.domains)).shared

    def instantiate(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Theta at coefficients alpha as a dense state dict (tied head once), by `combine` tensor by
        tensor in one pass over the mapped bank: the specialist's size in memory, never the soup's."""
        return instantiate(self.tensors(), alpha)

    def soup_logits(self, h: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
        """The soup's own forward at h, logits (B, T, vocab), holding one layer of Theta(h) at a time:
        each part of the model is instantiated from the mapped bank with `combine` (the function
        training's `SoupModel.instantiate` uses) when it runs, and dropped after (the tied embedding
        is kept for the head). Works for banks larger than memory; the result is `SoupModel.forward`'s."""
        from soup_train.model.llama import forward_by_parts

        run = self.info.run
        skeleton = self.skeleton()
        alpha, mapped, kept = self.alpha(h), self.map(), {}

        def weights(prefix: str) -> dict[str, torch.Tensor]:
            if prefix == "lm_head" and run.model.tie_embeddings:
                return kept.pop("weight")
            names = [n for n in self.shapes if n.startswith(prefix + ".")]
            part = {n[len(prefix) + 1:]: t for n, t in instantiate(self.tensors(names, mapped=mapped), alpha).items()}
            if prefix == "model.embed_tokens" and run.model.tie_embeddings:
                kept["weight"] = part
            return part

        with torch.no_grad():
            return forward_by_parts(skeleton, weights, input_ids)

    def keys(self, name: str) -> list[str]:
        """The checkpoint keys that dense tensor `name` is fused from (shared, then its experts)."""
        return [SHARED_PREFIX + name, *expert_keys(name, self.shapes[name], self.info.run.soup.expert_rank)]

    def map(self) -> MappedSafetensors:
        """A new zero-copy map of the bank's weights (its header parsed once)."""
        return MappedSafetensors(self.weights)

    def workspace(self, mixes: int, names: list[str] | None = None) -> torch.Tensor:
        """Memory for `mixes` fused copies of the largest of these tensors (see `fused`)."""
        return torch.empty(mixes * max((math.prod(self.shapes[n]) for n in names or self.shapes), default=0))

    def fused(self, alphas: list[torch.Tensor], progress: bool = False,
              names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensor-major: (dense name, Theta_m[name] stacked over the alphas m: (mixes, *shape)) in fp32,
        one tensor at a time, in checkpoint order or the order of `names`. Each yielded tensor lives in
        one reused workspace (fresh memory for every tensor would cost as much as the fusion itself,
        in page faults): it is valid until the next one is asked for."""
        workspace = self.workspace(len(alphas), names)
        for name, shared, experts in self.tensors(names, progress):
            yield name, combine_many(shared, experts, alphas, workspace=workspace)  # the bank is read once for all mixes


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32; an fp32 tensor as it is, without a torch call (each releases and retakes the GIL,
    which export's writer threads hold in turn)."""
    return t if t.dtype == torch.float32 else t.float()


@lru_cache(maxsize=8)
def expected_shapes(model: ModelConfig, soup_cfg: SoupConfig, n_domains: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a soup of these (frozen, hashable) configs holds, by building it on the meta
    device; cached, as many exports in one process open checkpoints of the same configs."""
    from soup_train.model.soup import meta_soup

    return {name: tuple(p.shape) for name, p in meta_soup(model, soup_cfg, n_domains).named_parameters()}


def check_complete(ckpt: Path, info: CheckpointInfo, stored: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the checkpoint's config implies is present with its shape, and nothing else is
    (nothing allocated)."""
    expected = expected_shapes(info.run.model, info.run.soup, len(info.domains))
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or wrong or extra:
        detail = " ".join(f"{what} {names[:3]}" for what, names in
                          (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong)) if names)
        raise CheckpointError(f"{ckpt}/model.safetensors does not match its config.json ({detail.strip()}); "
                              "the checkpoint is corrupt or its config was edited")


def weights_sha256(weights: Path, verify: bool) -> str:
    """The bank's SHA-256: the one recorded by the checkpoint's writer while the file is as recorded
    (same size and modification time; `cp -p`, `rsync -a` and tar keep both), else computed once and
    cached (`cached_sha256`). With `verify`, the file is hashed and must match the record."""
    entry, stat = recorded_checksum(weights), weights.stat()
    if verify:
        return verified_sha256(weights, entry)
    if entry is not None and entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    if entry is not None:
        log.info("%s changed (or was copied without its times) since its SHA-256 was recorded: hashing it once",
                 weights)
    return cached_sha256(weights)


def verified_sha256(weights: Path, entry: dict | None) -> str:
    """The SHA-256 of `weights`, read in full, which must equal the one recorded when they were written."""
    if entry is None:
        raise CheckpointError(f"{weights} has no recorded SHA-256 to verify ({weights.parent / CHECKSUMS} is "
                              "missing: a checkpoint from an older soup-train); run without --verify-checkpoint")
    actual = file_sha256(weights)
    if actual != entry["sha256"]:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded when it was written "
                              f"({actual[:12]}... vs {entry['sha256'][:12]}...): the file is corrupt or was changed; "
                              "copy the checkpoint again")
    return actual



def checkpoint_ref(bank: Bank) -> dict:
    """What a manifest and a spec record of the checkpoint: name, step, SHA-256, domains, view."""
    return {"name": bank.path.name, "step": bank.info.step, "model_sha256": bank.sha256,
            "domains": bank.info.domains, "view": bank.info.view}
