"""Stage 4, quantize: a registry of quantizers (tiers) with declared parameters.

A tier is a `Plan`: how each role of weight is stored in the ONNX graph.
- body: the attention and MLP projections; embed: the token embedding (a Gather);
  lm_head: the output projection (shares the embedding's bytes when tied and stored alike).
- RMSNorm weights and the rotary tables always stay fp32 (a few KB).

Storage kinds (`Rep`), all weight-only (activations stay fp32):
- float (fp32, or fp16 with a Cast that onnxruntime folds at load),
- int8-channel: symmetric int8 per output channel, DequantizeLinear -> MatMul,
- nbits: block-wise symmetric 4- or 8-bit, `com.microsoft.MatMulNBits` for matrices and
  `GatherBlockQuantized` for the embedding; scale = (the block's signed extreme) / -2^(bits-1)
  (onnxruntime's convention), so the extreme is exact; zero point 2^(bits-1)
  (the default of both ops, so it is not stored); CPU accuracy level 4 by default.
A dimension that is not a multiple of the block is zero-padded (MatMulNBits); an embedding
whose width is not a multiple of the block is stored fp16 instead (GatherBlockQuantized needs it).

Tiers, highest precision first (`auto` picks the first that fits the budget):
fp32, fp16, int8, mixed (int4 body, int8 embeddings and LM head), int4.
"""
from __future__ import annotations

import sys

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from soup_export.errors import QuantError


@dataclass(frozen=True)
class Rep:
    """How one weight is stored."""

    kind: Literal["float", "int8-channel", "nbits"]
    dtype: Literal["float32", "float16"] = "float32"
    bits: int = 0
    block: int = 32
    accuracy_level: int = 4

    def describe(self) -> str:
        if self.kind == "float":
            return "fp32" if self.dtype == "float32" else "fp16"
        return "int8 per-channel" if self.kind == "int8-channel" else f"int{self.bits} block {self.block}"


@dataclass(frozen=True)
class Plan:
    """A tier: storage of the body, the embedding and the LM head."""

    tier: str
    body: Rep
    embed: Rep
    lm_head: Rep
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        rep = lambda r: {"kind": r.kind, "dtype": r.dtype, "bits": r.bits, "block": r.block,  # noqa: E731
                         "accuracy_level": r.accuracy_level, "describe": r.describe()}
        return {"tier": self.tier, "params": self.params, "body": rep(self.body), "embed": rep(self.embed),
                "lm_head": rep(self.lm_head)}


@dataclass(frozen=True)
class Quantizer:
    name: str
    description: str
    params: dict  # declared parameters and their defaults
    plan: Callable[[dict], Plan]


def _nbits(bits: int, p: dict) -> Rep:
    return Rep("nbits", bits=bits, block=int(p["block_size"]), accuracy_level=int(p["accuracy_level"]))


def _int8_plan(p: dict) -> Plan:
    if p["granularity"] not in ("channel", "block"):
        raise QuantError(f"int8 granularity must be channel or block, got {p['granularity']!r}")
    body = Rep("int8-channel") if p["granularity"] == "channel" else _nbits(8, p)
    return Plan("int8", body, _nbits(8, p), body, p)


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in [
    Quantizer("fp32", "no quantization", {}, lambda p: Plan("fp32", Rep("float"), Rep("float"), Rep("float"), p)),
    Quantizer("fp16", "fp16 weights, fp32 compute", {},
              lambda p: Plan("fp16", *(Rep("float", "float16"),) * 3, p)),
    Quantizer("int8", "weight-only int8: per output channel (DequantizeLinear) or block-wise (MatMulNBits)",
              {"granularity": "channel", "block_size": 32, "accuracy_level": 4}, _int8_plan),
    Quantizer("mixed", "int4 body, int8 embeddings and LM head",
              {"block_size": 32, "accuracy_level": 4},
              lambda p: Plan("mixed", _nbits(4, p), _nbits(8, p), _nbits(8, p), p)),
    Quantizer("int4", "block-wise symmetric int4 (MatMulNBits) with an int4 GatherBlockQuantized embedding",
              {"block_size": 32, "accuracy_level": 4},
              lambda p: Plan("int4", _nbits(4, p), _nbits(4, p), _nbits(4, p), p)),
]}
TIERS = tuple(QUANTIZERS)  # highest precision first


