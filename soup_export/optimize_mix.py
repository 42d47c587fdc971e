"""Search the mix (beyond the paper): a few gradient steps on the domain weights h, no weight change.

Starting from a mix, h is parametrised as softmax(z) with z = log(h0 + floor), so it stays on the
simplex and a domain at weight 0 can still grow. Adam on z minimises the soup's loss at Theta(h)
(through the coefficient MLP; S, the experts and the MLP are frozen) on the customer's windows.
The windows given are split once: every k-th (`holdout`) is never trained on and picks the best
step; the search stops after `patience` steps without an improvement there. If no step beats the
start, the start is returned unchanged.

Many customers search in lockstep (`search_many`, the mix choice of a `batch`): each step
instantiates every active customer's Theta(h) in one pass over the bank and takes every gradient in
one more pass, so a step costs two passes over the bank for the whole batch, not two per customer.

Choices (each a field of `MixSearchConfig`): Adam, lr 0.3 on z, at most 40 steps, patience 5,
a quarter of the windows held out, floor 0.02 (a smaller floor saturates the softmax at a one-hot
start, and the search cannot leave it), full batch over at most 64 training windows. Holds one
dense model (and its gradient) per active customer, never the soup (`SoupObjective`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from soup_export.errors import MixError

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
    (and its gradient) per h asked for at once, never the soup: the Theta(h) of every h of a call are
    instantiated with `combine` in one pass over the bank (`Bank.tensors`, or an in-memory soup's
    tensors), run as the dense Llama, and the gradients reach alpha by `soup_math.coefficient_grad`
    (one more pass: <E_j, dL/dTheta> for every h), then h through the coefficient MLP. The last
    instantiations are kept, so a step's held-out loss and the next step's gradient share them.
    `passes` counts the passes over the bank."""

    def __init__(self, source) -> None:
        from soup_train.model.soup import SoupModel

        if isinstance(source, SoupModel):  # a soup in memory (small models, tests, reproductions)
            self.coef, self.skeleton = source.coef, source.shared
        else:  # an opened checkpoint (`Bank`): read through its map
            self.coef, self.skeleton = source.coefficient_mlp, source.skeleton()
        self.tensors = source.tensors  # (name, shared, experts), in either case
        for p in self.coef.parameters():
            p.requires_grad_(False)
        self.passes, self._kept = 0, []  # [(h, theta)] of the last call

    def thetas(self, hs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Theta(h) for every h (equal hs share one), the ones not kept from the last call instantiated
        in one pass over the bank."""
        from soup_train.model.soup_math import combine

        distinct: list[torch.Tensor] = []
        for h in hs:
            if not any(torch.equal(h, d) for d in distinct):
                distinct.append(h.detach().clone())
        kept = [next((t for k, t in self._kept if torch.equal(k, h)), None) for h in distinct]
        todo = [i for i, t in enumerate(kept) if t is None]
        self._kept = []  # the old ones freed first: only the models of this call are held
        if todo:
            with torch.no_grad():
                alphas = [self.coef(distinct[i]) for i in todo]
                fresh = [{} for _ in todo]
                for name, shared, experts in self.tensors():  # one pass, every h
                    for theta, alpha in zip(fresh, alphas):
                        theta[name] = combine(shared, experts, alpha)
            for i, theta in zip(todo, fresh):
                kept[i] = theta
            self.passes += 1
        self._kept = list(zip(distinct, kept))
        return [next(t for k, t in self._kept if torch.equal(k, h)) for h in hs]

    def window_losses(self, hs: list[torch.Tensor], windows: list[torch.Tensor], batch: int) -> list[np.ndarray]:
        """(N_c,) next-token loss of each window of customer c at hs[c], for every c."""
        from soup_train.model.llama import lm_loss
        from soup_train.model.soup import dense_forward

        out = []
        with torch.no_grad():
            for theta, w in zip(self.thetas([h.detach() for h in hs]), windows):
                rows = [lm_loss(dense_forward(self.skeleton, theta, w[i:i + batch, :-1]), w[i:i + batch, 1:], per_row=True)
                        for i in range(0, len(w), batch)]
                out.append(torch.cat(rows).double().numpy() if rows else np.zeros(0))
        return out

    def loss(self, h: torch.Tensor, windows: torch.Tensor, batch: int) -> float:
        """Mean next-token loss over `windows` at h."""
        return float(self.window_losses([h], [windows], batch)[0].mean())

    def losses_and_grads(self, hs: list[torch.Tensor], windows: list[torch.Tensor], batch: int) -> list[float]:
        """Mean next-token loss of customer c's windows at hs[c] (tensors in the callers' autograd
        graphs), for every c, and their gradients, accumulated into the leaves the hs come from."""
        from soup_train.model.soup_math import coefficient_grad

        thetas = self.thetas([h.detach() for h in hs])
        leaves = [{k: v.detach().requires_grad_(True) for k, v in theta.items()} for theta in thetas]
        totals = []
        for leaf, w in zip(leaves, windows):
            total = 0.0
            for i in range(0, len(w), batch):
                loss = self._chunk_loss(leaf, w[i:i + batch], len(w))
                loss.backward()
                total += float(loss.detach())
            totals.append(total)
        grads = [0.0 for _ in hs]
        with torch.no_grad():
            for name, _, experts in self.tensors():  # one pass, every h
                for c, leaf in enumerate(leaves):
                    grads[c] = grads[c] + coefficient_grad(experts, leaf[name].grad)
        self.passes += 1
        for h, grad in zip(hs, grads):
            self.coef(h).backward(grad)
        return totals

    def loss_and_grad(self, h: torch.Tensor, windows: torch.Tensor, batch: int) -> float:
        """`losses_and_grads` of one customer."""
        return self.losses_and_grads([h], [windows], batch)[0]

    def _chunk_loss(self, theta: dict, chunk: torch.Tensor, total: int) -> torch.Tensor:
        from soup_train.model.llama import lm_loss
        from soup_train.model.soup import dense_forward

        return lm_loss(dense_forward(self.skeleton, theta, chunk[:, :-1]), chunk[:, 1:]) * (len(chunk) / total)


def split_windows(windows: np.ndarray, holdout: float, keep: int | None = None,
                  what: str = "the mix search") -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out): every k-th window is held out (k = round(1 / holdout), at least 2; at least one
    window), so both parts span all the files; the kept part has at most `keep` windows."""
    if len(windows) < 2:
        raise MixError(f"{what} needs at least 2 windows of {windows.shape[1] if windows.ndim == 2 else '?'} "
                       "tokens of the customer's text (one to fit, one to score on); pass more text")
    every = max(2, int(round(1 / holdout)))
    held = np.arange(len(windows)) % every == every - 1
    if not held.any():
        held[-1] = True
    return windows[~held][:keep], windows[held]


