"""One tensor-major pass from the bank to finished specialists (the path of `build` and `batch`).

For every weight, in the graph's storage order: read the shared tensor and its experts once,
fuse them for every mix (fp32: `soup_math.combine` for each mix when HF weights are written;
otherwise, for int4 matrices, the compiled kernel of `native`, which fuses and quantizes in one
pass, and for the rest `combine_many`, one matrix product per block of columns for all mixes), and
write the fused tensor to its HF `model.safetensors` (when asked) and its encoded form (the tier's storage) to its
`model.onnx.data` at the offset the graph already names. `model.onnx` is the same bytes for every
mix. No intermediate file is written and read back; peak memory is one bank tensor plus one
fused tensor per mix (on the kernel path, the int4 outputs of up to three tensors: one being
fused, two waiting for the writer).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from soup_export import native
from soup_export.datafile import HashedDataFile
from soup_export.graph import DATA_FILE, DecoderGraph, _encode_one, rotary_table
from soup_export.mix import Mix
from soup_export.onnx_dir import MODEL_FILE, runtime_configs, write_files
from soup_export.resolve import SPEC_FILE, Bank, checkpoint_ref, hf_side_files
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
         write_hf_weights: bool, progress: bool = False) -> list[dict[str, tuple[str, int]]]:
    """Write `root/onnx` for every mix, and `root/hf` (a complete HF directory) if `write_hf_weights`.
    The roots are staged directories (renamed into place once the whole export succeeded), so every
    file is written under its final name.
    Returns, per root, the SHA-256 and bytes of the files whose hash is already known
    ({relative path: (sha256, bytes)}: the files written from memory, the same for every customer
    but the spec, hashed once; each data file, hashed as it was written)."""
    import torch

    if not mixes:
        return []
    order = weight_order(g)
    missing = sorted(set(bank.shapes) - set(order))
    assert not missing, f"the graph does not use {missing}"
    alphas = [bank.alpha(m.h) for m in mixes]
    common = hf_side_files(bank.info.run.model, bank.path / "tokenizer.json", "float32")  # the same for every customer
    hf_writers, data_files, spec_files = [], [], []
    try:
        for root, mix, alpha in zip(roots, mixes, alphas):
            side = root / "hf" if write_hf_weights else root / "onnx"  # without HF weights, no hf/ at all
            side.mkdir(parents=True, exist_ok=True)
            (root / "onnx").mkdir(parents=True, exist_ok=True)
            write_files(side, common)
            spec = {"mix": mix.to_dict(), "alpha": [float(a) for a in alpha], "checkpoint": checkpoint_ref(bank),
                    "dtype": "float32"}
            spec_files.append((json.dumps(spec, indent=2) + "\n").encode())
            (side / SPEC_FILE).write_bytes(spec_files[-1])
            if write_hf_weights:
                specs = [(name, torch.float32, bank.shapes[name]) for name in order]
                hf_writers.append(SafetensorsWriter(root / "hf" / "model.safetensors", specs, {"format": "pt"}))
            (root / "onnx" / MODEL_FILE).write_bytes(model_bytes)
            data_files.append(HashedDataFile(root / "onnx" / DATA_FILE))  # roots are staged: no temporary name
        _write_weights(bank, g, alphas, hf_writers, data_files, progress)
        for w in hf_writers:
            w.close()
        digests = [fh.finish(g.data_size()) for fh in data_files]
    except BaseException:
        for w in hf_writers:
            w.abort()
        raise
    finally:
        for fh in data_files:
            fh.close()
    configs = runtime_configs(g, json.loads(common["generation_config.json"]))
    hashed = {name: _digest(data) for name, data in {**common, **configs, MODEL_FILE: model_bytes}.items()}
    known = []
    for root, digest, spec in zip(roots, digests, spec_files):
        if write_hf_weights:
            write_files(root / "onnx", {**common, SPEC_FILE: spec})
        write_files(root / "onnx", configs)
        files = {f"onnx/{name}": h for name, h in hashed.items()}
        files.update({f"hf/{name}": hashed[name] for name in common} if write_hf_weights else {})
        files.update({f"{d}/{SPEC_FILE}": _digest(spec) for d in ("onnx", "hf")})
        known.append({**files, **({f"onnx/{DATA_FILE}": (digest, g.data_size())} if digest else {})})
    return known


def _digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


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


def fused_weights(bank, g: DecoderGraph, alphas, exact: bool, progress: bool = False):
    """The bank pass of an export: for every stored weight in the graph's storage order, (name, its
    stored parts with their offsets, encoded(m, stored) -> mix m's arrays, fused). `fused` is None
    when the arrays are fresh (kernel outputs, rotary tables) and may be written later; otherwise it
    is the (mixes, *shape) fp32 fusion in a reused workspace, valid until the next item. With
    `exact` every mix is fused by `combine` itself; otherwise int4 matrices go through the compiled
    kernel where it applies."""
    import torch

    by_weight: dict[str, list] = {}
    for s, offset in zip(g.stored, g.offsets()):
        by_weight.setdefault(s.weight, []).append((s, offset))
    tensors = bank.tensors(weight_order(g), progress)
    workspace, coefs = bank.workspace(len(alphas)), torch.stack(alphas).numpy()
    for name, parts in by_weight.items():
        if name.startswith("@rotary."):  # architecture-derived tables: the same bytes for every mix
            yield name, parts, functools.partial(_every_mix, rotary_table(g.arch, name.split(".")[1])), None
            continue
        dense, shared, experts = next(tensors)
        assert dense == name, (dense, name)
        if not exact and all(native.applies(s.rep, tuple(shared.shape), experts) for s, _ in parts):
            # every mix fused and quantized in one compiled pass: no fp32 fused tensor at all
            q, scales = native.fuse_quantize(shared.numpy(), experts[0].numpy(), coefs, torch.get_num_threads())
            yield name, parts, functools.partial(_native_parts, q, scales), None
            continue
        with _one_torch_thread(shared.numel() < SMALL):
            fused = combine_many(shared, experts, alphas, workspace=workspace, exact=exact)  # (mixes, *shape)
        yield name, parts, _TorchEncoder(fused), fused


SMALL = 1 << 16  # values per mix: a torch fusion of fewer runs on one thread (see _one_torch_thread)


@contextlib.contextmanager
def _one_torch_thread(small: bool):
    """Torch on one thread for a small fusion (the norms' vectors). A parallel region's OpenMP
    workers spin for milliseconds after it ends, on the cores that the kernel's threads need next:
    in a 16-mix pass of the benchmark's bank, the 17 norms' regions left a worker spinning for a
    quarter of the pass's CPU time, and running them on one thread made the pass 20% faster."""
    import torch

    before = torch.get_num_threads()
    if not small or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_weights(bank, g, alphas, hf_writers, data_files, progress) -> None:
    """Every stored tensor in the graph's storage order, so each data file is written front to back
    (and hashed on the way). Fresh arrays are written by a background thread while the next tensor
    is fused (what it writes is bound into each task by `fused_weights`). A torch fusion lives in a
    reused workspace, so it is written here, once the writer has finished with everything before it."""
    # With HF weights (parity, or no --no-hf), every mix is fused by `combine` itself: bit-identical to its
    # single build, so parity (a) compares the very weights a single build would ship (a batch's
    # other orders of summation moved the demo's logits by up to 1.05e-5, past the 1e-5 bound).
    with _Writer() as writer:
        for name, parts, encoded, fused in fused_weights(bank, g, alphas, exact=bool(hf_writers), progress=progress):
            if fused is None:
                writer.submit(_write_parts, data_files, parts, encoded)
                continue
            writer.wait()  # in storage order, after everything before it
            for hf, tensor in zip(hf_writers, fused):
                hf.write(name, tensor)
            _write_parts(data_files, parts, encoded)


def _every_mix(table: np.ndarray, m: int, s) -> dict[str, np.ndarray]:
    return {s.part: table}


def _write_parts(data_files, parts, encoded) -> None:
    """Mix m's stored arrays of one weight (`encoded(m, stored)`) into each data file, at their offsets."""
    for m, fh in enumerate(data_files):
        for s, offset in parts:
            arr = encoded(m, s)[s.part]
            assert arr.shape == s.shape and arr.dtype == s.dtype, s.name
            fh.write_at(offset, arr)


class _Writer:
    """One background thread that runs the submitted writes in order, with at most two waiting or
    running: memory then holds at most three tensors' kernel outputs. A failed write raises in
    the submitting thread, at the next `submit` or `wait`."""

    def __init__(self) -> None:
        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="soup-export-writer"), deque()

    def submit(self, fn, *args) -> None:
        self.wait(left=1)
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self, left: int = 0) -> None:
        while len(self.pending) > left:
            self.pending.popleft().result()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
