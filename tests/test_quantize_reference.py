"""Each quantized tier's logits against an independent reference: the same fp32 weights rounded in
numpy to the values the tier is documented to store (tests/quant_reference.py, not
soup_export.quantize), loaded into transformers' Llama. Only the order of accumulation (and, in the
shipped configuration, onnxruntime's int8 activations) may separate the two, so a wrong stored byte
(a wrong scale, a swapped nibble, a fallback the storage does not record) shows in the logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from soup_export.bank import Bank
from soup_export.compile import write_tier
from soup_export.evaltext import from_data
from soup_export.layout import read_arch
from soup_export.mix import validate
from soup_export.resolve import resolve_batch

from quant_reference import reference_model

# max |logits(onnx) - logits(reference)| over 8 held-out windows of 32 tokens (logits up to 4.4):
# weight-only (accuracy_level 0): measured 1.7e-6 (fp32 and mixed), 1.9e-6 (fp16, int8, int4),
# the same as fp32 ONNX against transformers (1.7e-6). A wrong scale sign (blocks scaled by their
# absolute maximum) moved them by 5.4e-3 (int8's embedding), 0.47 (mixed), 0.71 (int4); swapped
# nibbles by 7-9.
WEIGHT_TOL = 2e-5
# as shipped (accuracy_level 4: MatMulNBits quantizes activations to int8; onnxruntime also fuses
# the int8 tier's DequantizeLinear -> MatMul into MatMulNBits at that level): measured max 0.019
# (int4) - 0.029 (mixed), mean 2.2e-3; the absolute-maximum scales gave max 0.43-0.73, mean 7e-3-1.3e-2
SHIPPED_MAX, SHIPPED_MEAN = 0.1, 4e-3
STORED = {"fp16": ("fp16", "fp16"), "int8": ("int8 per-channel", "int8 block 32"),
          "mixed": ("int4 block 32", "int8 block 32"), "int4": ("int4 block 32", "int4 block 32")}  # (body, embedding)


@pytest.fixture(scope="module")
def hf_dir(debug_ckpt, tmp_path_factory):
    bank = Bank.open(debug_ckpt)
    out = tmp_path_factory.mktemp("hf") / "hf"
    resolve_batch(debug_ckpt, [validate({"python-code": 0.5, "licences": 0.5}, bank.info.domains)], [out])
    return out


def onnx_logits(onnx_dir, ids: np.ndarray, weight_only: bool) -> np.ndarray:
    """Prefill logits of unpadded rows; `weight_only`: no int8 activations in the MatMulNBits that
    onnxruntime makes of DequantizeLinear -> MatMul (its session option; the graph's own nodes say
    their level)."""
    import onnxruntime as ort

    arch, _ = read_arch(onnx_dir)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if weight_only:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(s), (b, 1))}
    for i in range(arch.layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((b, arch.kv_heads, 0, arch.head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("tier,weight_only", [("fp16", True), ("int8", True), ("mixed", True), ("int4", True),
                                              ("int8", False), ("mixed", False), ("int4", False)])
def test_quantized_logits_equal_those_of_the_dequantized_reference(hf_dir, debug_data, tmp_path, tier, weight_only):
    """Both executors: `reference` quantizes with torch (quantize_nbits), `fast` int4 blocks with
    the compiled kernel when there is one (whatever SOUP_NATIVE says: write_tier's settings)."""
    from soup_export.engine import EngineSettings

    params = {"accuracy_level": 0} if weight_only and tier != "fp16" else None
    ids = from_data(debug_data, "sources", np.array([0.5, 0.5, 0.0]), 8, 32)
    fp32 = {role: {"kind": "float", "dtype": "float32"} for role in ("body", "embed", "lm_head")}
    for executor in ("reference", "fast"):
        out = write_tier(hf_dir, tmp_path / executor, tier, params, EngineSettings(executor=executor))
        storage = json.loads((out / "export.json").read_text())["quantization"]
        assert (storage["body"]["describe"], storage["embed"]["describe"]) == STORED[tier]
        assert storage["lm_head"] == storage["embed"]  # tied: the head reads the embedding's bytes
        with torch.no_grad():
            reference = reference_model(hf_dir, storage)(torch.from_numpy(ids)).logits.numpy()
            unrounded = reference_model(hf_dir, fp32)(torch.from_numpy(ids)).logits.numpy()
        diff = np.abs(onnx_logits(out, ids, weight_only) - reference)
        print(f"{tier} weight_only={weight_only} {executor}: max|onnx - reference| {diff.max():.3g}, "
              f"mean {diff.mean():.3g}; max|reference - fp32| {np.abs(reference - unrounded).max():.3g}")
        if weight_only:
            # the rounding is far above the tolerance (fp16's the least: 8.3e-4 on the CI machine)
            assert np.abs(reference - unrounded).max() > (10 if tier == "fp16" else 50) * WEIGHT_TOL
            assert diff.max() <= WEIGHT_TOL, (executor, diff.max(), np.unravel_index(diff.argmax(), diff.shape))
        else:
            assert diff.max() <= SHIPPED_MAX and diff.mean() <= SHIPPED_MEAN, (executor, diff.max(), diff.mean())


def test_a_built_int4_specialist_stores_the_reference_values(debug_ckpt, debug_data, tmp_path):
    """The export's own encoder (the compiled quantization when there is a C compiler, else the
    torch path), on an int4 build's weights: its logits are the reference model's of the build's HF
    weights, weight-only, to the same tolerance."""
    from soup_export.build import ExportSpec, build

    bank = Bank.open(debug_ckpt)
    mix = validate({"licences": 0.7, "python-code": 0.3}, bank.info.domains)
    build(bank, mix, tmp_path / "acme", ExportSpec(quant="int4", quant_params=(("accuracy_level", "0"),), parity=False))
    onnx_dir, hf = tmp_path / "acme" / "onnx", tmp_path / "acme" / "hf"
    storage = json.loads((onnx_dir / "export.json").read_text())["quantization"]
    assert storage["body"]["describe"] == storage["embed"]["describe"] == "int4 block 32"
    ids = from_data(debug_data, "sources", np.array(mix.h), 8, 32)
    with torch.no_grad():
        reference = reference_model(hf, storage)(torch.from_numpy(ids)).logits.numpy()
    diff = np.abs(onnx_logits(onnx_dir, ids, weight_only=True) - reference)
    print(f"built int4: max|onnx - reference| {diff.max():.3g}")
    assert diff.max() <= WEIGHT_TOL, diff.max()
