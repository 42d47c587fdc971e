"""The directory of a SmallTalk run: its layout, its config, and loading its models.

    RUN/smalltalk.json                       format, resolved SmallTalkConfig, domain names
    RUN/tokenizer.json                       the data's tokenizer (every model shares it)
    RUN/routers/round_NNN/                   EM state after round NNN (weights, AdamW, assignment)
    RUN/routers/router_EE.safetensors        the trained routers (written when EM ends)
    RUN/assign/expert_EE.npy                 pool indices of the training sequences of expert EE
    RUN/assign/summary.json                  shares, domain purity and the assignment's parameters
    RUN/experts/expert_EE/checkpoints/...    the expert job's resumable checkpoints
    RUN/experts/expert_EE/model.safetensors  the trained expert (written when its job ends)

Every `.safetensors` model file holds a `soup_train.model.llama.Llama` state dict, whose names
are `transformers.LlamaForCausalLM`'s (a tied `lm_head.weight` is not stored).
The pool is the data directory's training windows of the `sources` view, concatenated in domain
order; `pool_labels` gives each window's named domain (for routing purity).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from soup_train.checkpoint import read_tensors
from soup_train.config import ModelConfig, from_dict, save_json, to_dict
from soup_train.data.shards import DomainShards, read_index
from soup_train.errors import CheckpointError, ConfigError, DataError
from soup_train.model.llama import Llama
from soup_train.smalltalk.config import SmallTalkConfig

FORMAT = "soup-smalltalk-v1"
CONFIG = "smalltalk.json"


def resolve(cfg: SmallTalkConfig) -> SmallTalkConfig:
    """Fill vocab size and context lengths from the data directory, and check them."""
    if not cfg.data.path:
        raise ConfigError("no data directory; pass --data DATA (built by `soup-train prepare`)")
    index = read_index(Path(cfg.data.path))
    window = int(index["window"])
    seq_len = cfg.data.seq_len or window - 1
    if seq_len > window - 1:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the prepared windows ({window - 1})")
    if cfg.em.prefix_len > seq_len:
        raise ConfigError(f"em.prefix_len={cfg.em.prefix_len} exceeds the sequence length {seq_len}; "
                          f"use --set em.prefix_len={seq_len} or less")
    vocab = index["vocab_size"]
    router = replace(cfg.router, vocab_size=vocab, max_seq_len=cfg.em.prefix_len)
    expert = replace(cfg.expert, vocab_size=vocab, max_seq_len=seq_len)
    return replace(cfg, router=router, expert=expert, data=replace(cfg.data, seq_len=seq_len))


def save_model(model: torch.nn.Module, path: Path) -> None:
    """A Llama's parameters (HF names, tied weights once) to safetensors, atomically."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.named_parameters()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(path)


