"""Stage 4, quantize: a registry of quantizers (tiers) with declared parameters.

A tier is a `Plan`: how each role of weight is stored in the ONNX graph.
- body: the attention and MLP projections; embed: the token embedding (a Gather);
  lm_head: the output projection (shares the embedding's bytes when tied and stored alike).
- RMSNorm weights and the rotary tables always stay fp32 (a few KB).

Storage kinds (`Rep`), all weight-only (activations are fp32 at the graph's inputs; onnxruntime's
MatMulNBits at accuracy level 4 quantizes them to int8 inside the kernel, and onnxruntime fuses the
int8 tier's DequantizeLinear -> MatMul into MatMulNBits, which does the same unless the session
sets `session.qdq_matmulnbits_accuracy_level`):
- float (fp32, or fp16 with a Cast that onnxruntime folds at load),
- int8-channel: symmetric int8 per output channel, DequantizeLinear -> MatMul,
- nbits: block-wise 4- or 8-bit, `com.microsoft.MatMulNBits` for matrices and
  `GatherBlockQuantized` for the embedding; CPU accuracy level 4 by default.
  symmetric (the default): scale = (the block's signed extreme) / -2^(bits-1) (onnxruntime's
  convention), so the extreme is exact; zero point 2^(bits-1) (the default of both ops, so it is
  not stored).
  asymmetric (`symmetric=false`): a stored zero point per block (packed like the weights, 0.125
  more bits per weight at int4). The grid starts as the block's range widened to hold 0, (max -
  min) / (2^bits - 1), then its scale and zero point are refitted by least squares
  (`FIT_ROUNDS`). The levels cover only the range the block occupies, where the symmetric grid
  leaves the half opposite an outlier mostly unused; on the reproduction's capacity-regime soup
  this lowers the int4 weight error and every specialist's loss increase over fp32
  (docs/results/soup; measured: docs/internals.md).
A dimension that is not a multiple of the block is zero-padded (MatMulNBits); an embedding
whose width is not a multiple of the block is stored fp16 instead (GatherBlockQuantized needs it).

Tiers, highest precision first (`auto` picks the first that fits the budget):
fp32, fp16, int8, mixed (int4 body, int8 embeddings and LM head), int4.
"""
from __future__ import annotations

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
    symmetric: bool = True  # nbits only: False stores a zero point per block

    def describe(self) -> str:
        if self.kind == "float":
            return "fp32" if self.dtype == "float32" else "fp16"
        if self.kind == "int8-channel":
            return "int8 per-channel"
        return f"int{self.bits} block {self.block}" + ("" if self.symmetric else " asymmetric")


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
                         "accuracy_level": r.accuracy_level, "symmetric": r.symmetric, "describe": r.describe()}
        return {"tier": self.tier, "params": self.params, "body": rep(self.body), "embed": rep(self.embed),
                "lm_head": rep(self.lm_head)}


@dataclass(frozen=True)
class Quantizer:
    name: str
    description: str
    params: dict  # declared parameters and their defaults
    plan: Callable[[dict], Plan]


