"""The meta-distribution pi over domain weights h, and Algorithm 1: batches from mix(h).

Design choices:
- pi (docs/method.md section 1): with probability p_nat the natural frequencies; otherwise a support
  size s ~ Uniform{1..s_max}, s domains uniformly without replacement, Dirichlet(beta) weights.
- Algorithm 1 per row: a domain i ~ Categorical(h), then a window uniformly from domain i
  (sampling with replacement: no epoch bookkeeping, any h is exact).
- Determinism: every random stream is a numpy PCG64 seeded by (seed, purpose, index). The h
  stream is per rank: one h per rank per step, or one per micro-batch with meta.h_per_micro_batch. Batch streams are per *global slot*
  `rank * grad_accum + micro`, so 2 ranks x 1 micro-batch draw exactly the windows of
  1 rank x 2 micro-batches (what makes the multi-process test comparable to one process).
- The streams' states are plain JSON and go into every checkpoint.
"""
from __future__ import annotations

import numpy as np

from soup_train.config import MetaConfig
from soup_train.data.shards import DomainShards
from soup_train.errors import ConfigError, DataError, ResumeError

_H_STREAM, _BATCH_STREAM = 0, 1


class MetaDistribution:
    """Samples domain weights h on the simplex over k domains."""

    def __init__(self, cfg: MetaConfig, natural: np.ndarray) -> None:
        self.cfg, self.natural = cfg, np.asarray(natural, dtype=np.float64)
        self.k = len(self.natural)
        self.fixed = None
        if cfg.fixed_h is not None:
            if len(cfg.fixed_h) != self.k:
                raise ConfigError(f"meta.fixed_h has {len(cfg.fixed_h)} weights but the data has {self.k} "
                                  f"domains; give one weight per domain (e.g. meta.fixed_h={','.join(['1'] * self.k)})")
            fixed = np.asarray(cfg.fixed_h, dtype=np.float64)
            self.fixed = fixed / fixed.sum()

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        if self.fixed is not None:
            return self.fixed.copy()
        if rng.random() < self.cfg.p_nat:
            return self.natural.copy()
        s = int(rng.integers(1, min(self.cfg.s_max, self.k) + 1))
        support = rng.choice(self.k, size=s, replace=False)
        h = np.zeros(self.k)
        h[support] = rng.dirichlet(np.full(s, self.cfg.beta))
        return h


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, index])))


class MixSampler:
    """This rank's h stream and its grad_accum batch streams (Algorithm 1)."""

    def __init__(self, shards: DomainShards, meta: MetaDistribution, seed: int, rank: int, grad_accum: int) -> None:
        self.shards, self.meta = shards, meta
        self.counts = shards.counts
        if (self.counts == 0).all():
            raise DataError("the training shards hold no windows; rebuild the data with more text")
        self.h_rng = _rng(seed, _H_STREAM, rank)
        self.slots = [_rng(seed, _BATCH_STREAM, rank * grad_accum + m) for m in range(grad_accum)]

    def next_h(self) -> np.ndarray:
        return self.meta.sample(self.h_rng)

    def batch(self, micro: int, h: np.ndarray, batch_size: int) -> np.ndarray:
        """(batch_size, window) int64 windows drawn from mix(h) with micro-batch slot `micro`."""
        rng = self.slots[micro]
        p = np.where(self.counts > 0, np.asarray(h, dtype=np.float64), 0.0)
        if p.sum() <= 0:
            raise DataError("h puts all its weight on domains without training windows")
        domains = rng.choice(len(p), size=batch_size, p=p / p.sum())
        rows = (rng.random(batch_size) * self.counts[domains]).astype(np.int64)
        out = np.empty((batch_size, self.shards.window), dtype=np.int64)
        for j, (d, r) in enumerate(zip(domains, rows)):
            out[j] = self.shards.arrays[d][r]
        return out

    def state_dict(self) -> dict:
        return {"h": self.h_rng.bit_generator.state, "slots": [g.bit_generator.state for g in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["slots"]) != len(self.slots):
            raise ResumeError(f"the checkpoint's sampler has {len(state['slots'])} micro-batch streams, this run "
                              f"{len(self.slots)}; resume with the same train.grad_accum")
        self.h_rng.bit_generator.state = state["h"]
        for g, s in zip(self.slots, state["slots"]):
            g.bit_generator.state = s
