"""`build` and `batch`: every stage, into a temporary directory beside the target, renamed at the end.

Layout of an export directory:
    manifest.json   the spec, mix, alpha, hashes, sizes, parity, versions
    onnx/           the shippable specialist: model.onnx, model.onnx.data, genai_config.json,
                    config.json, tokenizer files, generation_config.json
    hf/             the resolved dense model as a Hugging Face Llama directory (unless --no-hf)
A batch directory holds one such directory per customer plus `batch.json`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soup_export import budget as budget_mod
from soup_export import parity as P
from soup_export import stopping
from soup_export.errors import ExportInputError, MixError, OutputExistsError, OutputWriteError, ParityError
from soup_export.evaltext import from_data, from_texts, random_tokens, resolve_data_dir
from soup_export.manifest import write_manifest
from soup_export.mix import Mix
from soup_export.mobile import write_ort_format
from soup_export.emit import emit
from soup_export.graph import Arch
from soup_export.onnx_dir import dense_weights, graph_bytes, read_arch, write_onnx_dir
from soup_export.quantize import make_plan
from soup_export.resolve import Bank, checkpoint_ref, read_spec

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

    def to_dict(self) -> dict:
        return {"quant": self.quant, "quant_params": dict(self.quant_params), "max_size": self.max_size,
                "parity": self.parity, "parity_config": self.parity_cfg.to_dict(), "keep_hf": self.keep_hf,
                "eval_texts": [Path(t).name for t in self.eval_texts], "ort_format": self.ort_format,
                "verify_checkpoint": self.verify_checkpoint}


def check_output_path(out: Path, force: bool) -> Path:
    """The absolute output path, refusing what --force must never delete."""
    target = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target.parent == target:
        raise OutputExistsError(f"--out {out} is the current directory or one of its parents; "
                                "give a new directory name, e.g. --out exports/acme")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"--out {out} exists and is a file; choose a directory name")
    if target.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another --out")
    parent = next(p for p in target.parents if p.exists())  # where the staging directory will be made
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(f"--out {out}: {parent} is not writable by this user; choose another --out "
                               "or fix its permissions")
    return target


@contextmanager
def staged_output(out: Path, force: bool):
    """Yield a temporary directory beside `out`; only if the body succeeds, move any old `out`
    aside, rename the new one in, then delete the old one (never a half-replaced output)."""
    target = check_output_path(out, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        stopping.check()  # a stop asked for (even one whose exception was lost): nothing committed
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        if old.exists() and not target.exists():  # stopped between the two renames: the old output back
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def build(ckpt: Path | Bank, mix: Mix, out: Path, spec: ExportSpec = ExportSpec(), force: bool = False,
          extra: dict | None = None) -> dict:
    """Every stage for one mix; returns the manifest (`extra` fields are added to it, e.g. the mix search).
    `ckpt`: a checkpoint's path, or a checkpoint already opened (and verified, if the spec asks)."""
    bank = ckpt if isinstance(ckpt, Bank) else Bank.open(ckpt, spec.verify_checkpoint)
    with staged_output(out, force) as tmp:
        return export(bank, [mix], [tmp], spec, extras=[extra or {}])[0]


MIXES_PER_PASS = 32  # a pass holds one fused tensor per mix: memory grows with it, bank reads shrink


def batch(ckpt: Path, mixes: list[Mix], out: Path, spec: ExportSpec = ExportSpec(), force: bool = False,
          progress: bool = True, per_pass: int = MIXES_PER_PASS, link_shared: bool = True,
          shard: dict | None = None) -> list[dict]:
    """Many mixes: tensor-major passes over the bank (up to `per_pass` mixes each), the graph emitted once;
    with `link_shared`, the files alike for every customer are hard links (see `emit`). `shard` (which
    part of a customers file these mixes are, see `batchfile.Shard`) is recorded in batch.json."""
    names = [m.name for m in mixes]
    if len(set(names)) != len(names):
        raise MixError(f"customer names must be unique, got {', '.join(sorted(n for n in set(names) if names.count(n) > 1))} twice")
    with staged_output(out, force) as tmp:
        bank = Bank.open(ckpt, spec.verify_checkpoint)
        manifests = export(bank, mixes, [tmp / m.name for m in mixes], spec, progress, per_pass=per_pass,
                           link_shared=link_shared) if mixes else []  # a shard with no customers: batch.json only
        summary = [{"name": m["mix"]["name"], "tier": m["tier"], "bytes": m["size"]["actual"],
                    "weights": m["mix"]["weights"]} for m in manifests]
        (tmp / "batch.json").write_text(json.dumps({"checkpoint": checkpoint_ref(bank), "spec": spec.to_dict(),
                                                    "mixes_per_pass": per_pass, "link_shared": link_shared,
                                                    **({"shard": shard} if shard else {}),
                                                    "customers": summary}, indent=2) + "\n")
        return manifests


