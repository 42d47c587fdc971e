"""Perplexity of texts under a specialist: non-overlapping windows of the context length."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soup_run.decoder import Decoder
from soup_run.errors import RunError, read_text


def nll(model: Decoder, ids: list[int]) -> tuple[float, int]:
    """(summed next-token NLL in nats, predicted tokens) over windows of the context length."""
    total, count = 0.0, 0
    window = model.contract.context
    for start in range(0, max(len(ids) - 1, 0), window):
        chunk = np.asarray(ids[start:start + window + 1], np.int64)
        if len(chunk) < 2:
            break
        x, y = chunk[None, :-1], chunk[1:]
        logits, _ = model.step(x, np.ones_like(x), np.arange(x.shape[1])[None], model.empty_past(1), all_logits=True)
        total -= token_log_probs(logits[0], y).sum()
        count += len(y)
    return total, count


def token_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(S,) log-probability of each target under logits (S, V), in float64."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return logp[np.arange(len(targets)), targets]


def score_files(model: Decoder, paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        text = read_text(path, str(path), "pass text files to score")
        ids = model.encode(text)
        if len(ids) < 2:
            raise RunError(f"{path} has fewer than 2 tokens; nothing to score")
        total, count = nll(model, ids)
        rows.append({"file": str(path), "tokens": count, "nll": total / count, "perplexity": float(np.exp(total / count))})
    return rows
