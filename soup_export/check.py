"""Stage 6 run on an export: held-out text, the parity stages in order, and `soup-export check`.

`parity.py` defines each stage (a)-(d); this module feeds them: the held-out windows (the
customer's texts, the checkpoint's test split at h, or random tokens for an fp32 tier), the fp32
reference of a quantized tier (written by the engine into a scratch directory and removed), and,
for `soup-export check`, every file verified against the manifest before any stage runs.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from soup_export import parity as P
from soup_export.errors import ExportInputError, ParityError
from soup_export.evaltext import from_data, from_texts, random_tokens, resolve_data_dir
from soup_export.layout import HF_CONFIG, TOKENIZER, Arch, hf_dir, onnx_dir, read_arch, read_manifest, read_spec, read_tier, \
    spec_mix, verify_files


def held_out(bank, mix, tokenizer: Path, spec, arch: Arch) -> tuple[np.ndarray, str]:
    """Held-out windows for parity and their source: the customer's texts (`spec.eval_texts`), the
    checkpoint's test split at h, or random tokens."""
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


def check_held_out(source: str, tier: str) -> None:
    """Parity (c) of a quantized tier judges perplexity, which means nothing on random tokens."""
    if tier != "fp32" and source == "random tokens":
        raise ParityError(f"parity (c) of the {tier} tier needs held-out text, and none was found (the checkpoint's "
                          "data directory is not here): pass --eval-texts FILES or --data DIR (the prepared data "
                          "directory), or --no-parity")


def parity(bank, h, hf: Path, onnx: Path, arch: Arch, tier: str, windows: np.ndarray, source: str,
           cfg: P.ParityConfig, settings=None, scratch: Path | None = None) -> dict:
    """Stages (a)-(d) of a specialist; (a) needs the checkpoint (`bank`, None: skipped)."""
    report: dict = {"eval_source": source}
    if bank is not None:
        report["a_soup_vs_dense"] = P.soup_vs_dense(bank, h, hf, windows[:2, :32], cfg.soup_tol)
    return {**report, **dense_parity(hf, onnx, arch, tier, windows, source, cfg, settings, scratch)}


def dense_parity(hf: Path, onnx: Path, arch: Arch, tier: str, windows: np.ndarray, source: str, cfg: P.ParityConfig,
                 settings=None, scratch: Path | None = None) -> dict:
    """Stages (b)-(d) of any dense Llama (a specialist, a SmallTalk router or expert) on `windows`.
    The fp32 reference of a quantized tier is written to a scratch directory and removed."""
    from soup_export.compile import write_tier

    fp32_dir, report = onnx, {}
    scratch = scratch or Path(onnx).parent / ".fp32-reference"
    if tier != "fp32":
        fp32_dir = write_tier(hf, scratch, "fp32", settings=settings, arch=arch)
    try:
        report["b_torch_vs_onnx"] = P.torch_vs_onnx(hf, fp32_dir, windows[:2, :16], cfg.onnx_tol)
        if tier != "fp32":
            check_held_out(source, tier)
            report["c_quantized_vs_fp32"] = P.quantized_vs_fp32(fp32_dir, onnx, tier, windows, cfg.max_dppl(tier))
        prompt = [int(t) for t in windows[0, :min(16, arch.max_pos // 2)]]
        report["d_greedy"] = P.greedy_match(hf, fp32_dir, prompt, cfg.greedy_tokens)
        if tier != "fp32":
            report["d_greedy"]["quantized"] = P.greedy_agreement(fp32_dir, onnx, prompt, cfg.greedy_tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def check_export(export_dir: Path, ckpt: Path | None, data: Path | None, eval_texts: tuple[Path, ...],
                 verify_checkpoint: bool = False) -> dict:
    """`soup-export check`: every file against the manifest (a mismatch names the file), then the
    parity stages on the export's hf/ and onnx/ (stage (a) only with the checkpoint)."""
    from soup_export.bank import Bank
    from soup_export.build import ExportSpec

    root = Path(export_dir)
    verified = verify_files(root, read_manifest(root))
    hf, onnx = hf_dir(root), onnx_dir(root)
    if not (hf / HF_CONFIG).is_file():
        raise ExportInputError(f"{export_dir} has no hf/ directory (built with --no-hf?); parity needs the resolved "
                               "model: rebuild without --no-hf")
    tier = read_tier(onnx)
    spec = read_spec(hf)
    mix = spec_mix(spec)
    bank = Bank.open(ckpt, verify_checkpoint) if ckpt else None
    if bank is not None and bank.sha256 != spec["checkpoint"]["model_sha256"]:
        raise ExportInputError(f"{ckpt} is not the checkpoint this export was built from (SHA-256 differs)")
    export_spec = ExportSpec(data=str(data) if data else None, eval_texts=tuple(str(t) for t in eval_texts))
    arch = read_arch(hf)[0]
    windows, source = held_out(bank, mix, hf / TOKENIZER, export_spec, arch)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".check-") as scratch:
        report = parity(bank, mix.h, hf, onnx, arch, tier, windows, source, export_spec.parity_cfg,
                        export_spec.engine, Path(scratch) / "fp32")
    return {"tier": tier, "files_verified": verified, **report}