def _nbits(bits: int, p: dict) -> Rep:
    return Rep("nbits", bits=bits, block=int(p["block_size"]), accuracy_level=int(p["accuracy_level"]),
               symmetric=bool(p.get("symmetric", True)))


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
    Quantizer("mixed", "int4 body, int8 embeddings and LM head (symmetric=false applies to both widths)",
              {"block_size": 32, "accuracy_level": 4, "symmetric": True},
              lambda p: Plan("mixed", _nbits(4, p), _nbits(8, p), _nbits(8, p), p)),
    Quantizer("int4", "block-wise int4 (MatMulNBits) with an int4 GatherBlockQuantized embedding",
              {"block_size": 32, "accuracy_level": 4, "symmetric": True},
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
            params[k] = _parse(overrides[k], type(default)) if k in overrides else default
        except ValueError:
            accepted = f" ({'/'.join(_BOOLS)})" if isinstance(default, bool) else ""
            raise QuantError(f"{tier} parameter {k} expects {type(default).__name__}{accepted}, got {overrides[k]!r}; "
                             f"e.g. --qparam {k}={str(default).lower()}") from None
    if "block_size" in params and (params["block_size"] < 16 or params["block_size"] & (params["block_size"] - 1)):
        raise QuantError(f"block_size must be a power of 2 >= 16, got {params['block_size']}")
    if "accuracy_level" in params and params["accuracy_level"] not in (0, 1, 2, 3, 4):
        raise QuantError(f"accuracy_level must be 0-4, got {params['accuracy_level']}")
    return q.plan(params)


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse(value: object, kind: type) -> object:
    """A declared parameter's value from the CLI (a string) or a spec (already typed)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() not in _BOOLS:
            raise ValueError(value)
        return _BOOLS[str(value).strip().lower()]
    return kind(value)


# ----------------------------------------------------------------------------- encoding
def _blocks(k: int, block: int) -> int:
    return -(-k // block)


def nbits_specs(rows: int, cols: int, rep: Rep) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Stored arrays of a (rows, cols) matrix quantized block-wise along cols."""
    nb = _blocks(cols, rep.block)
    specs = {"q": (np.dtype(np.uint8), (rows, nb, rep.block * rep.bits // 8)), "scales": (np.dtype(np.float32), (rows, nb))}
    if not rep.symmetric:  # one zero point per block, packed like the weights (both ops' layout)
        specs["zero_points"] = (np.dtype(np.uint8), (rows, -(-nb * rep.bits // 8)))
    return specs


CHUNK_VALUES = 1 << 20  # rows are quantized in chunks of about this many values (4 MB): cache-sized


def quantize_nbits(w: np.ndarray, rep: Rep) -> dict[str, np.ndarray]:
    """Block-wise quantization of w (rows, cols) along cols; packed low nibble first.

    Symmetric: the scale is the block's signed extreme / -2^(bits-1) (onnxruntime's MLAS
    convention), so the extreme value is represented exactly; zero point 2^(bits-1), not stored.
    Asymmetric: the block's [min, max] (widened to hold 0) spread over all 2^bits levels, with
    zero point round(-min / scale) stored per block, then scale and zero point refitted by least
    squares (`_fit_asymmetric`, about 13x the symmetric time). Runs in torch: in a batch export this is the
    per-customer cost. (onnxruntime's own kernel would be as good, but its spinning thread pool
    fights torch's for the two cores when the two interleave.)

    Rows are independent, so a batch quantizes all customers' rows of a tensor in one call; they
    go through in chunks of about CHUNK_VALUES, whose temporaries stay in cache (faster than one
    pass over a large stack: docs/internals.md).
    """
    import torch

    arr = np.ascontiguousarray(w, dtype=np.float32)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    rows, cols = t.shape
    nb = _blocks(cols, rep.block)
    out = {k: np.empty(shape, dtype) for k, (dtype, shape) in nbits_specs(rows, cols, rep).items()}
    views = {k: torch.from_numpy(v) for k, v in out.items()}
    step = max(1, CHUNK_VALUES // (nb * rep.block))
    for r in range(0, rows, step):
        chunk = t[r:r + step]
        if nb * rep.block != cols:  # zero columns up to whole blocks, chunk by chunk (not a copy of all rows)
            chunk = torch.nn.functional.pad(chunk, (0, nb * rep.block - cols))
        _quantize_rows(chunk.reshape(-1, nb, rep.block), rep, {k: v[r:r + step] for k, v in views.items()})
    return out


def _quantize_rows(blocks, rep: Rep, out: dict) -> None:
    """quantize_nbits of (rows, nb, block) values, written into `out`'s tensors (rows first)."""
    import torch

    low, high = blocks.amin(-1), blocks.amax(-1)  # two reductions beat one aminmax over 32-wide rows
    if rep.symmetric:
        scales, zero = _symmetric(low, high, rep.bits)
    else:
        scales, zero = _fit_asymmetric(blocks, *_asymmetric(low, high, rep.bits), rep.bits, FIT_ROUNDS)
    shift = zero if rep.symmetric else zero[..., None]
    levels = torch.div(blocks, scales[..., None]).round_().add_(shift).clamp_(0, 2 ** rep.bits - 1)
    out["q"].copy_(_packed(levels, rep.bits))  # the float -> uint8 conversion happens in this one copy
    out["scales"].copy_(scales)
    if not rep.symmetric:
        out["zero_points"].copy_(_packed(torch.nn.functional.pad(zero, (0, zero.shape[1] % 2 if rep.bits == 4 else 0)),
                                         rep.bits))


def _symmetric(low, high, bits: int):
    """(scales, zero points) with the signed extreme of each block exact; zero point 2^(bits-1)."""
    import torch

    half = 2 ** (bits - 1)
    extreme = torch.where(high >= -low, high, low)  # the signed extreme of each block, (rows, nb)
    return extreme.div_(-half).masked_fill_(extreme == 0, 1.0), float(half)  # an all-zero block: scale 1


def _asymmetric(low, high, bits: int):
    """(scales, zero points) spreading each block's [min(low, 0), max(high, 0)] over all levels."""
    import torch

    low, high = low.clamp(max=0), high.clamp(min=0)
    scales = (high - low).div_(2 ** bits - 1)
    scales.masked_fill_(scales == 0, 1.0)  # an all-zero block (or a span that underflows): scale 1
    return scales, torch.div(-low, scales).round_().clamp_(0, 2 ** bits - 1)


# Least-squares refinements of an asymmetric grid: 4 rounds give nearly all of what more rounds
# would (measured: docs/internals.md). They cost about 13x the symmetric encoding's time, which
# is why asymmetric is opt-in.
FIT_ROUNDS = 4


def _fit_asymmetric(blocks, scales, zero, bits: int, rounds: int):
    """Refine each block's (scale, zero point) by least squares: fit w ~ s * q + b to the block's
    current levels q, take zero point round(-b / s), requantize, and keep whichever of the old and
    new grids has the smaller squared error (so the error never grows). (rows, nb) each."""
    import torch

    levels = 2 ** bits - 1

    def levels_and_error(s, z):
        q = torch.div(blocks, s[..., None]).round_().add_(z[..., None]).clamp_(0, levels)
        return q, (q - z[..., None]).mul_(s[..., None]).sub_(blocks).square_().sum(-1)

    if rounds == 0:
        return scales, zero
    q, err = levels_and_error(scales, zero)
    for _ in range(rounds):
        qc = q - q.mean(-1, keepdim=True)
        slope = (qc * blocks).sum(-1) / (qc * qc).sum(-1).clamp_min(1e-12)
        ok = slope > 0
        s = torch.where(ok, slope, scales)
        z = torch.div(q.mean(-1) * s - blocks.mean(-1), s).round_().clamp_(0, levels)  # b = mean(w) - s mean(q)
        q_new, err_new = levels_and_error(s, z)
        better = ok & (err_new < err)
        scales, zero, err = torch.where(better, s, scales), torch.where(better, z, zero), torch.where(better, err_new, err)
        q = torch.where(better[..., None], q_new, q)
    return scales, zero


def _packed(levels, bits: int):
    """Integer-valued float levels (..., even) as the values of the stored bytes: one per byte
    (8 bits), or two per byte (4 bits: element 2i in the low nibble, 2i+1 in the high). Packing in
    float (exact below 256) is one pass over half the values, where packing uint8 levels takes five."""
    import torch

    return torch.add(levels[..., 0::2], levels[..., 1::2], alpha=16) if bits == 4 else levels


def dequantize_nbits(stored: dict[str, np.ndarray], rep: Rep, cols: int) -> np.ndarray:
    """Inverse of quantize_nbits (for tests and error reports)."""
    q, scales = stored["q"], stored["scales"]
    if rep.bits == 4:
        q = _unpack_nibbles(q)
    zero = np.float32(2 ** (rep.bits - 1))
    if not rep.symmetric:
        zp = stored["zero_points"]
        zero = (_unpack_nibbles(zp) if rep.bits == 4 else zp)[:, :scales.shape[1], None].astype(np.float32)
    w = (q.astype(np.float32) - zero) * scales[..., None]
    return w.reshape(q.shape[0], -1)[:, :cols]


def _unpack_nibbles(q: np.ndarray) -> np.ndarray:
    return np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)


def quantize_int8_channel(w: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric int8 per output channel of w (out, in); returns q (in, out) and scale (out,)."""
    amax = np.abs(w).max(1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return {"q": np.ascontiguousarray(q.T), "scale": scale}
