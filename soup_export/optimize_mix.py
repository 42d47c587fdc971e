"""Search the mix (beyond the paper): a few gradient steps on the domain weights h, no weight change.

Starting from a mix (the histogram estimate of Algorithm 3, or weights the customer gave), h is
parametrised as softmax(z) with z = log(h0 + floor), so it stays on the simplex and a domain at
weight 0 can still grow. Adam on z minimises the soup's loss at Theta(h) (through the
coefficient MLP; S, the experts and the MLP are frozen) on the customer's texts. The texts'
windows are split once: the last `holdout` share is never trained on and picks the best step;
the search stops after `patience` steps without a held-out improvement. If no step beats the
start on the held-out part, the start mix is returned unchanged (its source too), so the search never makes the
estimate worse on data it did not fit.

Choices (each a field of `MixSearchConfig`): Adam, lr 0.3 on z, at most 40 steps, patience 5,
a quarter of the windows held out, floor 0.02 (a smaller floor saturates the softmax at a one-hot
start, and the search cannot leave it), windows of the training context (at most 128
tokens), full batch over at most 64 training windows. Needs the soup in memory (S, the bank and
the MLP), which is fine up to a few hundred million parameters on a CPU.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from soup_export.errors import MixError, ParityError
from soup_export.mix import Mix, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixSearchConfig:
    steps: int = 40  # at most this many Adam steps
    lr: float = 0.3  # on the logits z of h = softmax(z)
    patience: int = 5  # stop after this many steps without a held-out improvement
    holdout: float = 0.25  # share of the windows used only to choose the step
    floor: float = 0.02  # z = log(h0 + floor): zero-weight domains can grow (softmax is not saturated)
    window: int = 128  # tokens per window (capped by the model's context)
    max_windows: int = 64  # training windows per step (full batch)
    batch: int = 16  # windows per forward pass


@torch.no_grad()
def _loss(soup, windows: torch.Tensor, h: torch.Tensor, batch: int) -> float:
    return _loss_grad(soup, windows, h, batch, grad=False)


def _loss_grad(soup, windows: torch.Tensor, h: torch.Tensor, batch: int, grad: bool = True) -> float:
    """Mean next-token loss over `windows` at h; with grad, accumulates dLoss/dh into h's graph."""
    from soup_train.model.llama import lm_loss

    total = 0.0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        loss = lm_loss(soup(chunk[:, :-1], h), chunk[:, 1:]) * (len(chunk) / len(windows))
        if grad:
            loss.backward(retain_graph=True)
        total += float(loss.detach())
    return total


def split_windows(windows: np.ndarray, cfg: MixSearchConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): every k-th window is held out (k = 1 / holdout, at least one window), so both
    parts span all the files; training keeps at most `max_windows`."""
    if len(windows) < 2:
        raise MixError(f"--optimize-mix needs at least 2 windows of {windows.shape[1] if windows.ndim == 2 else '?'} "
                       "tokens of the customer's text (one to fit, one to stop on); pass more text")
    every = max(2, int(round(1 / cfg.holdout)))
    held = np.arange(len(windows)) % every == every - 1
    if not held.any():
        held[-1] = True
    return windows[~held][:cfg.max_windows], windows[held]


def windows_wanted(cfg: MixSearchConfig) -> int:
    """Windows to cut from the texts so that training gets up to `max_windows` after the hold-out."""
    return int(np.ceil(cfg.max_windows / (1 - cfg.holdout)))


def search_h(soup, windows: np.ndarray, h0: np.ndarray, cfg: MixSearchConfig = MixSearchConfig()) -> tuple[np.ndarray, dict]:
    """The best h found from h0 on `windows` (N, T + 1) and the search's report."""
    soup.eval()
    for p in soup.parameters():
        p.requires_grad_(False)
    train, held = (torch.as_tensor(w, dtype=torch.long) for w in split_windows(windows, cfg))
    z = torch.log(torch.as_tensor(h0, dtype=torch.float32) + cfg.floor).requires_grad_(True)
    optim = torch.optim.Adam([z], lr=cfg.lr)
    start = torch.as_tensor(h0, dtype=torch.float32)
    start_train = _loss(soup, train, start, cfg.batch)
    best = {"step": 0, "held_out": _loss(soup, held, start, cfg.batch), "h": np.asarray(h0, dtype=np.float64)}
    start_held, history, since = best["held_out"], [], 0
    for step in range(1, cfg.steps + 1):
        optim.zero_grad()
        train_loss = _loss_grad(soup, train, torch.softmax(z, 0), cfg.batch)
        optim.step()
        h = torch.softmax(z.detach(), 0)
        held_loss = _loss(soup, held, h, cfg.batch)
        history.append({"step": step, "train": train_loss, "held_out": held_loss})
        if held_loss < best["held_out"]:
            best, since = {"step": step, "held_out": held_loss, "h": h.double().numpy()}, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    report = {"config": asdict(cfg), "train_windows": int(len(train)), "held_out_windows": int(len(held)),
              "held_out_loss_start": start_held, "held_out_loss_best": best["held_out"],
              "train_loss_start": start_train, "best_step": best["step"], "steps_run": len(history),
              "improved": best["step"] > 0, "history": history}
    return best["h"], report


def optimize_mix(ckpt: Path, start: Mix, texts: list[Path], cfg: MixSearchConfig = MixSearchConfig()) -> tuple[Mix, dict]:
    """The customer's mix after the search on their texts; the report goes in the manifest."""
    from soup_export.evaltext import from_texts
    from soup_train.checkpoint import load_soup, resolve_checkpoint
    from soup_train.textfiles import read_texts

    soup, info = load_soup(ckpt)
    length = min(cfg.window, info.run.data.seq_len or info.run.model.max_seq_len)  # the trained context
    try:
        windows = from_texts(read_texts(texts), resolve_checkpoint(ckpt) / "tokenizer.json", windows_wanted(cfg), length)
    except ParityError:
        raise MixError(f"--optimize-mix needs at least 2 windows of {length + 1} tokens of the customer's text; "
                       "pass more text") from None
    h, report = search_h(soup, windows, start.h, cfg)
    log.info("mix search: held-out loss %.4f -> %.4f (step %d of %d)", report["held_out_loss_start"],
             report["held_out_loss_best"], report["best_step"], report["steps_run"])
    report["start_weights"] = dict(zip(start.domains, start.weights))
    if not report["improved"]:
        return start, report  # no step beat the start on the held-out windows: keep it as it was
    given = {d: round(float(w), 6) for d, w in zip(start.domains, h) if w > 0}
    mix = validate(given, list(start.domains), f"optimized:{len(texts)} path(s) from {start.source}", start.name)
    return Mix(mix.domains, tuple(float(x) for x in h), given, False, mix.source, start.name), report
