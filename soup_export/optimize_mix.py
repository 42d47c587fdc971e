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
tokens), full batch over at most 64 training windows. Holds one dense model and its gradient,
never the soup (`SoupObjective`): each step reads the bank twice, so on a bank larger than memory
a step costs about two reads of it from disk.
"""
from __future__ import annotations

import logging
import time
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


class SoupObjective:
    """The soup's next-token loss at h on windows, and its gradient in h, holding one dense model
    (and its gradient) in memory, never the soup: Theta(h) is instantiated with `combine` in one pass
    over the bank (`Bank.instantiate`, or an in-memory soup's tensors), run as the dense Llama, and
    the gradient reaches alpha by `soup_math.coefficient_grad` (a second pass: <E_j, dL/dTheta>),
    then h through the coefficient MLP. The last instantiation is kept, so a step's held-out loss
    and the next step's gradient share it: a step costs two passes over the bank."""

    def __init__(self, source) -> None:
        from soup_train.model.soup import SoupModel

        if isinstance(source, SoupModel):  # a soup in memory (small models, tests, reproductions)
            self.coef, self.skeleton = source.coef, source.shared
        else:  # an opened checkpoint (`Bank`): read through its map
            self.coef, self.skeleton = source.coefficient_mlp, source.skeleton()
        self.tensors = source.tensors  # (name, shared, experts), in either case
        for p in self.coef.parameters():
            p.requires_grad_(False)
        self.passes, self._h, self._theta = 0, None, {}

    def theta(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        from soup_train.model.soup_math import instantiate

        if self._h is None or not torch.equal(self._h, h):
            self._theta = {}  # the old one freed first: one dense model at a time
            with torch.no_grad():
                self._theta = instantiate(self.tensors(), self.coef(h))
            self._h, self.passes = h.detach().clone(), self.passes + 1
        return self._theta

    def loss(self, h: torch.Tensor, windows: torch.Tensor, batch: int) -> float:
        """Mean next-token loss over `windows` at h."""
        theta = self.theta(h.detach())
        with torch.no_grad():
            return sum(float(self._chunk_loss(theta, windows[i:i + batch], len(windows)))
                       for i in range(0, len(windows), batch))

    def loss_and_grad(self, h: torch.Tensor, windows: torch.Tensor, batch: int) -> float:
        """Mean next-token loss over `windows` at h (a tensor in the caller's autograd graph), and its
        gradient, accumulated into the leaves h comes from."""
        from soup_train.model.soup_math import coefficient_grad

        leaves = {k: v.detach().requires_grad_(True) for k, v in self.theta(h.detach()).items()}
        total = 0.0
        for i in range(0, len(windows), batch):
            loss = self._chunk_loss(leaves, windows[i:i + batch], len(windows))
            loss.backward()
            total += float(loss.detach())
        with torch.no_grad():
            grad_alpha = sum(coefficient_grad(experts, leaves[name].grad) for name, _, experts in self.tensors())
        self.passes += 1
        self.coef(h).backward(grad_alpha)
        return total

    def _chunk_loss(self, theta: dict, chunk: torch.Tensor, total: int) -> torch.Tensor:
        from soup_train.model.llama import lm_loss
        from soup_train.model.soup import dense_forward

        return lm_loss(dense_forward(self.skeleton, theta, chunk[:, :-1]), chunk[:, 1:]) * (len(chunk) / total)


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


def search_h(source, windows: np.ndarray, h0: np.ndarray, cfg: MixSearchConfig = MixSearchConfig()) -> tuple[np.ndarray, dict]:
    """The best h found from h0 on `windows` (N, T + 1) and the search's report. `source`: an opened
    checkpoint (`Bank`, read through its map: any size) or a `SoupModel` in memory."""
    started = time.perf_counter()
    objective = SoupObjective(source)
    train, held = (torch.as_tensor(w, dtype=torch.long) for w in split_windows(windows, cfg))
    z = torch.log(torch.as_tensor(h0, dtype=torch.float32) + cfg.floor).requires_grad_(True)
    optim = torch.optim.Adam([z], lr=cfg.lr)
    start = torch.as_tensor(h0, dtype=torch.float32)
    start_train = objective.loss(start, train, cfg.batch)
    best = {"step": 0, "held_out": objective.loss(start, held, cfg.batch), "h": np.asarray(h0, dtype=np.float64)}
    start_held, history, since = best["held_out"], [], 0
    for step in range(1, cfg.steps + 1):
        optim.zero_grad()
        train_loss = objective.loss_and_grad(torch.softmax(z, 0), train, cfg.batch)
        optim.step()
        h = torch.softmax(z.detach(), 0)
        held_loss = objective.loss(h, held, cfg.batch)
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
              "improved": best["step"] > 0, "history": history, "bank_passes": objective.passes,
              "seconds": round(time.perf_counter() - started, 3)}
    return best["h"], report


def optimize_mix(ckpt, start: Mix, texts: list[Path], cfg: MixSearchConfig = MixSearchConfig()) -> tuple[Mix, dict]:
    """The customer's mix after the search on their texts; the report goes in the manifest. `ckpt`: a
    checkpoint's path or an opened `Bank`."""
    from soup_export.evaltext import from_texts
    from soup_export.bank import Bank
    from soup_train.textfiles import read_texts

    bank = ckpt if isinstance(ckpt, Bank) else Bank.open(ckpt)
    run = bank.info.run
    length = min(cfg.window, run.data.seq_len or run.model.max_seq_len)  # the trained context
    try:
        windows = from_texts(read_texts(texts), bank.tokenizer, windows_wanted(cfg), length)
    except ParityError:
        raise MixError(f"--optimize-mix needs at least 2 windows of {length + 1} tokens of the customer's text; "
                       "pass more text") from None
    h, report = search_h(bank, windows, start.h, cfg)
    log.info("mix search: held-out loss %.4f -> %.4f (step %d of %d)", report["held_out_loss_start"],
             report["held_out_loss_best"], report["best_step"], report["steps_run"])
    report["start_weights"] = dict(zip(start.domains, start.weights))
    if not report["improved"]:
        return start, report  # no step beat the start on the held-out windows: keep it as it was
    given = {d: round(float(w), 6) for d, w in zip(start.domains, h) if w > 0}
    mix = validate(given, list(start.domains), f"optimized:{len(texts)} path(s) from {start.source}", start.name)
    return Mix(mix.domains, tuple(float(x) for x in h), given, False, mix.source, start.name), report
