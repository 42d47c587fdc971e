"""One tensor-major pass from the bank to finished specialists (the path of `build` and `batch`).

For every weight, in the graph's storage order: read the shared tensor and its experts once,
fuse them for every mix (fp32: `soup_math.combine` for each mix when HF weights are written;
otherwise, for int4 matrices, the compiled kernel of `native`, which fuses and quantizes in one
pass, and for the rest `combine_many`, one matrix product per block of columns for all mixes), and
write the fused tensor to its HF `model.safetensors` (when asked) and its encoded form (the tier's storage) to its
`model.onnx.data` at the offset the graph already names. `model.onnx` is the same bytes for every
mix. No intermediate file is written and read back; peak memory is one bank tensor plus one
fused tensor per mix.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from soup_export import native
from soup_export.graph import DATA_FILE, DecoderGraph, _encode_one, rotary_table
from soup_export.mix import Mix
from soup_export.onnx_dir import MODEL_FILE, copy_side_files, write_runtime_configs
from soup_export.resolve import SPEC_FILE, Bank, checkpoint_ref, write_hf_files
from soup_export.stream import SafetensorsWriter
from soup_train.model.soup_math import combine_many


def weight_order(g: DecoderGraph) -> list[str]:
    """Dense weights in the order the graph stores them (each once)."""
    seen: dict[str, None] = {}
    for s in g.stored:
        if not s.weight.startswith("@"):
            seen.setdefault(s.weight, None)
    return list(seen)


def emit(bank: Bank, mixes: list[Mix], roots: list[Path], g: DecoderGraph, model_bytes: bytes,
         write_hf_weights: bool, progress: bool = False) -> None:
    """Write `root/onnx` for every mix, and `root/hf` (a complete HF directory) if `write_hf_weights`."""
    import torch

    order = weight_order(g)
    missing = sorted(set(bank.shapes) - set(order))
    assert not missing, f"the graph does not use {missing}"
    alphas = [bank.alpha(m.h) for m in mixes]
    hf_writers, data_files = [], []
    for i, (root, mix, alpha) in enumerate(zip(roots, mixes, alphas)):
        side = root / "hf" if write_hf_weights else root / "onnx"  # without HF weights, no hf/ at all
        side.mkdir(parents=True, exist_ok=True)
        (root / "onnx").mkdir(parents=True, exist_ok=True)
        if i == 0:
            write_hf_files(bank, side, "float32")
        else:  # the same config and tokenizer files for every customer
            copy_side_files(roots[0] / side.name, side)
        spec = {"mix": mix.to_dict(), "alpha": [float(a) for a in alpha], "checkpoint": checkpoint_ref(bank),
                "dtype": "float32"}
        (side / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        if write_hf_weights:
            specs = [(name, torch.float32, bank.shapes[name]) for name in order]
            hf_writers.append(SafetensorsWriter(root / "hf" / "model.safetensors", specs, {"format": "pt"}))
        (root / "onnx" / MODEL_FILE).write_bytes(model_bytes)
        data_files.append(open(root / "onnx" / f".{DATA_FILE}.tmp", "wb"))
    try:
        _write_weights(bank, g, order, alphas, hf_writers, data_files, progress)
        for w in hf_writers:
            w.close()
    except BaseException:
        for w in hf_writers:
            w.abort()
        raise
    finally:
        for fh in data_files:
            fh.close()
    for root in roots:
        (root / "onnx" / f".{DATA_FILE}.tmp").replace(root / "onnx" / DATA_FILE)
        if write_hf_weights:
            copy_side_files(root / "hf", root / "onnx")
        write_runtime_configs(root / "onnx", g)


def encode_mixes(fused: np.ndarray, s) -> list[dict[str, np.ndarray]]:
    """Each mix's block-quantized (nbits) form of one matrix, fused (mixes, rows, cols). Block
    quantization treats rows independently, so it runs once over every mix's rows (fewer,
    cache-sized steps) and is split per mix."""
    assert s.how.startswith("nbits") and fused.ndim == 3, (s.how, fused.shape)
    mixes, rows, cols = fused.shape
    if native.quantizes(s.rep, (rows, cols)):  # the compiled quantization: the same bytes, faster
        # one thread: between two of torch's matrix products, its OpenMP workers still spin on the
        # other core (two threads took a single build from 0.20 to 0.29 s; one, to 0.18-0.19 s)
        q, scales = native.quantize(fused.reshape(mixes * rows, cols), 1)
        q, scales = q.reshape(mixes, rows, *q.shape[1:]), scales.reshape(mixes, rows, -1)
        return [_native_parts(q, scales, m, s) for m in range(mixes)]
    enc = _encode_one(fused.reshape(mixes * rows, cols), s)
    return [{k: v[m * rows:(m + 1) * rows] for k, v in enc.items()} for m in range(mixes)]


def _native_parts(q: np.ndarray, scales: np.ndarray, m: int, s) -> dict[str, np.ndarray]:
    """Mix m's stored arrays from the native kernel's (mixes, rows, blocks, 16) bytes and scales."""
    return {"q": q[m].reshape(q.shape[1], -1) if s.how == "nbits-gather" else q[m], "scales": scales[m]}


class _TorchEncoder:
    """Mix m's stored arrays of one fused tensor (mixes, *shape). Block quantizations are made for
    every mix at once (small: a fraction of the fused bytes); other encodings one mix at a time, as
    the mixes are asked for in order (an fp32 copy of every mix would double a batch's memory)."""

    def __init__(self, fused) -> None:
        self.fused, self.batched, self.single, self.mix = fused, {}, {}, None

    def __call__(self, m: int, s) -> dict[str, np.ndarray]:
        key = (s.how, s.rep)
        if s.how.startswith("nbits") and self.fused.dim() == 3:
            if key not in self.batched:
                self.batched[key] = encode_mixes(self.fused.numpy(), s)
            return self.batched[key][m]
        if m != self.mix:
            self.single, self.mix = {}, m
        if key not in self.single:
            self.single[key] = _encode_one(self.fused[m].numpy(), s)
        return self.single[key]


def _write_weights(bank, g, order, alphas, hf_writers, data_files, progress) -> None:
    by_weight: dict[str, list] = {}
    for s, offset in zip(g.stored, g.offsets()):
        by_weight.setdefault(s.weight, []).append((s, offset))
    for fn in ("cos", "sin"):  # architecture-derived tables: the same bytes for every mix
        table = rotary_table(g.arch, fn)
        for s, offset in by_weight[f"@rotary.{fn}"]:
            for fh in data_files:
                fh.seek(offset)
                fh.write(table.tobytes())
    import torch

    workspace, coefs = bank.workspace(len(alphas), order), torch.stack(alphas).numpy()
    # With HF weights (parity, or no --no-hf), every mix is fused by `combine` itself: bit-identical to its
    # single build, so parity (a) compares the very weights a single build would ship (a batch's
    # other orders of summation moved the demo's logits by up to 1.05e-5, past the 1e-5 bound).
    exact = bool(hf_writers)
    for name, shared, experts in bank.tensors(order, progress):
        parts = by_weight[name]
        if not exact and all(native.applies(s.rep, tuple(shared.shape), experts) for s, _ in parts):
            # every mix fused and quantized in one compiled pass: no fp32 fused tensor at all
            q, scales = native.fuse_quantize(shared.numpy(), experts[0].numpy(), coefs, torch.get_num_threads())
            encoded = functools.partial(_native_parts, q, scales)
        else:
            fused = combine_many(shared, experts, alphas, workspace=workspace, exact=exact)  # (mixes, *shape)
            for writer, tensor in zip(hf_writers, fused):
                writer.write(name, tensor)
            encoded = _TorchEncoder(fused)
        for m, fh in enumerate(data_files):
            for s, offset in parts:
                arr = encoded(m, s)[s.part]
                assert arr.shape == s.shape and arr.dtype == s.dtype, s.name
                fh.seek(offset)
                fh.write(memoryview(np.ascontiguousarray(arr)))
    end = g.data_size()
    for fh in data_files:  # the file ends where the last tensor ends (alignment padding is zeros)
        fh.truncate(end)
