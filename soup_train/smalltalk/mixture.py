"""SmallTalk inference: route each sequence by its prefix, score it with the chosen expert.

Routing is the argmax of the routers' prefix log-likelihood (no balancing); the chosen expert
then scores the whole sequence, prefix included. Perplexity is exp(mean per-token NLL) over all
held-out tokens; per-domain numbers use the named domains of the `sources` view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from soup_train.model.llama import lm_loss
from soup_train.smalltalk.routing import prefix_scores, purity, route, shares
from soup_train.smalltalk.run import SmallTalkRun


@torch.no_grad()
def sequence_nll(model: nn.Module, windows: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N,) mean next-token NLL of each window under a dense LM."""
    out = np.empty(len(windows))
    for start in range(0, len(windows), batch):
        chunk = torch.as_tensor(np.asarray(windows[start:start + batch], dtype=np.int64))
        out[start:start + len(chunk)] = lm_loss(model(chunk[:, :-1]), chunk[:, 1:], per_row=True).double().numpy()
    return out


@dataclass
class Mixture:
    routers: list[nn.Module]
    experts: list[nn.Module]
    prefix_len: int

    @classmethod
    def load(cls, run: SmallTalkRun) -> "Mixture":
        return cls(run.load_routers(), run.load_experts(), run.prefix_len)

    def route(self, windows: np.ndarray, prefix_len: int | None = None) -> np.ndarray:
        return route(prefix_scores(self.routers, windows, prefix_len or self.prefix_len))

    def nll(self, windows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        out = np.empty(len(windows))
        for e, expert in enumerate(self.experts):
            at = np.flatnonzero(chosen == e)
            if len(at):
                out[at] = sequence_nll(expert, windows[at])
        return out


def test_windows(run: SmallTalkRun, per_domain: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows and their domain labels (the first `per_domain` of each domain; 0 = all)."""
    pool = run.pool("test")
    keep = np.concatenate([np.flatnonzero(pool.labels == d)[:per_domain or None] for d in range(len(run.domains))])
    return pool.take(keep), pool.labels[keep]


def evaluate(run: SmallTalkRun, mixture: Mixture, windows: np.ndarray, labels: np.ndarray,
             prefix_len: int | None = None) -> dict:
    """Perplexity of the routed mixture, per domain and overall, with shares and purity."""
    chosen = mixture.route(windows, prefix_len)
    nll = mixture.nll(windows, chosen)
    per_domain = {name: float(np.exp(nll[labels == d].mean())) for d, name in enumerate(run.domains)
                  if (labels == d).any()}
    return {"prefix_len": prefix_len or mixture.prefix_len, "ppl": float(np.exp(nll.mean())),
            "per_domain": per_domain, "shares": shares(chosen, run.experts),
            "purity": purity(chosen, labels, run.experts), "sequences": int(len(windows))}


def dense_perplexity(run: SmallTalkRun, model: nn.Module, windows: np.ndarray, labels: np.ndarray) -> dict:
    nll = sequence_nll(model, windows)
    return {"ppl": float(np.exp(nll.mean())),
            "per_domain": {name: float(np.exp(nll[labels == d].mean())) for d, name in enumerate(run.domains)
                           if (labels == d).any()}}
