"""`soup-export compare`: each exported specialist against the generic model on its own mix.

For every export directory: held-out windows drawn from the data's test split at the export's
h (Algorithm 1, fixed seed), the loss of the shipped ONNX specialist (its quantized tier) and the
loss of the soup at the natural domain frequencies (the generic model, PyTorch) on the same
windows, plus the tier, bytes and dPPL recorded by parity, and the gain over the generic model on the
customer's own held-out text that the build measured when it chose the mix (`choose_mix`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from soup_export.evaltext import from_data
from soup_export.layout import onnx_dir, read_manifest
from soup_export.ort_model import OrtDecoder
from soup_export.parity import log_softmax, target_log_probs


def onnx_loss(model: OrtDecoder, windows: np.ndarray) -> float:
    total, n = 0.0, 0
    for row in windows:
        total -= target_log_probs(log_softmax(model.logits(row[None, :-1])[0]), row[1:]).sum()
        n += len(row) - 1
    return total / n


def dense_loss(skeleton, theta: dict, windows: np.ndarray) -> float:
    """Mean next-token loss of the dense model `theta` (a state dict) on `windows`."""
    from soup_train.model.llama import lm_loss
    from soup_train.model.soup import dense_forward

    x = torch.as_tensor(windows, dtype=torch.long)
    with torch.no_grad():
        return float(lm_loss(dense_forward(skeleton, theta, x[:, :-1]), x[:, 1:]))


def compare(exports: list[Path], ckpt: Path, data: Path, windows: int = 32, length: int = 128) -> list[dict]:
    """One row per export; the generic model (the soup at the natural frequencies) is instantiated
    once, in one pass over the bank (the model's size in memory, never the soup's)."""
    from soup_export.errors import ExportInputError
    from soup_export.bank import Bank

    bank = Bank.open(ckpt)
    info = bank.info
    generic = bank.instantiate(bank.alpha(np.asarray(info.natural)))
    skeleton = bank.skeleton()
    rows = []
    for export in exports:
        m = read_manifest(export)
        if m["checkpoint"]["model_sha256"] != bank.sha256:
            raise ExportInputError(f"{export} was built from another checkpoint than {ckpt} (SHA-256 differs); "
                                   "compare exports against the checkpoint they came from")
        h = np.asarray([m["mix"]["weights"][d] for d in info.domains])
        w = from_data(data, info.view, h, windows, length)
        c = m["parity"].get("c_quantized_vs_fp32", {})
        rows.append({"name": m["mix"]["name"], "mix": ", ".join(f"{d} {x:.2f}" for d, x in m["mix"]["weights"].items() if x >= 0.005),
                     "source": m["mix"]["source"], "tier": m["tier"], "bytes": m["size"]["actual"],
                     "dppl": c.get("dppl", 0.0), "specialist": onnx_loss(OrtDecoder(onnx_dir(export)), w),
                     "generic": dense_loss(skeleton, generic, w), "own_text": own_text_gain(m)})
    return rows


def own_text_gain(manifest: dict) -> str:
    """The build's gain over the generic model on the customer's held-out text, as a table cell."""
    from soup_export.layout import MIX_CHOICE

    choice = manifest.get(MIX_CHOICE)
    if not choice or "skipped" in choice:
        return "-"
    g = choice["gain_over_generic"]
    se = f" ± {100 * g['ppl_se']:.1f}%" if g["ppl_se"] is not None else ""
    return f"{100 * g['ppl']:+.1f}%{se} ({choice['chosen']}" + (")" if g["beats_generic"] else "; not better)")


def format_rows(rows: list[dict]) -> str:
    from soup_export.files import human

    lines = ["| customer | mix (from) | tier | bytes | dPPL vs fp32 | specialist loss | generic loss | gain | "
             "gain on own text (held-out) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = (r["generic"] - r["specialist"]) / r["generic"]
        dppl = "(reference)" if r["tier"] == "fp32" else f"{100 * r['dppl']:+.2f}%"
        lines.append(f"| {r['name']} | {r['mix']} ({r['source'].split(':')[0]}) | {r['tier']} | {human(r['bytes'])} | "
                     f"{dppl} | {r['specialist']:.4f} | {r['generic']:.4f} | {100 * gain:+.2f}% | {r.get('own_text', '-')} |")
    return "\n".join(lines)
