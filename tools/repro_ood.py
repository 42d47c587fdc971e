"""The out-of-domain table of `reproduce_soup.py`: specialists for customers whose text no training
domain was named after (`ood_customers`), chosen as `soup-export build --from-texts` chooses them.

For each customer: FIT_FILES files to build from and HELD_FILES other files held out. The mix is chosen
on the build files by the library (`choose_mix.choose`, every customer at once, as a `batch` does:
estimate, natural, uniform and the search, scored on its own held-out share of the build files),
then every candidate and the shipped mix are scored on the held-out files, which the choice never
saw: the soup in PyTorch (fp32, streamed from the bank), and the natural and shipped mixes also as
int8 ONNX exports (`soup-export build`) run in onnxruntime. Perplexity = exp(mean next-token NLL).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from ood_customers import CUSTOMERS, documents, split_files

FIT_FILES, HELD_FILES, EVAL_WINDOWS = 30, 10, 64
KINDS = ("natural", "estimate", "uniform", "search", "shipped")


def write_texts(directory: Path, texts: list[str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:02d}.txt" for i in range(len(texts))]
    for path, text in zip(paths, texts):
        path.write_text(text)
    return paths


def weights_h(weights: dict, domains: list[str]) -> np.ndarray:
    h = np.array([weights.get(d, 0.0) for d in domains])
    return h / h.sum()


def ood_rows(ckpt: Path, work: Path, cache: Path) -> tuple[list[dict], dict]:
    """One row per customer, and the choice's cost (all customers at once)."""
    import torch

    from soup_export.bank import Bank
    from soup_export.choose_mix import Customer, MixChoiceConfig, choose, gain, window_tokens
    from soup_export.evaltext import from_texts
    from soup_export.mix import mix_from_texts
    from soup_export.optimize_mix import SoupObjective

    bank = Bank.open(ckpt)
    domains, cfg = list(bank.info.domains), MixChoiceConfig()
    customers, held = [], []
    for c in CUSTOMERS:
        fit_docs, held_docs = split_files(documents(c, cache), FIT_FILES, HELD_FILES)
        paths = write_texts(work / "ood-texts" / c.name / "build", fit_docs)
        write_texts(work / "ood-texts" / c.name / "held-out", held_docs)
        customers.append(Customer(mix_from_texts(bank.path, paths, domains, bank.info.view, c.name), tuple(paths)))
        held.append(from_texts(held_docs, bank.tokenizer, EVAL_WINDOWS, window_tokens(bank, cfg)))
    chosen = choose(bank, customers, cfg)
    objective = SoupObjective(bank)
    rows = []
    for c, customer, (mix, report), windows in zip(CUSTOMERS, customers, chosen, held):
        hs = {"natural": np.asarray(bank.info.natural, dtype=np.float64), "estimate": customer.estimate.h,
              "uniform": np.full(len(domains), 1 / len(domains)),
              "search": weights_h(report["candidates"]["search"]["weights"], domains), "shipped": mix.h}
        w = torch.as_tensor(windows)
        per = dict(zip(KINDS, objective.window_losses([torch.as_tensor(hs[k], dtype=torch.float32) for k in KINDS],
                                                      [w] * len(KINDS), cfg.batch)))
        rows.append({"name": c.name, "kind": c.kind, "package": c.package, "chosen": report["chosen"],
                     "held_out_windows": len(windows), "weights": {k: hs[k].tolist() for k in KINDS},
                     **{k: float(v.mean()) for k, v in per.items()}, "gain": gain(per["natural"], per["shipped"]),
                     "build_choice": {k: v["held_out_loss"] for k, v in report["candidates"].items()},
                     **int8_losses(bank, domains, {"natural": hs["natural"], "shipped": mix.h}, windows)})
    return rows, chosen[0][1]["cost"]


def int8_losses(bank, domains: list[str], hs: dict[str, np.ndarray], windows: np.ndarray) -> dict:
    """int8 ONNX exports of these mixes (`soup-export build`, parity off), scored in onnxruntime."""
    from soup_export.build import ExportSpec, build
    from soup_export.compare import onnx_loss
    from soup_export.mix import validate
    from soup_export.ort_model import OrtDecoder

    out = {}
    with tempfile.TemporaryDirectory(prefix="soup-ood-") as tmp:
        for key, h in hs.items():
            mix = validate({d: float(x) for d, x in zip(domains, h) if x > 0}, domains)
            build(bank, mix, Path(tmp) / key, ExportSpec(quant="int8", parity=False, keep_hf=False))
            out[f"{key}_int8"] = onnx_loss(OrtDecoder(Path(tmp) / key / "onnx"), windows)
    return out


def ood_summary(rows: list[dict], cost: dict) -> dict:
    rel = [1 - math.exp(r["shipped"] - r["natural"]) for r in rows]  # perplexity reduction
    return {"shipped_beats_generic_fraction": float(np.mean([r["shipped"] < r["natural"] for r in rows])),
            "shipped_never_worse": bool(all(r["shipped"] <= r["natural"] for r in rows)),
            "mean_ppl_reduction": float(np.mean(rel)), "estimate_worse_than_generic": int(sum(r["estimate"] > r["natural"] for r in rows)),
            "int8_shipped_beats_generic": int(sum(r["shipped_int8"] < r["natural_int8"] for r in rows)),
            "customers": len(rows), "choice_cost": cost}


def ood_markdown(rows: list[dict], s: dict, ckpt: str) -> str:
    ppl = lambda x: math.exp(x)  # noqa: E731
    delta = lambda r, k: f"{ppl(r[k]):.1f} ({100 * (math.exp(r[k] - r['natural']) - 1):+.1f}%)"  # noqa: E731
    lines = ["## Out-of-domain customers", "",
             f"Checkpoint `{ckpt}`. Each customer: {FIT_FILES} files of a Debian package's text to build from, "
             f"{HELD_FILES} other files held out (up to {EVAL_WINDOWS} windows). The mix is chosen on the build files "
             "(`--mix-strategy best`); perplexities on the held-out files, soup in fp32 (change vs the natural mix), "
             "and int8 ONNX exports of the natural and shipped mixes.", "",
             "| customer | kind | package | natural (generic) | estimate | uniform | search | shipped (chosen) | "
             "shipped gain ± s.e. | int8 natural | int8 shipped |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["gain"]
        lines.append(f"| {r['name']} | {r['kind']} | {r['package']} | {ppl(r['natural']):.1f} | {delta(r, 'estimate')} | "
                     f"{delta(r, 'uniform')} | {delta(r, 'search')} | {delta(r, 'shipped')} {r['chosen']} | "
                     f"{100 * g['ppl']:+.2f}% ± {100 * g['ppl_se']:.2f}% | {ppl(r['natural_int8']):.1f} | "
                     f"{ppl(r['shipped_int8']):.1f} |")
    c = s["choice_cost"]
    lines += ["", f"Shipped never worse than the natural mix: {'yes' if s['shipped_never_worse'] else 'no'}; "
              f"beats it on {s['shipped_beats_generic_fraction']:.2f} of the customers; mean perplexity reduction "
              f"{100 * s['mean_ppl_reduction']:+.2f}% (target >= 3%). The estimate alone was worse than the natural mix "
              f"for {s['estimate_worse_than_generic']} of {s['customers']}. int8: shipped beats natural for "
              f"{s['int8_shipped_beats_generic']} of {s['customers']}. The choice for all {c['customers']} customers "
              f"at once: {c['bank_passes']} passes over the bank, {c['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"