def load_model(cfg: ModelConfig, path: Path) -> Llama:
    """A Llama from `save_model`'s file, every tensor checked against the config."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the model it holds has not been trained yet")
    model = Llama(cfg)
    tensors = read_tensors(path)
    expected = dict(model.named_parameters())
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path} does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in expected.items():
            if param.shape != tensors[name].shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the config says {tuple(param.shape)}")
            param.copy_(tensors[name])
    return model.eval()


@dataclass(frozen=True)
class SmallTalkRun:
    path: Path
    config: SmallTalkConfig
    domains: list[str]

    # ----------------------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: Path, cfg: SmallTalkConfig) -> "SmallTalkRun":
        """Start a run directory (or reopen one made with the same config)."""
        cfg = resolve(cfg)
        if (path / CONFIG).is_file():
            run = cls.open(path)
            if to_dict(run.config) != to_dict(replace(cfg, data=replace(cfg.data, path=run.config.data.path))):
                raise ConfigError(f"{path} holds a SmallTalk run with another config; pass the same "
                                  "preset and --set values, or choose a new --out")
            return run
        index = read_index(Path(cfg.data.path))
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(cfg.data.path) / "tokenizer.json", path / "tokenizer.json")
        names = list(index["views"]["sources"]["names"])
        save_json(path / CONFIG, {"format": FORMAT, "config": to_dict(cfg), "domains": names})
        return cls(path, cfg, names)

    @classmethod
    def open(cls, path: Path) -> "SmallTalkRun":
        file = Path(path) / CONFIG
        if not file.is_file():
            raise CheckpointError(f"{path} is not a SmallTalk run (no {CONFIG}); start one with "
                                  f"`soup-train smalltalk routers --data DATA --out {path}`")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file} is not valid JSON ({exc}); the run is corrupt") from None
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{file}: format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            cfg = from_dict(SmallTalkConfig, data["config"])
        except (ConfigError, KeyError) as exc:
            raise CheckpointError(f"{file}: {getattr(exc, 'message', exc)}") from None
        return cls(Path(path), cfg, list(data.get("domains", [])))

    # ----------------------------------------------------------------------------- layout
    @property
    def experts(self) -> int:
        return self.config.em.experts

    @property
    def prefix_len(self) -> int:
        return self.config.em.prefix_len

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    def router_file(self, e: int) -> Path:
        return self.path / "routers" / f"router_{e:02d}.safetensors"

    def round_dir(self, r: int) -> Path:
        return self.path / "routers" / f"round_{r:03d}"

    def assign_file(self, e: int) -> Path:
        return self.path / "assign" / f"expert_{e:02d}.npy"

    def expert_dir(self, e: int) -> Path:
        return self.path / "experts" / f"expert_{e:02d}"

    def expert_file(self, e: int) -> Path:
        return self.expert_dir(e) / "model.safetensors"

    def check_index(self, e: int) -> int:
        if not 0 <= e < self.experts:
            raise ConfigError(f"expert index {e} is out of range; this run has experts 0..{self.experts - 1}")
        return e

    # ----------------------------------------------------------------------------- models
    def routers_done(self) -> bool:
        return all(self.router_file(e).is_file() for e in range(self.experts))

    def require_routers(self) -> None:
        if not self.routers_done():
            raise CheckpointError(f"{self.path} has no trained routers yet; run "
                                  f"`soup-train smalltalk routers --out {self.path}` first")

    def load_routers(self) -> list[Llama]:
        self.require_routers()
        return [load_model(self.config.router, self.router_file(e)) for e in range(self.experts)]

    def missing_experts(self) -> list[int]:
        return [e for e in range(self.experts) if not self.expert_file(e).is_file()]

    def require_experts(self) -> None:
        missing = self.missing_experts()
        if missing:
            raise CheckpointError(f"experts {', '.join(map(str, missing))} of {self.path} are not trained; run "
                                  f"`soup-train smalltalk launch {self.path}` (or `smalltalk expert --index E`)")

    def load_experts(self) -> list[Llama]:
        self.require_experts()
        return [load_model(self.config.expert, self.expert_file(e)) for e in range(self.experts)]

    # ----------------------------------------------------------------------------- data
    def shards(self, split: str) -> DomainShards:
        return DomainShards.open(Path(self.config.data.path), "sources", split)

    def pool(self, split: str = "train") -> "Pool":
        pool = Pool.of(self.shards(split))
        if len(pool) == 0:
            raise DataError(f"the {split} split of {self.config.data.path} holds no windows")
        return pool


@dataclass(frozen=True)
class Pool:
    """Every domain's windows of one split as one indexable set, still memory-mapped.

    Global index i is row i - offsets[d] of domain d; `labels[i]` is its named domain.
    """

    shards: DomainShards
    offsets: np.ndarray  # (k + 1,) cumulative window counts
    labels: np.ndarray  # (N,) named domain of each window

    @classmethod
    def of(cls, shards: DomainShards) -> "Pool":
        counts = shards.counts
        labels = np.repeat(np.arange(len(counts)), counts)
        return cls(shards, np.concatenate([[0], np.cumsum(counts)]), labels)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, index: np.ndarray) -> np.ndarray:
        """(len(index), window) int64 windows, in the order given."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.shards.window), dtype=np.int64)
        for d in np.unique(self.labels[index]) if len(index) else []:
            at = np.flatnonzero(self.labels[index] == d)
            out[at] = self.shards.arrays[d][index[at] - self.offsets[d]]
        return out
