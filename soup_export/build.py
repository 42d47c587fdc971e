"""`build` and `batch`: the stages composed, data moving forward only, into a staged output.

    preflight   the tier within the budget, the graph, the held-out windows (once per customer)
    pass        `engine.run_pass`: bank -> every customer's onnx/ (and hf/), one pass per
                `per_pass` customers (alpha computed once, kept in memory)
    size        the written bytes against the prediction and the budget
    parity      stages (a)-(d) on the windows of the preflight (`check.parity`)
    manifest    `layout.write_manifest`, with the spec, the engine settings and the files' hashes

The export directory's layout is `layout`'s (its docstring shows it); a batch directory holds one
export directory per customer and `batch.json`.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soup_export import budget as budget_mod
from soup_export import parity as P
from soup_export import stopping
from soup_export.bank import Bank, checkpoint_ref
from soup_export.check import check_held_out, held_out, parity
from soup_export.engine import EngineSettings, Job, Output, run_pass
from soup_export.errors import MixError
from soup_export.graph import DecoderGraph, compile_graph
from soup_export.layout import BATCH_FILE, MIX_CHOICE, Arch, hf_dir, hf_side_files, json_bytes, onnx_dir, spec_bytes, \
    write_manifest
from soup_export.mix import Mix
from soup_export.mobile import write_ort_format
from soup_export.output import staged_output
from soup_export.quantize import make_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSpec:
    """How to compile a mix (everything but the mix itself); recorded in the manifest."""

    quant: str = "auto"  # auto | fp32 | fp16 | int8 | mixed | int4
    quant_params: tuple[tuple[str, str], ...] = ()  # declared quantizer parameters, e.g. (("block_size", "64"),)
    max_size: int | None = None  # bytes of model.onnx + model.onnx.data
    parity: bool = True  # run stages (a)-(d)
    parity_cfg: P.ParityConfig = field(default_factory=P.ParityConfig)
    keep_hf: bool = True  # keep the resolved HF directory next to the ONNX one
    data: str | None = None  # data directory for held-out text (default: the checkpoint's, if present)
    eval_texts: tuple[str, ...] = ()  # the customer's own texts for parity (c)
    ort_format: bool = False  # also write model.ort for onnxruntime mobile, with its usability report
    verify_checkpoint: bool = False  # hash the bank and compare with the SHA-256 recorded when it was written
    engine: EngineSettings = field(default_factory=EngineSettings.from_env)  # recorded as the manifest's "engine"

    def to_dict(self) -> dict:
        return {"quant": self.quant, "quant_params": dict(self.quant_params), "max_size": self.max_size,
                "parity": self.parity, "parity_config": self.parity_cfg.to_dict(), "keep_hf": self.keep_hf,
                "eval_texts": [Path(t).name for t in self.eval_texts], "ort_format": self.ort_format,
                "verify_checkpoint": self.verify_checkpoint}


def build(ckpt: Path | Bank, mix: Mix, out: Path, spec: ExportSpec | None = None, force: bool = False,
          extra: dict | None = None) -> dict:
    """Every stage for one mix; returns the manifest (`extra` fields are added to it, e.g. the mix search).
    `ckpt`: a checkpoint's path, or a checkpoint already opened (and verified, if the spec asks)."""
    spec = spec or ExportSpec()
    bank = ckpt if isinstance(ckpt, Bank) else Bank.open(ckpt, spec.verify_checkpoint)
    with staged_output(out, force) as tmp:
        return export(bank, [mix], [tmp], spec, extras=[extra or {}])[0]


MIXES_PER_PASS = 32  # a pass holds one fused tensor per mix: memory grows with it, bank reads shrink


def batch(ckpt: Path | Bank, mixes: list[Mix], out: Path, spec: ExportSpec | None = None, force: bool = False,
          progress: bool = True, per_pass: int = MIXES_PER_PASS, link_shared: bool = True,
          shard: dict | None = None, extras: list[dict] | None = None) -> list[dict]:
    """Many mixes: tensor-major passes over the bank (up to `per_pass` mixes each), the graph emitted once;
    with `link_shared`, the files alike for every customer are hard links (see `engine.fast`). `shard`
    (which part of a customers file these mixes are, see `batchfile.Shard`) is recorded in batch.json;
    `extras[m]` is added to mix m's manifest (e.g. its mix choice)."""
    spec = spec or ExportSpec()
    names = [m.name for m in mixes]
    if len(set(names)) != len(names):
        raise MixError(f"customer names must be unique, got {', '.join(sorted(n for n in set(names) if names.count(n) > 1))} twice")
    with staged_output(out, force) as tmp:
        bank = ckpt if isinstance(ckpt, Bank) else Bank.open(ckpt, spec.verify_checkpoint)
        manifests = export(bank, mixes, [tmp / m.name for m in mixes], spec, progress, extras=extras,
                           per_pass=per_pass, link_shared=link_shared) if mixes else []  # a shard with no customers: batch.json only
        summary = [{"name": m["mix"]["name"], "tier": m["tier"], "bytes": m["size"]["actual"],
                    "weights": m["mix"]["weights"], **choice_summary(m)} for m in manifests]
        (tmp / BATCH_FILE).write_bytes(json_bytes({"checkpoint": checkpoint_ref(bank), "spec": spec.to_dict(),
                                                   "engine": spec.engine.to_dict(), "mixes_per_pass": per_pass,
                                                   "link_shared": link_shared, **({"shard": shard} if shard else {}),
                                                   "customers": summary}))
        return manifests


