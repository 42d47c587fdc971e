"""Choose the mix a customer's specialist ships with, on held-out windows of the customer's own text.

The customer's texts are cut once into windows spread over all of them (`evaltext.from_texts`) and
split once (every k-th window held out, `MixChoiceConfig.holdout`). Candidates:

    estimate   Algorithm 3's histogram of the texts over the checkpoint's centroids
    natural    the natural domain frequencies: the generic model
    uniform    every domain alike
    search     the mix search (`optimize_mix`) on the fitting windows, started from whichever of
               the three above has the lowest loss on them

Each candidate's loss is measured on the held-out windows, which neither the start nor the search
saw; `strategy` picks what ships: `best` (default) the lowest held-out loss, so the shipped
specialist is never worse than the generic model on held-out text; `estimate` or `search` that
candidate (with `estimate`, no search runs). Explicit weights are never changed: with evaluation texts they are compared with the
natural mix on all of those texts' windows (`compare_given`). The report (the manifest's
`mix_choice`) holds every candidate's held-out loss and perplexity, the chosen one, the gain over the
generic model with its standard error over windows, and the cost (passes over the bank, seconds).

Footguns: held-out windows come from the same files as the fitting ones (a strided split, so both
span every file); the histogram is taken over all the texts (it is not fitted to a loss). A
customer whose specialist does not beat the generic model gets a warning, not an error: their text
is probably outside the training domains.

Many customers (a `batch`) are chosen together: each candidate kind, and each search step, costs
one pass over the bank for all of them (`SoupObjective` instantiates every distinct h of a call in
one pass).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from soup_export.errors import MixError, ParityError
from soup_export.layout import MIX_CHOICE
from soup_export.mix import Mix, validate
from soup_export.optimize_mix import MixSearchConfig, SoupObjective, search_many, split_windows

log = logging.getLogger(__name__)

Strategy = Literal["best", "estimate", "search"]
STRATEGIES: tuple[str, ...] = ("best", "estimate", "search")
OUT_OF_DOMAIN = ("the specialist does not beat the generic model on the held-out part of the customer's text; "
                 "the text is probably outside the training domains")
GIVEN_LOSES = ("the given weights do not beat the generic model on the evaluation texts; the weights may not fit "
               "the text, or the text is outside the training domains")


# the search inside a choice: 16 training windows, at most 20 steps, patience 3 (forward and backward
# passes dominate the cost: docs/method.md, section 3)
CHOICE_SEARCH = MixSearchConfig(steps=20, patience=3, max_windows=16)


@dataclass(frozen=True)
class MixChoiceConfig:
    """How a mix is chosen from a customer's texts; recorded in the manifest's `mix_choice`."""

    strategy: Strategy = "best"  # best: the lowest held-out loss; estimate | search: that candidate
    holdout: float = 0.25  # share of the customer's windows that only scores the candidates
    windows: int = 64  # windows cut from the texts, spread over all of them (fitting + held out)
    window: int = 128  # tokens per window (capped by the model's trained context)
    batch: int = 16  # windows per forward pass
    search: MixSearchConfig = field(default_factory=lambda: CHOICE_SEARCH)  # the search on the fitting windows

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MixError(f"mix strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        if not 0 < self.holdout < 1:
            raise MixError(f"mix choice holdout {self.holdout} must be between 0 and 1 (a share of the windows)")


@dataclass(frozen=True)
class Customer:
    """A customer whose mix is chosen: the histogram estimate of their texts, and the texts."""

    estimate: Mix
    texts: tuple[Path, ...]


def customer_windows(bank, texts: list[Path], cfg: MixChoiceConfig) -> np.ndarray | None:
    """(N, T + 1) windows of the texts (None when they hold fewer than 2 windows)."""
    from soup_export.evaltext import from_texts
    from soup_train.textfiles import read_texts

    try:
        windows = from_texts(read_texts(list(texts)), bank.tokenizer, cfg.windows, window_tokens(bank, cfg))
    except ParityError:
        return None
    return windows if len(windows) >= 2 else None


def window_tokens(bank, cfg: MixChoiceConfig) -> int:
    run = bank.info.run
    return min(cfg.window, run.data.seq_len or run.model.max_seq_len)


def choose(bank, customers: list[Customer], cfg: MixChoiceConfig = MixChoiceConfig()) -> list[tuple[Mix, dict]]:
    """The mix each customer ships with and its report (the manifest's `mix_choice`), in order. A
    customer with too little text for two windows keeps the estimate (a warning; an error when the
    strategy is `search`)."""
    started = time.perf_counter()
    windows = [customer_windows(bank, c.texts, cfg) for c in customers]
    short = [c.estimate.name for c, w in zip(customers, windows) if w is None]
    if short and cfg.strategy == "search":
        raise MixError(f"the mix search needs at least 2 windows of {window_tokens(bank, cfg) + 1} tokens of text; "
                       f"{', '.join(short)} gave less: pass more text or --mix-strategy estimate")
    ready = [i for i, w in enumerate(windows) if w is not None]
    chosen = dict(zip(ready, choose_on_windows(bank, np.asarray(bank.info.natural, dtype=np.float64),
                                               [customers[i].estimate for i in ready], [windows[i] for i in ready],
                                               cfg)))
    seconds = round(time.perf_counter() - started, 3)
    out = []
    for i, customer in enumerate(customers):
        if i in chosen:
            chosen[i][1]["cost"]["seconds"] = seconds  # the texts' reading and cutting included
            out.append(chosen[i])
        else:
            out.append(_too_short(customer.estimate, cfg, {"bank_passes": 0, "seconds": seconds,
                                                           "customers": len(customers)}, window_tokens(bank, cfg)))
    return out


def choose_on_windows(source, natural: np.ndarray, estimates: list[Mix], windows: list[np.ndarray],
                      cfg: MixChoiceConfig = MixChoiceConfig()) -> list[tuple[Mix, dict]]:
    """`choose` on customers' windows (N_c, T + 1): `source` is an opened checkpoint (`Bank`) or a
    `SoupModel` in memory; `natural` the generic model's h. Every step is one pass over the bank for
    all the customers."""
    started = time.perf_counter()
    objective = SoupObjective(source)
    domains = list(estimates[0].domains) if estimates else []
    splits = dict(enumerate(split_windows(w, cfg.holdout, what="choosing the mix") for w in windows))
    fixed = {"natural": np.asarray(natural, dtype=np.float64), "uniform": np.full(len(domains), 1 / max(len(domains), 1))}
    cands = {i: {"estimate": e.h, **fixed} for i, e in enumerate(estimates)}
    search_cfg = replace(cfg.search, batch=cfg.batch)
    trains = {i: (split_windows(fit, search_cfg.holdout, search_cfg.max_windows)[0], held)  # the search's training windows
              for i, (fit, held) in splits.items()}
    scores = _score(objective, cands, trains, cfg)
    starts = {i: min(("estimate", "natural", "uniform"), key=lambda k: scores[i][k]["fit"]) for i in cands}
    found = {}
    if cfg.strategy != "estimate" and cands:  # `estimate` ships the estimate whatever a search finds: none runs
        found = dict(zip(cands, search_many(source, [splits[i][0] for i in cands], [cands[i][starts[i]] for i in cands],
                                            search_cfg, objective)))
        moved = [i for i, (_, report) in found.items() if report["improved"]]
        for i, (h, _) in found.items():
            cands[i]["search"] = h
            scores[i]["search"] = scores[i][starts[i]]  # the start itself, unless a step beat it: scored below
        searched = _score(objective, {i: {"search": cands[i]["search"]} for i in moved}, splits, cfg, fit=False)
        for i in moved:
            scores[i]["search"] = searched[i]["search"]
    cost = {"bank_passes": objective.passes, "seconds": round(time.perf_counter() - started, 3),
            "customers": len(estimates)}
    out = []
    for i, estimate in enumerate(estimates):
        search_report = ({"start": starts[i], **{k: v for k, v in found[i][1].items()
                                                 if k not in ("config", "history", "seconds", "customers")}}
                         if i in found else None)
        out.append(_decide(estimate, cands[i], scores[i], search_report, cfg, dict(cost), domains, len(splits[i][0])))
    return out


def compare_given(bank, mix: Mix, texts: list[Path], cfg: MixChoiceConfig = MixChoiceConfig()) -> dict:
    """The report of explicit weights (shipped unchanged) against the natural mix on every window of
    the evaluation texts."""
    started = time.perf_counter()
    windows = customer_windows(bank, texts, cfg)
    if windows is None:
        raise MixError(f"--eval-texts hold fewer than 2 windows of {window_tokens(bank, cfg) + 1} tokens; pass more text")
    objective = SoupObjective(bank)
    cands = {0: {"given": mix.h, "natural": np.asarray(bank.info.natural, dtype=np.float64)}}
    scores = _score(objective, cands, {0: (windows[:0], windows)}, cfg, fit=False)[0]
    cost = {"bank_passes": objective.passes, "seconds": round(time.perf_counter() - started, 3), "customers": 1}
    report = _report("given", cands[0], scores, cfg, cost, list(bank.info.domains), len(windows), 0)
    _warn(mix.name, report, GIVEN_LOSES)
    return report


def _score(objective: SoupObjective, cands: dict[int, dict[str, np.ndarray]], splits: dict, cfg: MixChoiceConfig,
           fit: bool = True) -> dict[int, dict[str, dict]]:
    """{customer: {candidate: {"held": per-window losses, "fit": mean fitting loss}}}: one pass over the
    bank per candidate kind for all the customers (identical h instantiated once)."""
    out = {i: {} for i in cands}
    kinds = sorted({k for c in cands.values() for k in c}, key=list(next(iter(cands.values()), {})).index)
    for kind in kinds:
        who = [i for i in cands if kind in cands[i]]
        distinct = {tuple(cands[i][kind]) for i in who}
        hs = {h: torch.as_tensor(h, dtype=torch.float32) for h in distinct}
        order = [hs[tuple(cands[i][kind])] for i in who]
        held = objective.window_losses(order, [torch.as_tensor(splits[i][1]) for i in who], cfg.batch)
        fitted = (objective.window_losses(order, [torch.as_tensor(splits[i][0]) for i in who], cfg.batch)
                  if fit else [None] * len(who))
        for i, hl, fl in zip(who, held, fitted):
            out[i][kind] = {"held": hl, "fit": float(fl.mean()) if fl is not None else None}
    return out


def _decide(estimate: Mix, cands: dict, scores: dict, search_report: dict | None, cfg: MixChoiceConfig,
            cost: dict, domains: list[str], fit_windows: int) -> tuple[Mix, dict]:
    held = {k: float(v["held"].mean()) for k, v in scores.items()}
    if cfg.strategy == "best":  # ties go to the earlier candidate: the estimate, then the generic model
        chosen = min((k for k in ("estimate", "natural", "uniform", "search") if k in held), key=lambda k: held[k])
    else:
        chosen = cfg.strategy
    report = _report(chosen, cands, scores, cfg, cost, domains, len(scores["natural"]["held"]), fit_windows)
    if search_report is not None:
        report["candidates"]["search"].update(search_report)
    _warn(estimate.name, report)
    given = {d: round(float(w), 6) for d, w in zip(domains, cands[chosen]) if w > 0}
    mix = validate(given, domains, f"{estimate.source} ({chosen})", estimate.name)
    return Mix(mix.domains, tuple(float(x) for x in cands[chosen]), given, False, mix.source, estimate.name), report


def _report(chosen: str, cands: dict, scores: dict, cfg: MixChoiceConfig, cost: dict, domains: list[str],
            held_windows: int, fit_windows: int) -> dict:
    """The manifest's `mix_choice`: each candidate's weights, held-out loss and perplexity, the chosen
    one and its gain over the generic model (natural mix) on the same windows."""
    candidates = {k: {"weights": {d: round(float(w), 6) for d, w in zip(domains, cands[k]) if w > 0},
                      "held_out_loss": float(v["held"].mean()), "held_out_ppl": math.exp(float(v["held"].mean())),
                      **({"fit_loss": v["fit"]} if v.get("fit") is not None else {})}
                  for k, v in scores.items()}
    return {"config": asdict(cfg), "chosen": chosen, "held_out_windows": held_windows, "fit_windows": fit_windows,
            "candidates": candidates, "gain_over_generic": gain(scores["natural"]["held"], scores[chosen]["held"]),
            "cost": cost}


def gain(generic: np.ndarray, chosen: np.ndarray) -> dict:
    """The chosen model's gain over the generic one on the same windows: the mean loss difference in
    nats and the relative perplexity reduction 1 - ppl_chosen / ppl_generic, each with its standard
    error over windows (the perplexity's by the delta method)."""
    d = np.asarray(generic) - np.asarray(chosen)  # (N,) > 0 where the chosen model is better
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None  # one window: none
    return {"loss": mean, "loss_se": se, "ppl": 1 - math.exp(-mean), "ppl_se": None if se is None else math.exp(-mean) * se,
            "beats_generic": mean > 0}


def _warn(name: str, report: dict, message: str = OUT_OF_DOMAIN) -> None:
    report["warning"] = None if report["gain_over_generic"]["beats_generic"] else message
    if report["warning"]:
        log.warning("%s: %s", name, message)


def _too_short(estimate: Mix, cfg: MixChoiceConfig, cost: dict, length: int) -> tuple[Mix, dict]:
    reason = (f"fewer than 2 windows of {length + 1} tokens of text: the estimate ships unscored; "
              "pass more text to compare it with the generic model")
    log.warning("%s: %s", estimate.name, reason)
    return estimate, {"config": asdict(cfg), "chosen": "estimate", "skipped": reason, "cost": cost,
                      "warning": reason}


def choose_for_mixes(bank, mixes: list[Mix], texts: dict[str, tuple[Path, ...]], eval_texts: tuple[str, ...],
                     cfg: MixChoiceConfig = MixChoiceConfig()) -> tuple[list[Mix], list[dict]]:
    """The mixes to ship and each one's manifest extra: customers with texts (`texts`, by name) get the
    mix chosen from them (all together); explicit weights stay as given and, with `eval_texts`, are
    compared with the natural mix on those texts."""
    by_texts = [i for i, m in enumerate(mixes) if m.name in texts]
    chosen = dict(zip(by_texts, choose(bank, [Customer(mixes[i], texts[mixes[i].name]) for i in by_texts], cfg)))
    shipped, extras = [], []
    for i, mix in enumerate(mixes):
        if i in chosen:
            shipped.append(chosen[i][0])
            extras.append({MIX_CHOICE: chosen[i][1]})
            continue
        shipped.append(mix)
        extras.append({MIX_CHOICE: compare_given(bank, mix, [Path(t) for t in eval_texts], cfg)} if eval_texts else {})
    return shipped, extras