def make_plan(tier: str, overrides: dict | None = None) -> Plan:
    """The Plan of a tier with its declared parameters (overrides must be declared ones)."""
    if tier not in QUANTIZERS:
        raise QuantError(f"unknown quantizer {tier!r}; choose one of {', '.join(TIERS)} (or auto)")
    q = QUANTIZERS[tier]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(q.params))
    if unknown:
        declared = ", ".join(f"{k}={v}" for k, v in q.params.items()) or "none"
        raise QuantError(f"{tier} has no parameter {', '.join(unknown)}; its parameters: {declared}")
    params = {}
    for k, default in q.params.items():
        try:
            params[k] = type(default)(overrides[k]) if k in overrides else default
        except ValueError:
            raise QuantError(f"{tier} parameter {k} expects {type(default).__name__}, got {overrides[k]!r}") from None
    if "block_size" in params and (params["block_size"] < 16 or params["block_size"] & (params["block_size"] - 1)):
        raise QuantError(f"block_size must be a power of 2 >= 16, got {params['block_size']}")
    if "accuracy_level" in params and params["accuracy_level"] not in (0, 1, 2, 3, 4):
        raise QuantError(f"accuracy_level must be 0-4, got {params['accuracy_level']}")
    return q.plan(params)


# ----------------------------------------------------------------------------- encoding
def _blocks(k: int, block: int) -> int:
    return -(-k // block)


def nbits_specs(rows: int, cols: int, rep: Rep) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Stored arrays of a (rows, cols) matrix quantized block-wise along cols."""
    nb = _blocks(cols, rep.block)
    return {"q": (np.dtype(np.uint8), (rows, nb, rep.block * rep.bits // 8)), "scales": (np.dtype(np.float32), (rows, nb))}


def quantize_nbits(w: np.ndarray, rep: Rep) -> dict[str, np.ndarray]:
    """Block-wise symmetric quantization of w (rows, cols) along cols; packed low nibble first.

    The scale is the block's signed extreme / -2^(bits-1) (onnxruntime's MLAS convention), so
    the extreme value is represented exactly; zero point 2^(bits-1). Runs in torch: in a batch
    export this is the per-customer cost. (onnxruntime's own kernel would be as good, but its
    spinning thread pool fights torch's for the two cores when the two interleave.)
    """
    import torch

    arr = np.ascontiguousarray(w, dtype=np.float32)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    rows, cols = t.shape
    nb = _blocks(cols, rep.block)
    if nb * rep.block != cols:
        t = torch.nn.functional.pad(t, (0, nb * rep.block - cols))
    blocks = t.reshape(rows, nb, rep.block)
    half = 2 ** (rep.bits - 1)
    low, high = blocks.amin(-1), blocks.amax(-1)  # two reductions beat one aminmax over 32-wide rows
    extreme = torch.where(high >= -low, high, low)  # the signed extreme of each block, (rows, nb)
    scales = torch.where(extreme != 0, extreme / -half, torch.ones_like(extreme))
    q = torch.div(blocks, scales[..., None]).round_().clamp_(-half, half - 1).add_(half).to(torch.uint8)
    if rep.bits == 4:
        q = _pack_nibbles(q)
    return {"q": np.ascontiguousarray(q.numpy()).reshape(rows, nb, -1), "scales": scales.numpy()}


def _pack_nibbles(q):
    """uint8 values < 16, (..., even) -> (..., even / 2): element 2i in the low nibble, 2i+1 in the high."""
    import torch

    if sys.byteorder != "little":
        return q[..., 0::2] | (q[..., 1::2] << 4)
    pairs = q.contiguous().view(torch.int16)  # each pair of bytes as one little-endian int16: low byte = 2i
    return ((pairs & 0x0F) | ((pairs >> 4) & 0xF0)).to(torch.uint8)


def dequantize_nbits(stored: dict[str, np.ndarray], rep: Rep, cols: int) -> np.ndarray:
    """Inverse of quantize_nbits (for tests and error reports)."""
    q = stored["q"]
    if rep.bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:2], -1)
    w = (q.astype(np.float32) - 2 ** (rep.bits - 1)) * stored["scales"][..., None]
    return w.reshape(q.shape[0], -1)[:, :cols]


def quantize_int8_channel(w: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric int8 per output channel of w (out, in); returns q (in, out) and scale (out,)."""
    amax = np.abs(w).max(1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return {"q": np.ascontiguousarray(q.T), "scale": scale}
