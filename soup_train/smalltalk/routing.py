"""SmallTalk routing: prefix log-likelihood under every router, balanced and free assignment.

- A router reads the first M tokens of a sequence and is scored on predicting tokens 1..M, so a
  prefix "of length M" uses M + 1 tokens; shorter sequences use what they have. The score is the
  mean log-likelihood per predicted token (every router sees the same tokens, so the argmax is
  the same as with sums).
- Training-time assignment is balanced (docs/method.md section 4): sequences sorted by their best
  score, most confident first, each to its best router that still has capacity.
- Inference-time routing is the plain argmax: no balancing.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def prefix_scores(routers: list[nn.Module], windows: np.ndarray, prefix_len: int, batch: int = 256) -> np.ndarray:
    """(N, E) mean log-likelihood of each window's first `prefix_len` predicted tokens per router."""
    span = min(prefix_len + 1, windows.shape[1])
    if span < 2:
        raise ValueError("routing needs at least 2 tokens per sequence")
    out = np.empty((len(windows), len(routers)), dtype=np.float64)
    for start in range(0, len(windows), batch):
        chunk = torch.as_tensor(np.asarray(windows[start:start + batch, :span], dtype=np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:]
        for e, router in enumerate(routers):
            logp = F.log_softmax(router(x).float(), dim=-1)
            out[start:start + len(chunk), e] = logp.gather(-1, y[..., None])[..., 0].mean(-1).double().numpy()
    return out


def route(scores: np.ndarray) -> np.ndarray:
    """Inference routing: each sequence to the router with the highest prefix log-likelihood."""
    return np.asarray(scores).argmax(axis=1)


def capacity(n: int, experts: int) -> int:
    """Sequences per router in a balanced assignment of n: N / E, rounded up so all fit."""
    return math.ceil(n / experts)


def balanced_assign(scores: np.ndarray, cap: int | None = None) -> np.ndarray:
    """Training-time assignment: most confident sequence first, to its best router with room left.

    scores (N, E); `cap` per router (default N / E rounded up). Returns (N,) router indices.
    """
    scores = np.asarray(scores)
    n, e = scores.shape
    cap = capacity(n, e) if cap is None else cap
    if cap * e < n:
        raise ValueError(f"capacity {cap} x {e} routers cannot hold {n} sequences")
    order = np.argsort(-scores.max(axis=1), kind="stable")
    preference = np.argsort(-scores, axis=1, kind="stable")
    room = np.full(e, cap, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i in order:
        for r in preference[i]:
            if room[r] > 0:
                out[i] = r
                room[r] -= 1
                break
    return out


def purity(assignment: np.ndarray, labels: np.ndarray, experts: int) -> float:
    """Share of sequences whose expert's majority named domain is their own domain."""
    if len(assignment) == 0:
        return float("nan")
    hits = sum(np.bincount(labels[assignment == e]).max() for e in range(experts) if (assignment == e).any())
    return float(hits) / len(assignment)


def shares(assignment: np.ndarray, experts: int) -> list[float]:
    """Fraction of the sequences each expert receives."""
    return (np.bincount(assignment, minlength=experts) / max(len(assignment), 1)).tolist()
