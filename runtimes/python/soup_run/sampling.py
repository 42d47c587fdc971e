"""Next-token choice: greedy, or temperature / top-k / top-p sampling, with a repetition penalty.

Order (as transformers applies its logits processors): repetition penalty, temperature, top-k,
top-p, then a draw from the seeded numpy Generator. temperature == 0 means greedy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soup_run.errors import RunError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus mass
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL-style)

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise RunError("sampling options: temperature >= 0, top-k >= 0, 0 < top-p <= 1, repetition penalty > 0")


def penalise(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits (V,), seen (V,) bool: divide positive, multiply negative logits of seen tokens."""
    if penalty == 1.0 or not seen.any():
        return logits
    out = logits.copy()
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def choose(logits: np.ndarray, seen: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token of one row."""
    if s.temperature == 0 and s.repetition_penalty == 1.0:  # plain greedy: the hot path of decoding
        return int(logits.argmax())
    logits = penalise(logits.astype(np.float64), seen, s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k and s.top_k < len(logits):
        kth = np.partition(logits, -s.top_k)[-s.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[:int(np.searchsorted(cumulative, s.top_p)) + 1]  # smallest set with mass >= top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