def export(bank: Bank, mixes: list[Mix], roots: list[Path], spec: ExportSpec, progress: bool = False,
           extras: list[dict] | None = None, per_pass: int = MIXES_PER_PASS, link_shared: bool = False) -> list[dict]:
    """budget -> graph -> (resolve + quantize, one pass over the bank per `per_pass` mixes) -> size check
    -> parity -> manifest, per root."""
    from tqdm import tqdm

    start = time.perf_counter()
    arch, tier, preds = preflight(bank, mixes, spec)
    params = dict(spec.quant_params)
    cache: dict = {}
    model_bytes, g = _graph(cache, arch, tier, params if spec.quant != "auto" else {})
    known = []  # per root: the files hashed as they were written
    for lo in range(0, len(mixes), per_pass):
        known += emit(bank, mixes[lo:lo + per_pass], roots[lo:lo + per_pass], g, model_bytes,
                      write_hf_weights=spec.keep_hf or spec.parity, progress=progress, link_shared=link_shared)
    shared_seconds = (time.perf_counter() - start) / len(mixes)
    manifests = []
    extras = extras or [{} for _ in mixes]
    for mix, root, extra, hashed in tqdm(list(zip(mixes, roots, extras, known)), desc="check", unit="mix",
                                         disable=not progress or not spec.parity):
        stopping.check()
        t0 = time.perf_counter()
        size = budget_mod.verify(root / "onnx", preds[tier].total, spec.max_size)
        mobile = write_ort_format(root / "onnx") if spec.ort_format else None
        if mobile is not None:
            mobile["within_budget"] = spec.max_size is None or mobile["bytes"] <= spec.max_size
        parity = run_parity(bank, mix, root / "hf", root / "onnx", tier, spec, cache) if spec.parity else {"skipped": True}
        if not spec.keep_hf:
            shutil.rmtree(root / "hf", ignore_errors=True)
        record = {"spec": {**spec.to_dict(), "mix_source": mix.source}, "mix": mix.to_dict(),
                  "alpha": read_spec(root / "onnx")["alpha"], "checkpoint": checkpoint_ref(bank), "tier": tier,
                  "quantization": g.storage(),
                  "size": {**size, "predicted_by_tier": {t: p.total for t, p in preds.items()}},
                  "parity": parity, **({"ort_format": mobile} if mobile else {}), **extra,
                  "seconds": round(shared_seconds + time.perf_counter() - t0, 3)}
        manifests.append(write_manifest(root, record, hashed))
    return manifests


def preflight(bank: Bank, mixes: list[Mix], spec: ExportSpec) -> tuple[Arch, str, dict]:
    """Everything an export needs that can be known before the bank is read, checked now (each a
    one-line error): the settings, a tier within the budget, and held-out text for parity (bad
    `--data` or `--eval-texts`, or none for a quantized tier's check (c)). Returns the architecture,
    the tier and every tier's predicted size."""
    from soup_export.native import check_settings

    check_settings()  # a wrong SOUP_NATIVE_READS fails now, not in the middle of a pass
    arch = Arch.from_hf(bank.info.run.model.to_hf())
    tier, preds = budget_mod.choose_tier(arch, spec.quant, spec.max_size, dict(spec.quant_params) or None)
    if spec.parity or spec.data or spec.eval_texts:
        for mix in mixes:
            _, source = eval_data(bank, mix, bank.path / "tokenizer.json", spec, arch)
            if spec.parity:
                check_held_out(source, tier)
    return arch, tier, preds