def search_h(source, windows: np.ndarray, h0: np.ndarray, cfg: MixSearchConfig = MixSearchConfig()) -> tuple[np.ndarray, dict]:
    """The best h found from h0 on `windows` (N, T + 1) and the search's report. `source`: an opened
    checkpoint (`Bank`, read through its map: any size) or a `SoupModel` in memory."""
    return search_many(source, [windows], [h0], cfg)[0]


def search_many(source, windows: list[np.ndarray], h0s: list[np.ndarray], cfg: MixSearchConfig = MixSearchConfig(),
                objective: SoupObjective | None = None) -> list[tuple[np.ndarray, dict]]:
    """`search_h` for every customer c (windows[c] from h0s[c]) in lockstep: a step is two passes over
    the bank for all the customers still searching. `objective`: one to share (and count passes with)."""
    started = time.perf_counter()
    objective = objective or SoupObjective(source)
    passes0 = objective.passes
    parts = [split_windows(w, cfg.holdout, cfg.max_windows) for w in windows]
    train = [torch.as_tensor(t, dtype=torch.long) for t, _ in parts]
    held = [torch.as_tensor(h, dtype=torch.long) for _, h in parts]
    starts = [torch.as_tensor(h0, dtype=torch.float32) for h0 in h0s]
    z = [torch.log(s + cfg.floor).requires_grad_(True) for s in starts]
    optims = [torch.optim.Adam([zc], lr=cfg.lr) for zc in z]
    start_train = [float(x.mean()) for x in objective.window_losses(starts, train, cfg.batch)]
    start_held = [float(x.mean()) for x in objective.window_losses(starts, held, cfg.batch)]
    best = [{"step": 0, "held_out": s, "h": np.asarray(h0, dtype=np.float64)} for s, h0 in zip(start_held, h0s)]
    history, since, active = [[] for _ in h0s], [0] * len(h0s), list(range(len(h0s)))
    for step in range(1, cfg.steps + 1):
        if not active:
            break
        for c in active:
            optims[c].zero_grad()
        train_loss = objective.losses_and_grads([torch.softmax(z[c], 0) for c in active], [train[c] for c in active],
                                                cfg.batch)
        for c in active:
            optims[c].step()
        hs = [torch.softmax(z[c].detach(), 0) for c in active]
        held_loss = [float(x.mean()) for x in objective.window_losses(hs, [held[c] for c in active], cfg.batch)]
        for c, h, tl, hl in zip(list(active), hs, train_loss, held_loss):
            history[c].append({"step": step, "train": tl, "held_out": hl})
            if hl < best[c]["held_out"]:
                best[c], since[c] = {"step": step, "held_out": hl, "h": h.double().numpy()}, 0
            else:
                since[c] += 1
                if since[c] >= cfg.patience:
                    active.remove(c)
    seconds = round(time.perf_counter() - started, 3)
    return [(best[c]["h"], {"config": asdict(cfg), "train_windows": int(len(train[c])),
                            "held_out_windows": int(len(held[c])), "held_out_loss_start": start_held[c],
                            "held_out_loss_best": best[c]["held_out"], "train_loss_start": start_train[c],
                            "best_step": best[c]["step"], "steps_run": len(history[c]),
                            "improved": best[c]["step"] > 0, "history": history[c],
                            "bank_passes": objective.passes - passes0, "customers": len(h0s), "seconds": seconds})
            for c in range(len(h0s))]
