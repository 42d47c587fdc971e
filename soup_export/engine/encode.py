"""Stored arrays from fused fp32 weights: how each `Stored` entry of the graph's layout is encoded.

The one definition of every storage kind the graph declares (raw, float-linear, float-gather,
int8-channel, nbits-linear, nbits-gather). Both executors encode through here, before anything is
written: a writer only places bytes. The compiled int4 kernel's outputs (`kernel_parts`) are the
bytes `quantize_nbits` gives, laid out by the same `_nbits_layout`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from soup_export.graph import Stored, rotary_table
from soup_export.layout import Arch
from soup_export.quantize import quantize_int8_channel, quantize_nbits


def encode_one(w: np.ndarray, s: Stored) -> dict[str, np.ndarray]:
    """The arrays (by part) that store the fp32 weight `w` as `s` declares."""
    if s.how == "raw":
        return {"": w}
    if s.how == "float-linear":
        return {"": np.ascontiguousarray(w.T).astype(s.rep.dtype)}
    if s.how == "float-gather":
        return {"": w.astype(s.rep.dtype)}
    if s.how == "int8-channel":
        return quantize_int8_channel(w)
    enc = quantize_nbits(w, s.rep)
    return {**enc, "q": _nbits_layout(enc["q"], s)}


def _nbits_layout(q: np.ndarray, s: Stored) -> np.ndarray:
    """Block-quantized bytes (rows, blocks, bytes per block) as stored: GatherBlockQuantized reads
    an embedding's as (rows, blocks * bytes per block)."""
    return q.reshape(q.shape[0], -1) if s.how == "nbits-gather" else q


def weight_array(arch: Arch, name: str, weight: Callable[[str], np.ndarray]) -> np.ndarray:
    """A weight by its layout name: a rotary table (derived from the architecture) or `weight(name)`."""
    return rotary_table(arch, name.split(".")[1]) if name.startswith("@") else weight(name)


def encode(stored: list[Stored], weight: Callable[[str], np.ndarray], arch: Arch) -> Iterator[tuple[Stored, np.ndarray]]:
    """Each stored array, in layout order, encoded from the fp32 HF-layout weights."""
    cache: dict[tuple, dict[str, np.ndarray]] = {}
    for s in stored:
        key = (s.weight, s.how, s.rep)
        if key not in cache:
            cache.clear()
            cache[key] = encode_one(np.asarray(weight_array(arch, s.weight, weight), dtype=np.float32), s)
        arr = cache[key][s.part]
        assert arr.shape == s.shape and arr.dtype == s.dtype, f"{s.name}: {arr.shape}/{arr.dtype} vs {s.shape}/{s.dtype}"
        yield s, arr


def encode_mixes(fused: np.ndarray, s: Stored, kernel: bool) -> list[dict[str, np.ndarray]]:
    """Each mix's block-quantized form of one matrix, fused (mixes, rows, cols). Block quantization
    treats rows independently, so it runs once over every mix's rows (fewer, cache-sized steps)
    and is split per mix; with `kernel`, by the compiled quantization (the same bytes, faster)."""
    from soup_export.engine import native

    assert s.how.startswith("nbits") and fused.ndim == 3, (s.how, fused.shape)
    mixes, rows, cols = fused.shape
    if kernel and native.quantizes(s.rep, (rows, cols)):
        # one thread: between two of torch's matrix products, its OpenMP workers still spin on the
        # other core, which a second thread would compete with (measured: docs/internals.md)
        q, scales = native.quantize(fused.reshape(mixes * rows, cols), 1)
        q, scales = q.reshape(mixes, rows, *q.shape[1:]), scales.reshape(mixes, rows, -1)
        return [kernel_parts(q, scales, m, s) for m in range(mixes)]
    enc = encode_one(fused.reshape(mixes * rows, cols), s)
    return [{k: v[m * rows:(m + 1) * rows] for k, v in enc.items()} for m in range(mixes)]


def kernel_parts(q: np.ndarray, scales: np.ndarray, m: int, s: Stored) -> dict[str, np.ndarray]:
    """Mix m's stored arrays from the kernel's (mixes, rows, blocks, 16) bytes and (mixes, rows, blocks) scales."""
    return {"q": _nbits_layout(q[m], s), "scales": scales[m]}
