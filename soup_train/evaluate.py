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
                     autocast=contextlib.nullcontext, env=None) -> dict[str, dict[str, float]]:
    """{domain: {"own": loss at its one-hot h, "natural": loss at natural h, "windows": n}}.

    Theta is instantiated once per distinct h (the natural mix once for every domain, not once per
    batch), as a standalone dense model; under a process group (`env`) each rank evaluates every
    world_size-th domain and the table is gathered, so k domains cost each rank k / world_size
    instantiations. A sharded (FSDP2) soup's root unit (S and the coefficient MLP) is gathered once
    for the whole evaluation and each bank slice while its part is instantiated, so a rank holds one
    slice of the bank whole at a time. Gathers and the agreement on errors are collectives, so every
    rank runs the same number of rounds (a rank with fewer domains instantiates the natural mix again)."""
    from soup_train.distributed import gather_objects, gathered, raise_together, unwrap

    soup, k = unwrap(model), len(natural)
    world, rank = (env.world_size, env.rank) if env is not None else (1, 0)
    present = [i for i, w in enumerate(shards.arrays) if len(w[:rows])]
    mine = present[rank::world]
    # under a process group every rank runs as many rounds: a sharded soup gathers its slices in
    # collectives, and each round's errors are agreed by all (raise_together)
    grouped = env is not None and env.backend is not None
    rounds = len(present[::world]) if grouped else len(mine)
    out: dict[str, dict[str, float]] = {}
    natural_h = torch.as_tensor(natural, dtype=torch.float32, device=device)
    with gathered(model):
        generic = soup.dense_model(natural_h, gathered).eval()
        for r in range(rounds):
            i = mine[r] if r < len(mine) else None
            own = soup.dense_model(natural_h if i is None else
                                   torch.as_tensor(one_hot(k, i), dtype=torch.float32, device=device), gathered)
            error = None
            try:
                if i is not None:
                    windows = shards.arrays[i][:rows]
                    out[shards.names[i]] = {
                        "own": _mean_loss(own.eval(), windows, batch_size, seq_len, device, autocast),
                        "natural": _mean_loss(generic, windows, batch_size, seq_len, device, autocast),
                        "windows": int(len(windows))}
            except Exception as exc:  # noqa: BLE001 - agreed: every rank stops before the next gather
                error = exc
            if grouped:
                raise_together(error, env, f"evaluating domain {shards.names[i]}" if i is not None else "evaluating")
            elif error is not None:
                raise error
    if grouped:
        for part in gather_objects(out, env):
            out.update(part)
    return {name: out[name] for name in shards.names if name in out}


@torch.no_grad()
def _mean_loss(dense: nn.Module, windows: np.ndarray, batch_size: int, seq_len: int, device: torch.device,
               autocast) -> float:
    """Mean next-token loss of `windows` under a dense model (every window has seq_len targets)."""
    losses = []
    for start in range(0, len(windows), batch_size):
        batch = torch.as_tensor(np.asarray(windows[start:start + batch_size], dtype=np.int64), device=device)
        with autocast():
            logits = dense(batch[:, :seq_len])
        losses.append(lm_loss(logits, batch[:, 1:seq_len + 1], per_row=True).double().cpu().numpy())
    return float(np.mean(np.concatenate(losses)))


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