def choice_summary(manifest: dict) -> dict:
    """What batch.json records of a customer's mix choice: the chosen candidate and its gain."""
    choice = manifest.get(MIX_CHOICE)
    if not choice or "skipped" in choice:
        return {}
    return {MIX_CHOICE: {"chosen": choice["chosen"], "gain_over_generic": choice["gain_over_generic"]}}


@dataclass(frozen=True)
class Plan:
    """What an export knows before it reads the bank (`preflight`)."""

    arch: Arch
    tier: str
    predictions: dict  # tier -> budget.Prediction
    graph: tuple[bytes, DecoderGraph]
    held_out: list[tuple[np.ndarray, str] | None]  # per mix: (windows, source), None without parity


def preflight(bank: Bank, mixes: list[Mix], spec: ExportSpec) -> Plan:
    """Everything an export needs that can be known before the bank is read, checked now (each a
    one-line error): a tier within the budget, its graph, and held-out text for parity (bad `--data`
    or `--eval-texts`, or none for a quantized tier's check (c))."""
    arch = Arch.from_hf(bank.info.run.model.to_hf())
    params = dict(spec.quant_params)
    tier, preds = budget_mod.choose_tier(arch, spec.quant, spec.max_size, params or None)
    graph = compile_graph(arch, make_plan(tier, params if spec.quant != "auto" else {}))
    windows: list = [None] * len(mixes)
    if spec.parity or spec.data or spec.eval_texts:
        windows = [held_out(bank, mix, bank.tokenizer, spec, arch) for mix in mixes]
        for _, source in windows if spec.parity else ():
            check_held_out(source, tier)
    return Plan(arch, tier, preds, graph, windows)


def export(bank: Bank, mixes: list[Mix], roots: list[Path], spec: ExportSpec, progress: bool = False,
           extras: list[dict] | None = None, per_pass: int = MIXES_PER_PASS, link_shared: bool = False) -> list[dict]:
    """preflight -> pass (one per `per_pass` mixes) -> size -> parity -> manifest, per root."""
    from tqdm import tqdm

    start = time.perf_counter()
    plan = preflight(bank, mixes, spec)
    alphas = [bank.alpha(m.h) for m in mixes]
    ref = checkpoint_ref(bank)
    job = Job(plan.graph, hf_side_files(bank.info.run.model, bank.tokenizer, "float32"),
              write_hf=spec.keep_hf or spec.parity, link_shared=link_shared)
    outputs = [Output(root, alpha, spec_bytes(mix, alpha, ref, "float32")) for root, mix, alpha in zip(roots, mixes, alphas)]
    known, used = [], {}
    for lo in range(0, len(mixes), per_pass):
        result = run_pass(bank, job, outputs[lo:lo + per_pass], spec.engine, progress)
        known += result.known
        used = result.used
    shared_seconds = (time.perf_counter() - start) / len(mixes)
    manifests = []
    extras = extras or [{} for _ in mixes]
    rows = list(zip(mixes, roots, alphas, extras, known, plan.held_out))
    for mix, root, alpha, extra, hashed, windows in tqdm(rows, desc="check", unit="mix",
                                                        disable=not progress or not spec.parity):
        stopping.check()
        t0 = time.perf_counter()
        size = budget_mod.verify(onnx_dir(root), plan.predictions[plan.tier].total, spec.max_size)
        mobile = write_ort_format(onnx_dir(root)) if spec.ort_format else None
        if mobile is not None:
            mobile["within_budget"] = spec.max_size is None or mobile["bytes"] <= spec.max_size
        report = parity(bank, mix.h, hf_dir(root), onnx_dir(root), plan.arch, plan.tier, *windows, spec.parity_cfg,
                        spec.engine) if spec.parity else {"skipped": True}
        if not spec.keep_hf:
            shutil.rmtree(hf_dir(root), ignore_errors=True)
        record = {"spec": {**spec.to_dict(), "mix_source": mix.source}, "mix": mix.to_dict(),
                  "alpha": [float(a) for a in alpha], "checkpoint": ref, "tier": plan.tier,
                  "quantization": plan.graph[1].storage(),
                  "size": {**size, "predicted_by_tier": {t: p.total for t, p in plan.predictions.items()}},
                  "parity": report, **({"ort_format": mobile} if mobile else {}), "engine": used, **extra,
                  "seconds": round(shared_seconds + time.perf_counter() - t0, 3)}
        manifests.append(write_manifest(root, record, hashed))
    return manifests
