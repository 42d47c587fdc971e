"""Held-out evaluation of a soup at chosen domain weights.

Design choices: every domain is evaluated on a fixed, deterministic subset of its test windows
(the first `rows`), so numbers are comparable across steps and runs. Two settings per domain:
`own` (h = that domain's one-hot vector: the specialist) and `natural` (h = the natural domain
frequencies: the generic model). Losses are mean next-token NLL in nats.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from soup_train.data.shards import DomainShards
from soup_train.model.llama import lm_loss


def loss_at(model: nn.Module, windows: np.ndarray, h: np.ndarray, batch_size: int, seq_len: int,
            device: torch.device, autocast=contextlib.nullcontext) -> float:
    """Mean next-token loss of `windows` (N, >= seq_len + 1) under the soup at h."""
    return float(np.mean(window_losses(model, windows, h, batch_size, seq_len, device, autocast))) if len(windows) else 0.0


@torch.no_grad()
def window_losses(model: nn.Module, windows: np.ndarray, h: np.ndarray, batch_size: int, seq_len: int,
                  device: torch.device, autocast=contextlib.nullcontext) -> np.ndarray:
    """(N,) mean next-token loss of each window (N, >= seq_len + 1) under the soup at h (every window
    has seq_len targets, so their mean is the mean over all tokens)."""
    h_t = torch.as_tensor(h, dtype=torch.float32, device=device)
    out = []
    for start in range(0, len(windows), batch_size):
        batch = torch.as_tensor(np.asarray(windows[start:start + batch_size], dtype=np.int64), device=device)
        x, y = batch[:, :seq_len], batch[:, 1:seq_len + 1]
        with autocast():
            logits = model(x, h_t)
        out.append(lm_loss(logits, y, per_row=True).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def one_hot(k: int, i: int) -> np.ndarray:
    h = np.zeros(k)
    h[i] = 1.0
    return h


def evaluate_domains(model: nn.Module, shards: DomainShards, natural: np.ndarray, rows: int,
                     batch_size: int, seq_len: int, device: torch.device,
                     autocast=contextlib.nullcontext) -> dict[str, dict[str, float]]:
    """{domain: {"own": loss at its one-hot h, "natural": loss at natural h, "windows": n}}."""
    was_training = model.training
    model.eval()
    out = {}
    for i, name in enumerate(shards.names):
        windows = shards.arrays[i][:rows]
        if len(windows) == 0:
            continue
        own = loss_at(model, windows, one_hot(len(natural), i), batch_size, seq_len, device, autocast)
        nat = loss_at(model, windows, natural, batch_size, seq_len, device, autocast)
        out[name] = {"own": own, "natural": nat, "windows": int(len(windows))}
    model.train(was_training)
    return out


def format_table(evaluation: dict[str, dict[str, float]]) -> str:
    """Markdown table: per domain, the loss at its own h vs at the natural mix."""
    lines = ["| domain | test windows | loss at own h | loss at natural h | gain |",
             "|---|---:|---:|---:|---:|"]
    wins = 0
    for name, r in evaluation.items():
        gain = (r["natural"] - r["own"]) / r["natural"]
        wins += r["own"] < r["natural"]
        lines.append(f"| {name} | {r['windows']} | {r['own']:.4f} | {r['natural']:.4f} | {100 * gain:+.2f}% |")
    lines.append(f"\nspecialist (own h) beats natural mix on {wins}/{len(evaluation)} domains")
    return "\n".join(lines)