def _graph(cache: dict, arch, tier: str, params: dict):
    key = (arch, tier, tuple(sorted(params.items())))
    if key not in cache:
        cache[key] = graph_bytes(arch, make_plan(tier, params))
    return cache[key]


def run_parity(bank: Bank | None, mix: Mix, hf: Path, onnx_dir: Path, tier: str, spec: ExportSpec,
               cache: dict, scratch: Path | None = None) -> dict:
    """Stages (a)-(d); (a) needs the checkpoint (`bank`)."""
    arch, _ = read_arch(hf)
    windows, source = eval_data(bank, mix, hf / "tokenizer.json", spec, arch)
    report: dict = {"eval_source": source}
    if bank is not None:
        report["a_soup_vs_dense"] = P.soup_vs_dense(bank, mix.h, hf, windows[:2, :32], spec.parity_cfg.soup_tol)
    return {**report, **dense_parity(hf, onnx_dir, tier, windows, source, spec.parity_cfg, cache, scratch)}


def dense_parity(hf: Path, onnx_dir: Path, tier: str, windows: np.ndarray, source: str, cfg: P.ParityConfig,
                 cache: dict, scratch: Path | None = None) -> dict:
    """Stages (b)-(d) of any dense Llama (a specialist, a SmallTalk router or expert) on `windows`.

    The fp32 reference of a quantized tier is written to a scratch directory and removed."""
    arch, _ = read_arch(hf)
    fp32_dir, report = onnx_dir, {}
    scratch = scratch or onnx_dir.parent / ".fp32-reference"
    if tier != "fp32":
        model_bytes, g = _graph(cache, arch, "fp32", {})
        write_onnx_dir(scratch, model_bytes, g, dense_weights(hf), hf)
        fp32_dir = scratch
    try:
        report["b_torch_vs_onnx"] = P.torch_vs_onnx(hf, fp32_dir, windows[:2, :16], cfg.onnx_tol)
        if tier != "fp32":
            check_held_out(source, tier)
            report["c_quantized_vs_fp32"] = P.quantized_vs_fp32(fp32_dir, onnx_dir, tier, windows, cfg.max_dppl(tier))
        prompt = [int(t) for t in windows[0, :min(16, arch.max_pos // 2)]]
        report["d_greedy"] = P.greedy_match(hf, fp32_dir, prompt, cfg.greedy_tokens)
        if tier != "fp32":
            report["d_greedy"]["quantized"] = P.greedy_agreement(fp32_dir, onnx_dir, prompt, cfg.greedy_tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def check_held_out(source: str, tier: str) -> None:
    """Parity (c) of a quantized tier judges perplexity, which means nothing on random tokens."""
    if tier != "fp32" and source == "random tokens":
        raise ParityError(f"parity (c) of the {tier} tier needs held-out text, and none was found (the checkpoint's "
                          "data directory is not here): pass --eval-texts FILES or --data DIR (the prepared data "
                          "directory), or --no-parity")


def eval_data(bank: Bank | None, mix: Mix, tokenizer: Path, spec: ExportSpec, arch) -> tuple[np.ndarray, str]:
    """Held-out windows for parity: the customer's texts, the checkpoint's test split at h, or random tokens."""
    cfg = spec.parity_cfg
    length = min(cfg.window, arch.max_pos - 1)
    if spec.eval_texts:
        from soup_train.textfiles import read_texts

        texts = read_texts([Path(t) for t in spec.eval_texts])
        return from_texts(texts, tokenizer, cfg.eval_windows, length), f"texts:{len(texts)} files"
    view = bank.info.view if bank else "sources"
    data = resolve_data_dir(Path(spec.data) if spec.data else None, bank.info.run.data.path if bank else "",
                            list(mix.domains), view, arch.vocab)
    if data is not None:
        return from_data(data, view, mix.h, cfg.eval_windows, length), "data:test split at h"
    return random_tokens(arch.vocab, cfg.eval_windows, max(length, 16)), "random tokens"
