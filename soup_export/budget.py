"""Stage 5, budget: predict every tier's bytes before writing, pick or check a tier, verify after.

The prediction is exact, not an estimate: the graph is a pure function of (architecture, plan),
so its serialized bytes are measured, and the external data size follows from the stored
shapes, dtypes and 64-byte alignment. Sizes: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from soup_export.errors import BudgetError
from soup_export.files import human
from soup_export.layout import DATA_FILE, MODEL_FILE, Arch
from soup_export.quantize import TIERS, make_plan

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'12MB' -> 12000000; '1.5 GiB', '800KB', '4096' also work."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise BudgetError(f"size {text!r} is not a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), "
                          "e.g. --max-size 12MB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise BudgetError(f"size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class Prediction:
    tier: str
    graph_bytes: int
    data_bytes: int
    tensors: tuple[tuple[str, int], ...]  # (initializer, bytes), largest first

    @property
    def total(self) -> int:
        return self.graph_bytes + self.data_bytes


def predict(arch: Arch, tier: str, params: dict | None = None) -> Prediction:
    from soup_export.graph import compile_graph

    model, g = compile_graph(arch, make_plan(tier, params))
    tensors = tuple(sorted(((s.name, s.nbytes) for s in g.stored), key=lambda x: -x[1]))
    return Prediction(tier, len(model), g.data_size(), tensors)


def predict_models(models: dict[str, Arch], tier: str, params: dict | None = None) -> Prediction:
    """Several models at one tier as one prediction (a SmallTalk mixture); tensors named `model/tensor`."""
    preds = {label: predict(arch, tier, params) for label, arch in models.items()}
    tensors = sorted(((f"{label}/{name}", n) for label, p in preds.items() for name, n in p.tensors), key=lambda x: -x[1])
    return Prediction(tier, sum(p.graph_bytes for p in preds.values()), sum(p.data_bytes for p in preds.values()),
                      tuple(tensors))


def choose_tier(arch: Arch | dict[str, Arch], quant: str, max_size: int | None,
                params: dict | None = None) -> tuple[str, dict[str, Prediction]]:
    """The requested tier (checked against the budget) or, for `auto`, the highest precision that fits.

    `arch` is one model, or {label: arch} for several models that share one tier and one budget."""
    def pred(tier: str, p: dict | None) -> Prediction:
        return predict_models(arch, tier, p) if isinstance(arch, dict) else predict(arch, tier, p)

    tiers = list(TIERS) if quant == "auto" else [quant]
    preds = {t: pred(t, params if quant != "auto" else None) for t in tiers}
    if max_size is None:
        return tiers[0], preds
    for t in tiers:
        if preds[t].total <= max_size:
            return t, preds
    smallest = min(preds.values(), key=lambda p: p.total)
    what = f"the {len(arch)} models of the mixture in " if isinstance(arch, dict) else ""
    raise BudgetError(f"no tier fits {what}{human(max_size)}: " + ", ".join(f"{t} {human(p.total)}" for t, p in preds.items())
                      + f". Smallest ({smallest.tier}) by tensor: " + breakdown(smallest)
                      + ". Raise --max-size, or train a smaller model (fewer layers, smaller vocabulary)")


def breakdown(pred: Prediction, top: int = 6) -> str:
    head = ", ".join(f"{name} {human(n)}" for name, n in pred.tensors[:top])
    rest = sum(n for _, n in pred.tensors[top:])
    return f"{head}, {len(pred.tensors) - top} more {human(rest)}, graph {human(pred.graph_bytes)}"


def actual_size(onnx_dir: Path) -> int:
    return sum((Path(onnx_dir) / f).stat().st_size for f in (MODEL_FILE, DATA_FILE))


def verify(onnx_dir: Path, predicted: int, max_size: int | None) -> dict:
    """Real bytes of model.onnx + data against the prediction and the budget."""
    actual = actual_size(onnx_dir)
    report = {"predicted": predicted, "actual": actual, "budget": max_size,
              "headroom": None if max_size is None else max_size - actual}
    if max_size is not None and actual > max_size:
        raise BudgetError(f"the written model is {human(actual)}, over the {human(max_size)} budget "
                          f"(predicted {human(predicted)}); this is a bug in the size prediction, please report it")
    return report
