"""Reproduce the Soup-of-Experts claims at small scale, with the project's own training and export code.

Trains on the default corpus (`soup-train prepare --preset default`), every run with the same
tokens: a generic dense model of the instantiated size on the natural mix (`soup.n_experts=0`,
`meta.fixed_h` = natural frequencies), soups with n = 4 and n = 16 experts, and, for two
specialists only, a dense model trained on that specialist's mix (importance sampling: the
per-specialist run the soup avoids).

Two regimes (`--regime`):
- `capacity` (default): the default corpus tokenized with a 512-token vocabulary (prepared into
  `data/v512` on first use), a d64 x 2-layer model, 2500 steps of 32 sequences (10.2M tokens)
  as 4 micro-batches with their own h. The generic model is capacity-bound here, which is where
  the paper's claim lives; the small vocabulary keeps the output layer from dominating a step,
  so the five runs fit the time budget.
- `demo`: the `demo` preset (d96 x 3 layers, vocabulary 4096, 1200 steps of 16 sequences, 2.5M
  tokens) on `data/default`. Every model is still data-bound there, and the generic model wins.

Specialists: every named domain's test split, plus mixtures of two domains (weights that training
never fixed). For each, h is estimated from 32 of its test documents (at most half of them; Algorithm 3, the data's
embedder and centroids). The held-out loss (mean next-token NLL in nats) is measured on 64
windows of the specialist's other test documents, each domain's share by its weight, for: the
generic dense model, the soups at the estimated h, the n = 16 soup at the true h, at a wrong h (the true h rolled by half
the domains) and at the uniform h, the importance-sampled models where trained, the n = 16
soup's int8, int4 and asymmetric int4 (`--qparam symmetric=false`) ONNX exports (`soup-export
build`) run in onnxruntime, and the mix search (`optimize_mix.search_h`) started from the estimate on the
same 32 documents. Differences between models also get standard errors, over all held-out windows
and over the specialists, to show which differences stand above noise.

    python tools/reproduce_soup.py                       # the capacity regime, 30-37 minutes on 2 cores
    python tools/reproduce_soup.py --quick               # 150 steps: a smoke run, 2.5-4.5 minutes
    python tools/reproduce_soup.py --regime demo --out docs/results/soup-demo   # the data-bound regime
    python tools/reproduce_soup.py --seed 1 --out docs/results/soup-seed1       # another seed
    python tools/reproduce_soup.py --steps 5000 --runs generic,soup16 --out docs/results/soup-steps5000  # 2x tokens

Out-of-domain customers (`repro_ood`): text from Debian packages the corpus does not use (reference
prose, technical text, dialogue), the mix chosen as `soup-export build --from-texts` chooses it, scored
on held-out files against the natural mix (the generic model). On the n = 16 soup after the other
tables, or alone on any checkpoint with --ckpt:

    python tools/reproduce_soup.py --ckpt runs/demo --out docs/results/soup-ood   # about a minute

Writes OUT/soup.md (tables, the command and the commit), OUT/soup.json and the plots
OUT/loss.png, OUT/cost.png, OUT/alpha.png (with --ckpt: OUT/ood.md and OUT/ood.json). Runs are
kept in --work and reused. Last lines: `soup_beats_generic_fraction: <share of specialists where
the n=16 soup at estimated h has a lower loss than the generic dense model>` (not with --ckpt) and
`shipped_beats_generic_fraction: <share of out-of-domain customers whose shipped specialist has a
lower held-out loss than the natural mix>`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from repro_common import commit_of_repo, ensure_corpus  # tools/ is the script's directory, hence on sys.path
from repro_ood import ood_markdown, ood_rows, ood_summary

TEXTS_PER_SPECIALIST = 32
EVAL_WINDOWS = 64
PAIRS = 3  # two-domain specialists: (d0, d1), (d2, d3), ... with weights 0.5/0.5, 0.7/0.3, 0.5/0.5


# ----------------------------------------------------------------------------- training
def train(work: Path, name: str, base, overrides: list[str], progress: bool) -> tuple[Path, float]:
    """Fit (or reuse) one run; returns its directory and the seconds its training took."""
    import shutil

    from soup_train.config import apply_overrides, to_dict
    from soup_train.train import fit, resolve_config

    out = work / name
    timing = out / "timing.json"
    cfg = apply_overrides(base, overrides)
    if timing.is_file():
        saved = json.loads((out / "config.json").read_text())["run"]
        if saved == json.loads(json.dumps(to_dict(resolve_config(cfg)))):  # what fit saved: data-derived fields filled
            return out, json.loads(timing.read_text())["seconds"]
        print(f"   {out} was trained with another configuration: training it again", flush=True)
        shutil.rmtree(out)
    start = time.perf_counter()
    fit(cfg, out, progress=progress)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds, "overrides": overrides}) + "\n")
    return out, seconds


def weights_arg(h: np.ndarray) -> str:
    return ",".join(f"{x:.6f}" for x in h)


# ----------------------------------------------------------------------------- specialists
def specialists(data: Path, names: list[str]) -> list[dict]:
    """Every named domain, then PAIRS two-domain mixtures."""
    k = len(names)
    out = [{"name": n, "h": np.eye(k)[i]} for i, n in enumerate(names)]
    weights = [(0.5, 0.5), (0.7, 0.3), (0.5, 0.5)]
    for p in range(min(PAIRS, k // 2)):
        a, b = 2 * p, 2 * p + 1
        h = np.zeros(k)
        h[a], h[b] = weights[p]
        out.append({"name": f"{names[a]}+{names[b]}", "h": h})
    return out


def documents(data: Path, name: str) -> list[str]:
    path = data / "corpus" / "test" / f"{name}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def shares(h: np.ndarray, total: int) -> dict[int, int]:
    """How many of `total` items each domain of h contributes (at least 1 per domain in h)."""
    return {int(i): max(1, int(round(total * h[i]))) for i in np.flatnonzero(h)}


def split_documents(data: Path, name: str, wanted: int) -> tuple[list[str], list[str]]:
    """(the customer's texts, held-out documents) of one domain's test split: at most `wanted` texts
    and at most half the documents, so held-out text always remains."""
    docs = documents(data, name)
    take = min(wanted, len(docs) // 2)
    return docs[:take], docs[take:]


def specialist_texts(data: Path, names: list[str], h: np.ndarray) -> list[str]:
    """The customer's texts: up to 32 test documents of the specialist, each domain's share by its weight."""
    return [t for i, n in shares(h, TEXTS_PER_SPECIALIST).items() for t in split_documents(data, names[i], n)[0]]


def eval_windows(data: Path, names: list[str], h: np.ndarray, seq_len: int) -> np.ndarray:
    """Held-out windows of the specialist: its domains' test documents that `specialist_texts` did not
    take (so neither the estimate nor the mix search saw them), each domain's share by its weight."""
    from soup_export.evaltext import from_texts

    used = shares(h, TEXTS_PER_SPECIALIST)
    parts = [from_texts(split_documents(data, names[i], used[i])[1], data / "tokenizer.json", n, seq_len)
             for i, n in shares(h, EVAL_WINDOWS).items()]
    return np.concatenate(parts)


def wrong_h(h: np.ndarray) -> np.ndarray:
    return np.roll(h, len(h) // 2)


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    def __init__(self, runs: dict[str, Path], data: Path, seq_len: int) -> None:
        import torch

        from soup_train.checkpoint import load_soup

        self.torch = torch
        self.models = {name: load_soup(path)[0] for name, path in runs.items()}
        self.data, self.seq_len = data, seq_len

    def losses(self, model: str, windows: np.ndarray, h: np.ndarray) -> np.ndarray:
        """(N,) the loss of each window: their mean is the held-out loss, their spread its noise."""
        from soup_train.evaluate import window_losses

        return window_losses(self.models[model], windows, h, 16, self.seq_len, self.torch.device("cpu"))

    def loss(self, model: str, windows: np.ndarray, h: np.ndarray) -> float:
        return float(self.losses(model, windows, h).mean())

    def alpha(self, model: str, h: np.ndarray) -> list[float]:
        with self.torch.no_grad():
            return self.models[model].alpha(self.torch.as_tensor(h, dtype=self.torch.float32)).tolist()


EXPORTS = {"int8": ("int8", ()), "int4": ("int4", ()), "int4a": ("int4", (("symmetric", "false"),))}


def exported_losses(ckpt: Path, names: list[str], h: np.ndarray, windows: np.ndarray) -> dict:
    """int8, int4 and asymmetric int4 exports of the soup at h (`soup-export build`, parity off),
    scored in onnxruntime."""
    from soup_export.build import ExportSpec, build
    from soup_export.compare import onnx_loss
    from soup_export.mix import validate
    from soup_export.ort_model import OrtDecoder

    mix = validate({n: float(w) for n, w in zip(names, h) if w > 0}, names)
    out = {}
    with tempfile.TemporaryDirectory(prefix="soup-repro-") as tmp:
        for key, (tier, params) in EXPORTS.items():
            build(ckpt, mix, Path(tmp) / key, ExportSpec(quant=tier, quant_params=params, parity=False, keep_hf=False))
            out[key] = onnx_loss(OrtDecoder(Path(tmp) / key / "onnx"), windows)
    return out


def searched_h(ev: Evaluator, model: str, texts: list[str], tokenizer: Path, h0: np.ndarray) -> tuple[np.ndarray, dict]:
    from soup_export.evaltext import from_texts
    from soup_export.optimize_mix import MixSearchConfig, search_h

    cfg = MixSearchConfig()
    wanted = int(np.ceil(cfg.max_windows / (1 - cfg.holdout)))  # max_windows to train on after the search's hold-out
    windows = from_texts(texts, tokenizer, wanted, min(cfg.window, ev.seq_len))
    h, report = search_h(ev.models[model], windows, h0, cfg)
    return h, {k: v for k, v in report.items() if k != "history"}


def evaluate_specialist(ev: Evaluator, spec: dict, names: list[str], runs: dict[str, Path], is_runs: dict[str, str],
                        data: Path) -> dict:
    from soup_train.data.domains import DomainMap

    texts = specialist_texts(data, names, spec["h"])
    h_est = DomainMap.load(data).histogram(texts, "sources")
    windows = eval_windows(data, names, spec["h"], ev.seq_len)
    h_true, k = spec["h"], len(names)
    per_window = {"generic": ev.losses("generic", windows, h_true), "soup16_est": ev.losses("soup16", windows, h_est)}
    if "soup4" in runs:
        per_window["soup4_est"] = ev.losses("soup4", windows, h_est)
    row = {"name": spec["name"], "h_true": h_true.tolist(), "h_est": h_est.tolist(), "texts": len(texts),
           **{k: float(v.mean()) for k, v in per_window.items()},
           "per_window": {k: v.tolist() for k, v in per_window.items()},
           **({"soup4_true": ev.loss("soup4", windows, h_true)} if "soup4" in runs else {}),
           "soup16_true": ev.loss("soup16", windows, h_true),
           "soup16_wrong": ev.loss("soup16", windows, wrong_h(h_true)),
           "soup16_uniform": ev.loss("soup16", windows, np.full(k, 1.0 / k)),
           "alpha16_est": ev.alpha("soup16", h_est)}
    if is_runs.get(spec["name"]) in runs:
        row["importance_sampled"] = ev.loss(is_runs[spec["name"]], windows, h_true)
    row.update({f"soup16_{t}": v for t, v in exported_losses(runs["soup16"], names, h_est, windows).items()})
    h_opt, report = searched_h(ev, "soup16", texts, data / "tokenizer.json", h_est)
    row.update({"h_opt": h_opt.tolist(), "soup16_opt": ev.loss("soup16", windows, h_opt), "search": report})
    return row


# ----------------------------------------------------------------------------- report
def paired(rows: list[dict], a: str, b: str) -> tuple[float, float, float]:
    """The loss difference a - b (the same windows under both models) and two standard errors: over
    every window (evaluation noise alone; windows of one document are correlated, so it is small)
    and over the specialists' mean differences (how much the difference varies between customers)."""
    per = [np.subtract(r["per_window"][a], r["per_window"][b]) for r in rows]
    d, means = np.concatenate(per), np.array([p.mean() for p in per])
    se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
    return float(d.mean()), se(d), se(means)


def summary(rows: list[dict]) -> dict:
    rel = lambda a, b: (a - b) / b  # noqa: E731
    gen, est = np.array([r["generic"] for r in rows]), np.array([r["soup16_est"] for r in rows])
    with_n4 = all("soup4_est" in r for r in rows)
    n16_n4, n16_n4_se, n16_n4_se_spec = paired(rows, "soup16_est", "soup4_est") if with_n4 else (None,) * 3
    soup_gen, soup_gen_se, soup_gen_se_spec = paired(rows, "soup16_est", "generic")
    return {
        "soup_beats_generic_fraction": float((est < gen).mean()),
        "mean_relative_gain_vs_generic": float(np.mean((gen - est) / gen)),
        "wrong_worse_than_estimated_everywhere": bool(all(r["soup16_wrong"] > r["soup16_est"] for r in rows)),
        "n16_minus_n4_mean_loss": float(np.mean([r["soup16_est"] - r["soup4_est"] for r in rows])) if with_n4 else None,
        "n16_minus_n4_window_mean": n16_n4, "n16_minus_n4_window_se": n16_n4_se,
        "n16_minus_n4_specialist_se": n16_n4_se_spec,
        "soup16_minus_generic_window_mean": soup_gen, "soup16_minus_generic_window_se": soup_gen_se,
        "soup16_minus_generic_specialist_se": soup_gen_se_spec,
        "windows": int(sum(len(r["per_window"]["generic"]) for r in rows)),
        "max_estimated_vs_true_gap": float(max(rel(r["soup16_est"], r["soup16_true"]) for r in rows)),
        "max_int8_gap": float(max(abs(rel(r["soup16_int8"], r["soup16_est"])) for r in rows)),
        "max_int4_gap": float(max(abs(rel(r["soup16_int4"], r["soup16_est"])) for r in rows)),
        "max_int4_asym_gap": float(max(abs(rel(r["soup16_int4a"], r["soup16_est"])) for r in rows)),
        "search_beats_estimate": int(sum(r["soup16_opt"] < r["soup16_est"] for r in rows)),
        "specialists": len(rows),
    }


def markdown(rows: list[dict], s: dict, costs: dict, command: str, commit: str, steps: int, tokens: int,
             setup: str) -> str:
    cols = [("generic", "generic dense"), ("soup4_est", "soup n=4, est. h"), ("soup16_est", "soup n=16, est. h"),
            ("soup16_true", "n=16, true h"), ("soup16_wrong", "n=16, wrong h"), ("soup16_uniform", "n=16, uniform h"),
            ("importance_sampled", "importance-sampled dense"), ("soup16_int8", "n=16 int8 ONNX"),
            ("soup16_int4", "n=16 int4 ONNX"), ("soup16_int4a", "n=16 int4 asym. ONNX"), ("soup16_opt", "n=16, searched h")]
    lines = ["# Soup-of-Experts at small scale", "", f"Command: `{command}`  ", f"Commit: `{commit}`", "",
             f"{setup}. Every model trained for {steps} steps ({tokens:,} tokens). Held-out loss: mean next-token NLL "
             f"(nats) on {EVAL_WINDOWS} windows of each specialist's test documents; h estimated (Algorithm 3), and "
             f"searched, on up to {TEXTS_PER_SPECIALIST} other test documents of the specialist (at most half of them).", "",
             "| specialist | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[c]:.4f}" if c in r else "-" for c, _ in cols) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"{np.mean([r[c] for r in rows if c in r]):.4f}" if any(c in r for r in rows) else "-" for c, _ in cols) + " |")
    lines += ["", "| claim | target | measured |", "|---|---|---|",
              f"| soup at estimated h beats generic | >= 0.8 of specialists, mean gain >= 3% | "
              f"{s['soup_beats_generic_fraction']:.2f}, mean gain {100 * s['mean_relative_gain_vs_generic']:+.2f}% "
              f"({s['soup16_minus_generic_window_mean']:+.4f} nats ± {s['soup16_minus_generic_window_se']:.4f} over windows, "
              f"± {s['soup16_minus_generic_specialist_se']:.4f} over specialists) |",
              f"| wrong h worse than estimated h | every specialist | {'yes' if s['wrong_worse_than_estimated_everywhere'] else 'no'} |",
              (f"| n=16 better than n=4 | on average | mean loss difference {s['n16_minus_n4_mean_loss']:+.4f} "
               f"(± {s['n16_minus_n4_window_se']:.4f} over windows, ± {s['n16_minus_n4_specialist_se']:.4f} over "
               "specialists) |") if s["n16_minus_n4_mean_loss"] is not None else "| n=16 better than n=4 | on average | not trained (--runs) |",
              f"| estimated h close to true h | within 2% loss | worst {100 * s['max_estimated_vs_true_gap']:+.2f}% |",
              f"| int8 / int4 exports | within 0.5% / 3% of fp32 | worst {100 * s['max_int8_gap']:.2f}% / "
              f"{100 * s['max_int4_gap']:.2f}% (asymmetric int4: {100 * s['max_int4_asym_gap']:.2f}%) |",
              f"| searched h beats the estimate | (beyond the paper) | {s['search_beats_estimate']} of {s['specialists']} |",
              "", f"±: standard errors of a loss difference (the same windows under both models), over all {s['windows']} "
              "held-out windows (evaluation noise; windows of one document are correlated, so this one is small) and over "
              "the specialists' mean differences (how much it varies from customer to customer).",
              "", "Training seconds on this machine: " + ", ".join(f"{k} {v:.0f} s" for k, v in costs.items()) + "."]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], costs: dict, names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [("generic", "generic dense"), ("soup4_est", "soup n=4 (est. h)"), ("soup16_est", "soup n=16 (est. h)"),
              ("soup16_wrong", "n=16 wrong h"), ("soup16_int4", "n=16 int4 ONNX"), ("importance_sampled", "importance-sampled")]
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(models)
    x = np.arange(len(rows))
    for i, (key, label) in enumerate(models):
        ax.bar(x + i * width, [r.get(key, np.nan) for r in rows], width, label=label)
    ax.set_xticks(x + width * (len(models) - 1) / 2, [r["name"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="held-out loss (nats)", title="Held-out loss per specialist")
    lows = [min(r[k] for k, _ in models if k in r) for r in rows]
    ax.set_ylim(min(lows) * 0.9, max(r["soup16_wrong"] for r in rows) * 1.05)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    n = np.arange(1, len(rows) + 1)
    per_model = np.mean([v for k, v in costs.items() if k.startswith("importance")] or [np.nan])
    ax.plot(n, np.full(len(n), costs["soup16"]), "o-", label="soup n=16: one run serves all")
    ax.plot(n, per_model * n, "s-", label="one importance-sampled run per specialist")
    ax.plot(n, np.full(len(n), costs["generic"]), "--", label="generic dense (one run, no specialisation)")
    ax.set(xlabel="specialists served", ylabel="training seconds (2 CPU cores)", title="Training cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    alpha = np.array([r["alpha16_est"] for r in rows])
    im = ax.imshow(alpha, aspect="auto", cmap="coolwarm", vmin=-np.abs(alpha).max(), vmax=np.abs(alpha).max())
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.set(xlabel="expert j", title="alpha(h) of the n=16 soup at each specialist's estimated h")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=110)


RUNS = ("generic", "soup16", "soup4", "importance")  # importance: the two importance-sampled dense runs


@dataclass(frozen=True)
class Regime:
    """Where the reproduction trains: data (the default corpus at a vocabulary size) and the run
    overrides on the demo preset."""

    data: str
    vocab_size: int
    steps: int
    quick_steps: int
    overrides: tuple[str, ...] = ()


REGIMES = {
    "capacity": Regime("data/v512", 512, 2500, 150, ("model.d_model=64", "model.n_layers=2", "model.d_ff=192",
                                                     "train.batch_size=8")),
    "demo": Regime("data/default", 4096, 1200, 300),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=sorted(REGIMES), default="capacity",
                        help="capacity (default): a capacity-bound small model; demo: the demo preset")
    parser.add_argument("--data", type=Path, help="data directory (default: the regime's, prepared on first use)")
    parser.add_argument("--work", type=Path, default=Path("runs/reproduce-soup"), help="runs (kept; reused)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/soup"), help="table, plots and JSON")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 150 steps (capacity) or 300 (demo)")
    parser.add_argument("--steps", type=int, default=0, help="training steps of every run (overrides --quick)")
    parser.add_argument("--seed", type=int, default=0,
                        help="train.seed of every run (init, h stream, batches); runs of other seeds are kept apart")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"which runs to train and score, comma-separated, among {', '.join(RUNS)} (generic and "
                             "soup16 always): fewer for a longer training (e.g. --steps 5000 --runs generic,soup16)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, after the regime's, e.g. --set train.lr=3e-3 "
                             "(repeatable; pair it with its own --work so the default runs are kept)")
    parser.add_argument("--ckpt", type=Path, help="only the out-of-domain table, on this checkpoint (or run)")
    args = parser.parse_args()
    if args.ckpt:
        return ood_only(args)

    from soup_train.config import apply_overrides
    from soup_train.data.shards import DomainShards
    from soup_train.errors import SoupError
    from soup_train.presets import run_preset

    wanted = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not wanted <= set(RUNS):
        sys.exit(f"error: --runs {args.runs!r}: unknown {', '.join(sorted(wanted - set(RUNS)))}; choose among {', '.join(RUNS)}")
    regime = REGIMES[args.regime]
    args.data = args.data or Path(regime.data)
    steps = args.steps or (regime.quick_steps if args.quick else regime.steps)
    base = run_preset("demo")
    base = replace(base, data=replace(base.data, path=str(args.data)),
                      train=replace(base.train, steps=steps, eval_every=0, ckpt_every=steps, seed=args.seed,
                                    warmup_steps=min(base.train.warmup_steps, steps // 10)))
    try:
        base = apply_overrides(base, [*regime.overrides, *args.overrides])  # a bad --set fails before data prep
        ensure_corpus(args.data, regime.vocab_size, {r.vocab_size: name for name, r in REGIMES.items()})
    except SoupError as exc:
        sys.exit(f"error: {exc.message}")
    shards = DomainShards.open(args.data, "sources", "train")
    names, natural = shards.names, shards.natural()
    specs = specialists(args.data, names)
    is_targets = [specs[0], specs[len(names)]]  # one named domain and the first pair
    prefix = "" if args.regime == "demo" else f"{args.regime}-"  # the demo regime keeps its earlier run names
    work = args.work / (f"{prefix}steps{steps}" + (f"-seed{args.seed}" if args.seed else ""))
    progress = sys.stderr.isatty()
    try:
        runs, costs = {}, {}
        plan = [("generic", ["soup.n_experts=0", f"meta.fixed_h={weights_arg(natural)}"]),
                ("soup16", ["soup.n_experts=16"]), ("soup4", ["soup.n_experts=4"])]
        plan += [(f"importance-{i}", ["soup.n_experts=0", f"meta.fixed_h={weights_arg(s['h'])}"])
                 for i, s in enumerate(is_targets)]
        plan = [(name, o) for name, o in plan if name in {"generic", "soup16"} | wanted
                or (name.startswith("importance") and "importance" in wanted)]
        for name, overrides in plan:
            print(f"== train {name}: {' '.join(overrides)}", flush=True)
            runs[name], costs[name] = train(work, name, base, overrides, progress)
        ev = Evaluator(runs, args.data, int(json.loads((args.data / "data.json").read_text())["window"]) - 1)
        is_runs = {s["name"]: f"importance-{i}" for i, s in enumerate(is_targets)}
        rows = []
        for spec in specs:
            print(f"== evaluate {spec['name']}", flush=True)
            rows.append(evaluate_specialist(ev, spec, names, runs, is_runs, args.data))
    except SoupError as exc:
        sys.exit(f"error: {exc.message}")
    s = summary(rows)
    command = ("python tools/reproduce_soup.py " + " ".join(sys.argv[1:])).strip()
    tokens = steps * base.train.batch_size * base.train.grad_accum * ev.seq_len
    m = base.model
    setup = (f"Regime `{args.regime}`: d_model {m.d_model}, {m.n_layers} layers, d_ff {m.d_ff}, vocabulary "
             f"{regime.vocab_size}, {base.train.batch_size * base.train.grad_accum} sequences of {ev.seq_len} tokens "
             f"per step in {base.train.grad_accum} micro-batches" +
             (", each with its own h" if base.meta.h_per_micro_batch else ""))
    text = markdown(rows, s, costs, command, commit_of_repo(), steps, tokens, setup)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soup.md").write_text(text)
    (args.out / "soup.json").write_text(json.dumps({"summary": s, "costs": costs, "rows": rows}, indent=2) + "\n")
    plots(rows, costs, names, args.out)
    print(text)
    print(f"wrote {args.out}/soup.md, soup.json, loss.png, cost.png, alpha.png")
    print(f"soup_beats_generic_fraction: {s['soup_beats_generic_fraction']:.3f}")
    ood = out_of_domain(runs["soup16"], work, args.out, command)
    print(f"shipped_beats_generic_fraction: {ood['shipped_beats_generic_fraction']:.3f}")


def out_of_domain(ckpt: Path, work: Path, out: Path, command: str) -> dict:
    """The out-of-domain table on `ckpt`, written to OUT/ood.md and OUT/ood.json; returns its summary."""
    from soup_train.cli import CACHE
    from soup_train.errors import SoupError

    print(f"== out-of-domain customers on {ckpt}", flush=True)
    try:
        rows, cost = ood_rows(ckpt, work, CACHE)
    except SoupError as exc:
        sys.exit(f"error: {exc.message}")
    s = ood_summary(rows, cost)
    text = f"Command: `{command}`  \nCommit: `{commit_of_repo()}`\n\n" + ood_markdown(rows, s, str(ckpt))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.md").write_text(text)
    (out / "ood.json").write_text(json.dumps({"summary": s, "rows": rows}, indent=2) + "\n")
    print(text)
    print(f"wrote {out}/ood.md, ood.json")
    return s


def ood_only(args) -> None:
    command = ("python tools/reproduce_soup.py " + " ".join(sys.argv[1:])).strip()
    s = out_of_domain(args.ckpt, args.work / "ood", args.out, command)
    print(f"shipped_beats_generic_fraction: {s['shipped_beats_generic_fraction']:.3f}")


if __name__ == "__main__":
    main()
