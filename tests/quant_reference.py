"""An independent reference for the quantized tiers: each weight rounded to the values its tier is
documented to store, computed here in numpy from the fp32 weights (not with soup_export.quantize),
and the dense model those values make in transformers.

The conventions, from the tiers' documentation and onnxruntime's operators:
- nbits, symmetric: blocks of `block` values along each row (zero-padded); the block's scale is its
  signed extreme (the value of largest magnitude, sign kept) / -2^(bits-1), 1 for an all-zero block;
  level = clip(round-half-even(w / scale) + 2^(bits-1), 0, 2^bits - 1); value = (level - 2^(bits-1)) * scale.
- int8 per channel: scale = max|row| / 127 (1 for a zero row); q = clip(round(w / scale), -127, 127); value = q * scale.
- fp16: the fp16 value.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BODY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nbits_symmetric(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    rows, cols = w.shape
    blocks = -(-cols // block)
    padded = np.zeros((rows, blocks * block), np.float32)
    padded[:, :cols] = w
    b = padded.reshape(rows, blocks, block)
    at = np.abs(b).argmax(-1)[..., None]
    extreme = np.take_along_axis(b, at, -1)[..., 0]  # the signed value of largest magnitude
    half = np.float32(2 ** (bits - 1))
    scale = np.where(extreme == 0, np.float32(1), extreme / -half).astype(np.float32)
    levels = np.clip(np.rint(b / scale[..., None]) + half, 0, 2 ** bits - 1)
    return ((levels - half) * scale[..., None]).astype(np.float32).reshape(rows, -1)[:, :cols]


def int8_channel(w: np.ndarray) -> np.ndarray:
    amax = np.abs(w).max(1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)


def rounded(w: np.ndarray, rep: dict) -> np.ndarray:
    """w as stored by `rep` (a Rep as `DecoderGraph.storage()` records it), read back as fp32."""
    if rep["kind"] == "float":
        return w.astype(rep["dtype"]).astype(np.float32)
    if rep["kind"] == "int8-channel":
        return int8_channel(w)
    assert rep["kind"] == "nbits" and rep["symmetric"], rep  # asymmetric blocks are not modelled here
    return nbits_symmetric(w, rep["bits"], rep["block"])


def role(name: str) -> str | None:
    """Which of the storage's roles a HF weight plays (None: kept fp32, the norms)."""
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith(".weight") and name.split(".")[-2] in BODY:
        return "body"
    return None


def reference_model(hf_dir: Path, storage: dict):
    """The HF model of `hf_dir` with every weight replaced by its stored value per `storage` (the
    `quantization` of export.json: the plan as applied)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    state = model.state_dict()
    changed = {}
    for name, value in state.items():
        if role(name) is not None and not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            changed[name] = torch.from_numpy(rounded(value.numpy(), storage[role(name)]))
    assert any(role(n) == "body" for n in changed) and "model.embed_tokens.weight" in changed
    model.load_state_dict(changed, strict=False)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model
