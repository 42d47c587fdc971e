"""Graph: the ONNX decoder built from the architecture, against transformers."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from soup_export.bank import Bank
from soup_export.dense import dense_weights
from soup_export.layout import read_arch
from soup_export.mix import validate
from soup_export.resolve import resolve_batch

from stages import ONNX_TOL, sha, write_tier


def test_graph_is_checker_clean_deterministic_and_named_like_hf(hf_dir, tmp_path):
    a, b = write_tier(hf_dir, tmp_path / "a", "fp32"), write_tier(hf_dir, tmp_path / "b", "fp32")
    onnx.checker.check_model(str(a / "model.onnx"), full_check=True)
    assert sha(a / "model.onnx") == sha(b / "model.onnx") and sha(a / "model.onnx.data") == sha(b / "model.onnx.data")
    model = onnx.load(str(a / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    arch, _ = read_arch(hf_dir)
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and outputs[0] == "logits"
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(arch.layers) for k in ("key", "value")]
    assert outputs[1:] == [f"present.{i}.{k}" for i in range(arch.layers) for k in ("key", "value")]
    names = {n.name for n in model.graph.node}
    assert "/model/layers.1/mlp/up_proj/MatMul" in names and "/model/layers.0/self_attn/GroupQueryAttention" in names
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer if i.dims and
               np.prod(i.dims) > 16)
    genai = json.loads((a / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["search"]["past_present_share_buffer"] is True  # the graph writes the cache in place when bound so


def test_graph_depends_only_on_the_architecture(debug_ckpt, hf_dir, tmp_path):
    bank = Bank.open(debug_ckpt)
    resolve_batch(debug_ckpt, [validate({"python-docs": 1}, bank.info.domains)], [tmp_path / "other-hf"])
    a, b = write_tier(hf_dir, tmp_path / "a", "int4"), write_tier(tmp_path / "other-hf", tmp_path / "b", "int4")
    assert sha(a / "model.onnx") == sha(b / "model.onnx") and sha(a / "model.onnx.data") != sha(b / "model.onnx.data")


def test_fp32_onnx_matches_transformers_with_padding_and_cache(hf_dir, tmp_path):
    from soup_export.parity import torch_vs_onnx

    onnx_dir = write_tier(hf_dir, tmp_path / "fp32", "fp32")
    ids = np.random.default_rng(0).integers(1, read_arch(hf_dir)[0].vocab, size=(2, 16))
    report = torch_vs_onnx(hf_dir, onnx_dir, ids, ONNX_TOL)
    assert report["prefill_max_abs_diff"] <= ONNX_TOL and report["decode_max_abs_diff"] <= ONNX_TOL


def test_graph_with_rope_inside_attention_matches_transformers(hf_dir, tmp_path):
    """Head size 16: RoPE runs inside GroupQueryAttention (at cache slots; RoPE is relative, so left
    padding still matches transformers' position_ids), prefill, decode and a padded batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from soup_export.parity import torch_vs_onnx

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    wide = tmp_path / "hf16"
    LlamaForCausalLM(config).save_pretrained(wide)
    onnx_dir = write_tier(wide, tmp_path / "fp32", "fp32")
    ops = [n.op_type for n in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.node]
    assert "RotaryEmbedding" not in ops and "SkipSimplifiedLayerNormalization" in ops
    ids = np.random.default_rng(1).integers(1, 96, size=(2, 16))
    report = torch_vs_onnx(wide, onnx_dir, ids, ONNX_TOL)
    assert report["prefill_max_abs_diff"] <= ONNX_TOL and report["decode_max_abs_diff"] <= ONNX_TOL


def test_onnx_reads_back_the_fp32_weights_it_was_built_from(hf_dir, tmp_path):
    onnx_dir = write_tier(hf_dir, tmp_path / "fp32", "fp32")
    from_onnx, from_hf = dense_weights(onnx_dir), dense_weights(hf_dir)
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
                 "model.layers.1.self_attn.k_proj.weight"):
        assert np.array_equal(from_onnx(name), from_hf(name))
