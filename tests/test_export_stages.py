"""Export stages one by one on the debug checkpoint: mix, resolve, graph, quantize, budget."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from soup_export.budget import choose_tier, parse_size, predict
from soup_export.errors import BudgetError, MixError, QuantError
from soup_export.graph import DecoderGraph
from soup_export.mix import mix_from_mapping, parse_mix, validate
from soup_export.onnx_dir import dense_weights, graph_bytes, read_arch, write_onnx_dir
from soup_export.ort_model import OrtDecoder
from soup_export.quantize import TIERS, Rep, dequantize_nbits, make_plan, quantize_nbits
from soup_export.resolve import Bank, resolve_batch

SOUP_TOL = 1e-5  # fp32 soup vs fused dense (the bound)
ONNX_TOL = 1e-4  # fp32 PyTorch vs onnxruntime (the bound)
DOMAINS = ["python-code", "licences", "python-docs"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- mix
def test_mix_is_validated_and_normalisation_is_recorded():
    mix = validate(parse_mix("licences=3, python-code=1"), DOMAINS)
    assert mix.weights == (0.25, 0.75, 0.0) and mix.normalised
    assert not validate({"licences": 1.0}, DOMAINS).normalised
    for text, message in [("legal=1", "unknown domain(s) 'legal'; the checkpoint's domains are python-code"),
                          ("licences=-1", "negative"), ("licences=nan", "not finite"),
                          ("licences=0,python-code=0", "all weights are zero"), ("licences", "not DOMAIN=WEIGHT"),
                          ("licences=abc", "not a number")]:
        with pytest.raises(MixError, match=re.escape(message)):
            validate(parse_mix(text), DOMAINS)
    with pytest.raises(MixError, match="not a number"):
        mix_from_mapping({"mix": {"licences": "lots"}}, DOMAINS, "file:x.yaml")



def test_mix_files_refuse_a_key_given_twice_and_report_parse_errors_on_one_line(tmp_path):
    """YAML and JSON keep the last of two equal keys silently (a customer or a weight dropped); the
    parsers' errors are a line, not a dump of the offending text."""
    from soup_export.mix import read_mix_file

    cases = {"dup.yaml": "customers:\n  a: {licences: 1}\n  a: {python-code: 1}\n",
             "weights.yaml": "{licences: 1, licences: 2}\n",
             "dup.json": '{"customers": {"a": {"licences": 1}, "a": {"python-code": 1}}}',
             "weights.json": '{"licences": 1, "licences": 2}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(MixError, match=r"key '(a|licences)' is given twice in one mapping.*give each key once"):
            read_mix_file(tmp_path / name)
    (tmp_path / "ok.yaml").write_text("customers:\n  a: {licences: 1}\n  b: {licences: 1}\n")
    assert list(read_mix_file(tmp_path / "ok.yaml")["customers"]) == ["a", "b"]
    (tmp_path / "merge.yaml").write_text("base: &base {licences: 1, python-code: 1}\n"
                                         "customers:\n  a: {<<: *base, licences: 3}\n")  # a merged key overridden: legal
    assert read_mix_file(tmp_path / "merge.yaml")["customers"]["a"] == {"licences": 3, "python-code": 1}
    with pytest.raises(MixError, match="domain 'licences' is given twice"):
        parse_mix("licences=1,licences=2")
    with pytest.raises(MixError, match="domain '1' is given twice"):
        mix_from_mapping({1: 1.0, "1": 2.0}, DOMAINS, "file:x.yaml")
    (tmp_path / "bad.yaml").write_text("customers:\n  a: {licences: 1\n  b: [\n")
    with pytest.raises(MixError, match=r"cannot parse mix file .*bad.yaml: .* at line 3, column \d+; fix the file") as err:
        read_mix_file(tmp_path / "bad.yaml")
    assert "\n" not in err.value.message


def test_an_error_in_a_batch_file_names_the_customer(debug_ckpt, tmp_path):
    from soup_export.batchfile import read_batch
    from soup_train.errors import DataError

    for entry, error, message in [("{klingon: 1}", MixError, "unknown domain(s) 'klingon'"),
                                  ("{licences: lots}", MixError, "weight of 'licences' is 'lots', not a number"),
                                  ("{texts: [nowhere]}", DataError, "does not exist")]:
        (tmp_path / "customers.yaml").write_text(f"customers:\n  a: {{licences: 1}}\n  b: {entry}\n")
        with pytest.raises(error, match=re.escape(f"customers.yaml: customer 'b': ") + ".*" + re.escape(message)):
            read_batch(debug_ckpt, tmp_path / "customers.yaml")
    (tmp_path / "customers.yaml").write_text("customers:\n  1: {licences: 1}\n  '1': {licences: 2}\n")
    with pytest.raises(MixError, match="customer name '1' is given twice"):  # equal once made names
        read_batch(debug_ckpt, tmp_path / "customers.yaml")


def test_staged_output_keeps_the_output_it_replaces_when_stopped_between_its_renames(tmp_path, monkeypatch):
    """The swap renames the old output aside, then the new one in: a stop between the two (SIGTERM is
    raised as SystemExit) must leave the old output in place, not delete both."""
    from soup_export.build import staged_output

    out = tmp_path / "acme"
    out.mkdir()
    (out / "manifest.json").write_text("shipped")
    real = Path.rename

    def rename(self, target):
        if self.name == ".acme.tmp":  # the stop arrives just before the new output is renamed in
            raise SystemExit(143)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SystemExit):
        with staged_output(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "shipped"
    assert not (tmp_path / ".acme.tmp").exists() and not (tmp_path / ".acme.old").exists()



def test_a_stop_whose_exception_was_lost_still_stops_before_the_output_is_committed(tmp_path, monkeypatch):
    """SIGTERM's exception can be swallowed where it is raised (inside a compiled module's import):
    the recorded request is raised again before the staged output replaces the old one, and
    between the tensors of a bank pass."""
    from soup_export import emit, stopping
    from soup_export.build import staged_output

    out = tmp_path / "acme"
    out.mkdir()
    (out / "manifest.json").write_text("shipped")
    with pytest.raises(stopping.Stopped) as stopped:
        with staged_output(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("new")
            monkeypatch.setattr(stopping, "_requested", 15)  # as if SIGTERM's SystemExit had been lost
    assert stopped.value.code == 143
    assert (out / "manifest.json").read_text() == "shipped"
    assert not (tmp_path / ".acme.tmp").exists() and not (tmp_path / ".acme.old").exists()
    weights = iter([emit.Weight("w", [], None, None, True)] * 3)
    monkeypatch.setattr(emit, "fused_weights", lambda *args, **kwargs: weights)
    with pytest.raises(stopping.Stopped):
        emit._write_weights(None, None, [], [], None, [], False)
    assert len(list(weights)) == 2  # stopped at the first tensor
    monkeypatch.setattr(stopping, "_requested", None)
    with staged_output(out, force=True) as tmp:  # no stop asked for: committed
        (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"

def test_sigterm_is_recorded_cleared_afterwards_and_turns_a_finished_command_into_143(monkeypatch):
    """The handler records the stop as it raises it (check() raises it again); sigterm_stops raises a
    stop whose exception the body lost, and clears it and restores the old handler at its end, so a
    later export in the process is not stopped; run() exits 143 when main() finished with a stop asked for."""
    import signal
    import sys

    from soup_export import cli, stopping

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stopping.Stopped) as stopped:
        with stopping.sigterm_stops():
            assert signal.getsignal(signal.SIGTERM) is stopping._stop
            with pytest.raises(stopping.Stopped):
                stopping._stop(signal.SIGTERM, None)
            assert stopping.requested() and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            with pytest.raises(stopping.Stopped):
                stopping.check()
            # the body goes on, as when the exception was lost: raised at the end
    assert stopped.value.code == 143
    assert not stopping.requested() and signal.getsignal(signal.SIGTERM) == before
    stopping.check()  # cleared: nothing raised
    with stopping.sigterm_stops():
        pass  # no stop asked for: nothing raised

    def main_that_finishes():
        stopping._requested = signal.SIGTERM  # a SIGTERM whose exception was lost inside the command
        sys.exit(0)

    monkeypatch.setattr(cli, "main", main_that_finishes)
    with pytest.raises(stopping.Stopped) as stopped:
        cli.run()
    assert stopped.value.code == 143 and not stopping.requested()


def test_an_export_stops_between_its_customers(debug_ckpt, tmp_path, monkeypatch):
    """A stop asked for once the bank pass is over is raised before the first customer's checks and
    manifest."""
    from soup_export import build as B
    from soup_export import stopping

    real = B.emit

    def emit_then_stop(*args, **kwargs):
        known = real(*args, **kwargs)
        monkeypatch.setattr(stopping, "_requested", 15)
        return known

    monkeypatch.setattr(B, "emit", emit_then_stop)
    roots = [tmp_path / "a", tmp_path / "b"]
    bank = Bank.open(debug_ckpt)
    mixes = [validate({bank.info.domains[0]: 1.0}, bank.info.domains, name=n) for n in ("a", "b")]
    with pytest.raises(stopping.Stopped):
        B.export(bank, mixes, roots, B.ExportSpec(quant="fp32", parity=False, keep_hf=False))
    assert (tmp_path / "a" / "onnx" / "model.onnx.data").exists() and not list(tmp_path.rglob("manifest.json"))


# ----------------------------------------------------------------------------- resolve
def test_resolved_directory_is_a_plain_hf_llama_equal_to_the_soup(debug_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soup_train.checkpoint import load_soup

    bank = Bank.open(debug_ckpt)
    mix = validate({"licences": 0.6, "python-docs": 0.4}, bank.info.domains)
    resolve_batch(debug_ckpt, [mix], [tmp_path / "hf"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    soup, _ = load_soup(debug_ckpt)
    x = torch.tensor([tok("Permission is hereby granted, free of charge")["input_ids"]])
    with torch.no_grad():
        diff = (soup(x, torch.tensor(mix.h, dtype=torch.float32)) - model(x).logits).abs().max().item()
    assert diff <= SOUP_TOL
    spec = json.loads((tmp_path / "hf" / "soup_spec.json").read_text())
    assert spec["checkpoint"]["model_sha256"] == bank.sha256 and len(spec["alpha"]) == 4


def test_checkpoint_sha256_is_cached_by_size_and_mtime(monkeypatch, tmp_path):
    """cached_sha256 hashes a file once per (size, mtime): a hit reads no bytes, a rewritten file is
    hashed again, and an entry that is not a 64-character digest (or of the old {size, mtime_ns,
    sha256} layout) is a miss that gets rewritten."""
    import os

    from soup_export import resolve

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights, calls, real = tmp_path / "model.safetensors", [], resolve.file_sha256
    monkeypatch.setattr(resolve, "file_sha256", lambda path: calls.append(path) or real(path))
    weights.write_bytes(b"bank")
    digest = hashlib.sha256(b"bank").hexdigest()
    assert resolve.cached_sha256(weights) == digest and len(calls) == 1
    assert resolve.cached_sha256(weights) == digest and len(calls) == 1  # from the cache
    (cached,) = (tmp_path / "cache" / "soup" / "sha256").glob("*.json")
    weights.write_bytes(b"other bank")  # another size and mtime: hashed again
    assert resolve.cached_sha256(weights) == hashlib.sha256(b"other bank").hexdigest() and len(calls) == 2
    stat = weights.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for entry in ({"key": key, "value": "abc"}, {**key, "sha256": digest}):  # not a digest; the old layout
        cached.write_text(json.dumps(entry))
        before = len(calls)
        assert resolve.cached_sha256(weights) == hashlib.sha256(b"other bank").hexdigest()
        assert len(calls) == before + 1 and json.loads(cached.read_text())["value"] == resolve.cached_sha256(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: hashed again
    assert resolve.cached_sha256(weights) == hashlib.sha256(b"other bank").hexdigest() and len(calls) == before + 2


def test_hf_config_files_are_transformers_own_cached_by_their_inputs(monkeypatch, tmp_path):
    from soup_export import manifest, resolve
    from soup_train.config import ModelConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, real, calls = ModelConfig(vocab_size=300), resolve._hf_config_files, []
    made = real(model, 7, "float32")
    monkeypatch.setattr(resolve, "_hf_config_files", lambda *args: calls.append(args) or real(*args))
    assert resolve.hf_config_files(model, 7, "float32") == made and len(calls) == 1  # made, and cached
    (cached,) = (tmp_path / "soup" / "hf-configs").glob("*.json")
    assert resolve.hf_config_files(model, 7, "float32") == made and len(calls) == 1  # from the cache
    assert resolve.hf_config_files(model, 8, "float32") != made and len(calls) == 2  # other inputs: made
    cached.write_text("{")  # unreadable: made again, and the cache rewritten
    assert resolve.hf_config_files(model, 7, "float32") == made and len(calls) == 3
    assert json.loads(cached.read_text())["value"]["config.json"] == made["config.json"].decode()
    monkeypatch.setattr(manifest, "library_version", lambda name: "0.0.0-other")  # another transformers: made
    assert resolve.hf_config_files(model, 7, "float32") == made and len(calls) == 4


def test_opening_a_checkpoint_imports_neither_transformers_nor_dynamo(debug_ckpt, tmp_path):
    """An export's start-up: the checkpoint's shapes checked on the meta device without torch._dynamo
    (its import took 1-1.5 s) and, once cached, the HF configs made without transformers (2.6-3.4 s)."""
    import os
    import sys

    from procs import run_command

    code = ("import sys; from pathlib import Path; from soup_export.resolve import Bank, hf_side_files; "
            f"bank = Bank.open(Path({str(debug_ckpt)!r})); "
            "hf_side_files(bank.info.run.model, bank.path / 'tokenizer.json', 'float32'); "
            "print(' '.join(m for m in ('transformers', 'torch._dynamo') if m in sys.modules) or 'neither')")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    first, second = (run_command([sys.executable, "-c", code], env) for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert first.stdout.split()[-1] == "transformers"  # the first makes the configs with transformers
    assert second.stdout.split()[-1] == "neither"


def test_batch_resolve_matches_single_resolves_and_repeats_exactly(debug_ckpt, tmp_path):
    """A batch fuses all mixes with one matrix product per block: each mix equals its single resolve
    (which is `combine` itself) to fp32 rounding, and the same batch writes the same bytes again."""
    bank = Bank.open(debug_ckpt)
    mixes = [validate({d: 1.0}, bank.info.domains, name=d) for d in bank.info.domains]
    for run in ("batch", "again"):
        resolve_batch(debug_ckpt, mixes, [tmp_path / run / m.name for m in mixes])
    for m in mixes:
        resolve_batch(debug_ckpt, [m], [tmp_path / "single" / m.name])
        batch, single = dense_weights(tmp_path / "batch" / m.name), dense_weights(tmp_path / "single" / m.name)
        for name in bank.shapes:
            b, s = batch(name), single(name)
            assert np.abs(b - s).max() <= 1e-6 * max(1.0, np.abs(s).max()), name
        assert sha(tmp_path / "batch" / m.name / "model.safetensors") == sha(tmp_path / "again" / m.name / "model.safetensors")
    first, second = dense_weights(tmp_path / "batch" / mixes[0].name), dense_weights(tmp_path / "batch" / mixes[1].name)
    assert np.abs(first("model.norm.weight") - second("model.norm.weight")).max() > 1e-4  # the mixes differ


@pytest.fixture(scope="module")
def hf_dir(debug_ckpt, tmp_path_factory):
    bank = Bank.open(debug_ckpt)
    out = tmp_path_factory.mktemp("hf") / "hf"
    resolve_batch(debug_ckpt, [validate({"python-code": 0.5, "licences": 0.5}, bank.info.domains)], [out])
    return out


# ----------------------------------------------------------------------------- graph
def write_tier(hf_dir, out, tier, params=None):
    arch, _ = read_arch(hf_dir)
    model, g = graph_bytes(arch, make_plan(tier, params))
    write_onnx_dir(out, model, g, dense_weights(hf_dir), hf_dir)
    return out


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


# ----------------------------------------------------------------------------- quantize
def test_quantizer_registry_declares_its_parameters():
    assert TIERS == ("fp32", "fp16", "int8", "mixed", "int4")
    with pytest.raises(QuantError, match="unknown quantizer 'int3'; choose one of fp32, fp16, int8, mixed, int4"):
        make_plan("int3")
    with pytest.raises(QuantError, match="int4 has no parameter zero_point; its parameters: block_size=32"):
        make_plan("int4", {"zero_point": "1"})
    with pytest.raises(QuantError, match=r"symmetric expects bool \(true/1/yes/false/0/no\), got .maybe.; e.g. --qparam symmetric=true"):
        make_plan("int4", {"symmetric": "maybe"})
    assert make_plan("int4").body.symmetric and not make_plan("int4", {"symmetric": "false"}).body.symmetric
    asym = make_plan("mixed", {"symmetric": "no"})
    assert not asym.embed.symmetric and asym.body.describe() == "int4 block 32 asymmetric"
    with pytest.raises(QuantError, match="power of 2"):
        make_plan("int4", {"block_size": "24"})
    plan = make_plan("int4", {"block_size": "64"})
    assert plan.body.block == 64 and plan.body.bits == 4 and plan.body.accuracy_level == 4
    assert make_plan("mixed").embed.bits == 8 and make_plan("int8", {"granularity": "block"}).body.kind == "nbits"


def _matmul_nbits_in_onnxruntime(stored: dict, rep: Rep, x: np.ndarray, n: int, k: int) -> np.ndarray:
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort

    names = [p for p in ("q", "scales", "zero_points") if p in stored]
    node = helper.make_node("MatMulNBits", ["x", *names], ["y"], domain="com.microsoft", K=k, N=n, bits=rep.bits,
                            block_size=rep.block, accuracy_level=rep.accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(stored[p], p) for p in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_error_is_within_half_a_step_and_runs_in_onnxruntime(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(48, 80)).astype(np.float32)  # 80 is not a multiple of 32: padded
    rep = Rep("nbits", bits=bits, block=32, accuracy_level=0)
    stored = quantize_nbits(w, rep)
    assert set(stored) == {"q", "scales"}  # symmetric: the ops' default zero point, not stored
    deq = dequantize_nbits(stored, rep, 80)
    step = np.abs(np.repeat(stored["scales"], 32, axis=1)[:, :80])
    half = 2 ** (bits - 1)
    inside = np.abs(w) / step < half - 0.5  # only values beyond the opposite end of the range may clip
    assert np.all(np.abs(deq - w)[inside] <= step[inside] / 2 + 1e-6)
    assert np.all(np.abs(deq - w) <= step + 1e-6)
    extremes = np.abs(w[:, :32]).argmax(1)  # the signed extreme of each block is exact
    assert np.allclose(deq[np.arange(48), extremes], w[np.arange(48), extremes], atol=1e-6)
    x = rng.normal(size=(3, 80)).astype(np.float32)
    assert np.abs(_matmul_nbits_in_onnxruntime(stored, rep, x, 48, 80) - x @ deq.T).max() <= 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_blocks_fit_their_range_and_beat_symmetric_on_skewed_weights(bits, monkeypatch):
    import soup_export.quantize as quantize

    rng = np.random.default_rng(10 + bits)
    w = rng.standard_t(3, size=(40, 80)).astype(np.float32)  # heavy tails; 80 = 2.5 blocks: padded, 3 zero points
    w[:, 32:64] += 2.0  # one block all positive: its range still has to hold 0
    rep = Rep("nbits", bits=bits, block=32, accuracy_level=0, symmetric=False)
    block_error = lambda deq: np.square(np.pad(deq - w, ((0, 0), (0, 16)))).reshape(40, 3, 32).sum(-1)  # noqa: E731

    monkeypatch.setattr(quantize, "FIT_ROUNDS", 0)  # the plain grid: the block's [min, max] over all levels
    plain = quantize_nbits(w, rep)
    deq_plain = dequantize_nbits(plain, rep, 80)
    step = np.repeat(plain["scales"], 32, axis=1)[:, :80]
    assert np.all(plain["scales"] > 0) and np.all(np.abs(deq_plain - w) <= step / 2 + 1e-5)  # rounding only: no clip
    monkeypatch.undo()

    stored = quantize_nbits(w, rep)
    assert stored["zero_points"].shape == (40, -(-3 * bits // 8)) and stored["zero_points"].dtype == np.uint8
    if bits == 4:  # the odd third zero point sits in the low nibble of a byte whose high nibble is padding
        assert np.all(stored["zero_points"][:, 1] >> 4 == 0)
    deq = dequantize_nbits(stored, rep, 80)
    assert np.all(block_error(deq) <= block_error(deq_plain) * (1 + 1e-5) + 1e-9)  # the fit never makes a block worse
    assert block_error(deq).sum() < block_error(deq_plain).sum()  # and it helps (measured -6% on trained weights)
    sym = dequantize_nbits(quantize_nbits(w, Rep("nbits", bits=bits, block=32)), Rep("nbits", bits=bits, block=32), 80)
    assert np.square(deq - w).sum() < 0.8 * np.square(sym - w).sum()  # measured 0.64 (int4) on t(3) weights
    x = rng.normal(size=(5, 80)).astype(np.float32)
    assert np.abs(_matmul_nbits_in_onnxruntime(stored, rep, x, 40, 80) - x @ deq.T).max() <= 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_chunked_quantization_and_batched_encoding_equal_one_pass_per_mix(bits, symmetric, monkeypatch):
    """quantize_nbits runs rows in cache-sized chunks, and a batch encodes every customer's rows in
    one call (emit.encode_mixes): both must give exactly the bytes of one pass over one customer."""
    import soup_export.quantize as quantize
    from soup_export.emit import encode_mixes
    from soup_export.graph import Stored, _encode_one

    rng = np.random.default_rng(bits + symmetric)
    fused = rng.normal(size=(3, 37, 80)).astype(np.float32)  # 3 mixes; 80 columns: padded, odd block count
    rep = Rep("nbits", bits=bits, block=32, symmetric=symmetric)
    whole = [quantize_nbits(w, rep) for w in fused]
    monkeypatch.setattr(quantize, "CHUNK_VALUES", 5 * 96)  # 5 rows per chunk: 37 rows end in a short chunk
    for w, ref in zip(fused, whole):
        got = quantize_nbits(w, rep)
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    for how in ("nbits-linear", "nbits-gather"):
        spec = Stored("w", np.dtype(np.uint8), (), "w", how, rep, "q")
        for got, w in zip(encode_mixes(fused, spec), fused):
            ref = _encode_one(w, spec)
            assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), how


def _dyadic(rng, size, scale):
    """Small multiples of powers of two: every product and partial sum below is exact in fp32, so
    the fused values are the same in any order of summation."""
    return (rng.integers(-64, 65, size=size) * scale).astype(np.float32)


def _native_kernel_or_skip():
    """The kernel; a compiler that is present but fails to build it fails the test (only a machine
    without one, or a run with SOUP_NATIVE=0, skips: CI has one, so the kernel is tested there)."""
    import os
    import shutil

    from soup_export import native

    if os.environ.get("SOUP_NATIVE") == "0":
        pytest.skip("SOUP_NATIVE=0 disables the kernel")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler: batch export uses the torch path")
    native._build(cc)  # raises with the compiler's error
    native._load.cache_clear()
    assert native.kernel() is not None
    return native


@pytest.mark.parametrize("mixes,n,rows,cols,threads", [(13, 5, 7, 96, 3), (2, 5, 7, 96, 3), (5, 4, 7, "chunk", 1),
                                                       (5, 4, 7, "chunk", 2), (1, 5, 7, 96, 3), (1, 4, 7, 8192, 2)])
def test_native_kernel_quantizes_exactly_like_the_torch_path(mixes, n, rows, cols, threads):
    """The compiled fuse-and-quantize kernel against the reference, S + A @ E then quantize_nbits,
    bit for bit: on exact sums its levels (round half to even, clamped), scales (signed extreme,
    all-zero blocks) and nibble order must all be the same. 13 mixes are full tiles and a narrower
    one on every build (tiles of 8 with AVX-512, 6 with AVX2); rows are split over threads
    unevenly. "chunk" columns make a batch's pieces 4 rows of every expert whatever this CPU's L2
    (the chunk size), so 7 rows end in a shorter piece, and each piece prefetches the next.
    One mix takes the kernel's other path (four experts at a time, then the rest, over spans of 512 values that
    cross rows). A batch is checked both ways its tiles can read the bank: from copies of each
    chunk, and in place (which of the two a batch uses is measured per machine)."""
    native = _native_kernel_or_skip()
    if cols == "chunk":
        cols = native.chunk_size() // (4 * n)
        assert cols % 32 == 0 and native.chunk_size() // (n * cols) == 4
    _check_exact_fusion(native, mixes, n, rows, cols, threads)


def test_native_kernel_writes_nothing_for_an_empty_matrix():
    native = _native_kernel_or_skip()
    for rows, cols in ((4, 0), (0, 64)):
        q, scales = native.quantize(np.zeros((rows, cols), np.float32), threads=2)
        assert q.size == scales.size == 0
        q, scales = native.fuse_quantize(np.zeros((rows, cols), np.float32), np.zeros((3, rows, cols), np.float32),
                                         np.ones((2, 3), np.float32), threads=2)
        assert q.shape[:2] == (2, rows) and q.size == scales.size == 0


def test_native_kernel_is_exact_at_every_tile_width():
    """A batch's mixes go through tiles of the kernel's widest width and its last ones through one
    tile of their own width: every width from 1 to the widest (and two full tiles) must be exact."""
    native = _native_kernel_or_skip()
    widest = native.tile_width()
    assert widest in (2, 6, 8)  # the widths the source defines (generic, AVX2 and NEON, AVX-512)
    for mixes in range(1, 2 * widest + 2):
        _check_exact_fusion(native, mixes, 3, 5, 64, 2)


def _check_exact_fusion(native, mixes, n, rows, cols, threads):
    rng = np.random.default_rng(mixes + cols)
    shared, bank = _dyadic(rng, (rows, cols), 2.0 ** -6), _dyadic(rng, (n, rows, cols), 2.0 ** -6)
    alphas = (rng.integers(-8, 9, size=(mixes, n)) * 2.0 ** -3).astype(np.float32)
    shared[2, :32], bank[:, 2, :32] = 0, 0  # an all-zero block: scale 1
    shared[4, :32], bank[:, 4, :32] = -0.0, -0.0  # negative zeros too
    shared[3, 32:64] = (np.arange(32) - 16) * 2.0 ** -5  # scale 1/16: levels at every half, ties both ways
    bank[:, 3, 32:64] = 0
    rep = Rep("nbits", bits=4, block=32)
    for in_place in (False, True):
        q, scales = native.fuse_quantize(shared, bank, alphas, threads=threads, in_place=in_place)
        for m in range(mixes):
            fused = shared + np.tensordot(alphas[m], bank, axes=1)
            ref = quantize_nbits(fused, rep)
            assert np.array_equal(q[m], ref["q"]) and np.array_equal(scales[m], ref["scales"]), (mixes, m, in_place)
        assert scales[0, 2, 0] == scales[0, 4, 0] == 1.0 and scales[0, 3, 1] == 2.0 ** -4


def test_batch_reads_are_measured_once_per_machine_kept_and_can_be_forced(monkeypatch, tmp_path):
    """How a batch's tiles read the bank (in place or through copies: the same bytes, see the test
    below) is timed once per thread count, kept beside the library, timed again only if that entry
    is unreadable or for another thread count, and SOUP_NATIVE_READS decides instead when set (a
    wrong value is a user error). The kernel is called with the answer, for a batch only."""
    from soup_train.errors import ConfigError

    native = _native_kernel_or_skip()
    measured = native.calibrate_reads(2, experts=3, rows=4, cols=64, mixes=9, rounds=2)  # the real timing
    assert set(measured["ms"]) == {"in-place", "copy"} and all(t > 0 for t in measured["ms"].values())
    assert measured["in_place"] == (measured["ms"]["in-place"] < measured["ms"]["copy"])
    monkeypatch.delenv("SOUP_NATIVE_READS", raising=False)
    lib, calls, modes = native.kernel(), [], []
    monkeypatch.setattr(lib, "soup_path", tmp_path / "native_q4-test.so")
    monkeypatch.setattr(native, "calibrate_reads", lambda threads: calls.append(threads) or
                        {"in_place": threads == 2, "ms": {"in-place": 1.0, "copy": 2.0}})

    class Spy:  # the kernel, recording the reads each fuse_q4 call was given
        def __getattr__(self, name):
            return getattr(lib, name)

        def fuse_q4(self, *args):
            modes.append(args[-2])  # in_place (the last argument says whether the bank is bf16)
            return lib.fuse_q4(*args)

    monkeypatch.setattr(native, "kernel", Spy)
    native._measured_reads.cache_clear()
    shared, bank, alphas = np.ones((2, 32), np.float32), np.ones((3, 2, 32), np.float32), np.ones((4, 3), np.float32)
    try:
        assert native.reads_in_place(2) is True and calls == [2]  # measured, and kept
        (kept,) = tmp_path.glob("*.reads.json")
        native._measured_reads.cache_clear()  # another process: read back, not measured
        assert native.reads_in_place(2) is True and calls == [2]
        assert native.reads_in_place(1) is False and calls == [2, 1]  # another thread count: its own timing
        native.fuse_quantize(shared, bank, alphas, 2)
        native.fuse_quantize(shared, bank, alphas, 1)
        native.fuse_quantize(shared, bank, alphas[:1], 2)  # one mix: no tiles, nothing asked
        assert modes == [1, 0, 0]
        kept.write_text("{")
        native._measured_reads.cache_clear()
        assert native.reads_in_place(2) is True and calls == [2, 1, 2]  # unreadable: measured again
        monkeypatch.setenv("SOUP_NATIVE_READS", "copy")
        native.fuse_quantize(shared, bank, alphas, 2)
        assert native.reads_in_place(2) is False and modes[-1] == 0 and calls == [2, 1, 2]
        monkeypatch.setenv("SOUP_NATIVE_READS", "direct")
        for ask in (native.check_settings, lambda: native.reads_in_place(2)):
            with pytest.raises(ConfigError, match="SOUP_NATIVE_READS='direct': expected one of in-place, copy"):
                ask()
    finally:
        native._measured_reads.cache_clear()


@pytest.mark.parametrize("n,rows,cols", [(32, 200, 352), (7, 30, 160), (3, 25, 4096)])
def test_native_kernel_gives_a_mix_the_same_bytes_alone_and_in_any_batch(n, rows, cols):
    """A shipping-only single build fuses its one mix four experts at a time (then the rest: 32, 7
    and 3 experts take either loop or both); a batch fuses tiles of up to 8 mixes (6 with AVX2).
    Each mix's sum must be the same chain of multiply-adds either way, so that a customer's bytes
    do not depend on the batch it is exported in: checked on values whose sums do round, for a mix
    at every tile position and over uneven thread splits."""
    native = _native_kernel_or_skip()
    rng = np.random.default_rng(n * rows)
    shared = rng.normal(size=(rows, cols)).astype(np.float32)
    bank = rng.normal(size=(n, rows, cols)).astype(np.float32)
    alphas = rng.normal(size=(13, n)).astype(np.float32)
    q, scales = native.fuse_quantize(shared, bank, alphas, threads=2)
    copied = native.fuse_quantize(shared, bank, alphas, threads=3, in_place=False)
    in_place = native.fuse_quantize(shared, bank, alphas, threads=3, in_place=True)
    assert all(np.array_equal(a, b) for a, b in zip((*copied, *in_place), (q, scales, q, scales)))
    widest = native.tile_width()
    starts = list(range(0, 13, widest))  # 13 mixes: full tiles, then one narrower tile
    for m in sorted({i for s in starts for i in (s, min(s + widest, 13) - 1)}):  # each tile's first and last
        for threads in (1, 3):
            q1, s1 = native.fuse_quantize(shared, bank, alphas[m:m + 1], threads=threads)
            assert np.array_equal(q1[0], q[m]) and np.array_equal(s1[0], scales[m]), (m, threads)
    empty = native.fuse_quantize(shared, bank, alphas[:0], threads=2)  # no mix: nothing written, nothing read
    assert empty[0].shape[0] == empty[1].shape[0] == 0
    ref = quantize_nbits(shared + np.tensordot(alphas[12].astype(np.float64), bank, axes=1).astype(np.float32),
                         Rep("nbits", bits=4, block=32))
    np.testing.assert_allclose(scales[12], ref["scales"], rtol=1e-5)  # the sum itself: fp32 rounding


def test_added_tokens_are_read_without_parsing_the_whole_tokenizer(debug_ckpt):
    """The EOS id for the HF side files comes from tokenizer.json's added_tokens array, decoded
    alone: the same list as a full parse, on the real tokenizer and where the key's name also
    appears as a value, as an escaped vocabulary entry, or not at all."""
    from soup_export.resolve import Bank, added_tokens

    text = (Bank.open(debug_ckpt).path / "tokenizer.json").read_text()
    assert added_tokens(text) == json.loads(text)["added_tokens"] != []
    tricky = json.dumps({"note": "added_tokens", "model": {"vocab": {'"added_tokens": [': 5}},
                         "added_tokens": [{"id": 3, "content": "<eos>"}]})
    assert added_tokens(tricky) == [{"id": 3, "content": "<eos>"}]
    assert added_tokens(json.dumps({"model": {"vocab": {"added_tokens": 1}}})) == []


@pytest.mark.parametrize("direct", [True, False])
def test_a_data_file_hashed_while_written_has_the_files_sha256(tmp_path, direct):
    """Holes between tensors are zeros in the file and in the hash, the file ends where finish()
    says (also before the end of a direct write's padding); a write behind the previous one drops
    the hash, and the manifest then reads the file; a known hash whose size no longer matches the
    file is not used."""
    from soup_export.datafile import HashedDataFile
    from soup_export.manifest import file_table

    fh = HashedDataFile(tmp_path / "a.data", direct=direct)
    fh.write_at(0, np.arange(5, dtype=np.float32))
    fh.write_at(64, b"xyz")
    fh.write_at(200_000, np.ones((3, 4), np.uint8))  # a hole longer than the zero buffer
    digest = fh.finish(300_000)
    assert (tmp_path / "a.data").stat().st_size == 300_000 and digest == sha(tmp_path / "a.data")
    short = HashedDataFile(tmp_path / "c.data", direct=direct)
    short.write_at(10, b"abc")
    assert short.finish(20) == hashlib.sha256(bytes(10) + b"abc" + bytes(7)).hexdigest()
    assert (tmp_path / "c.data").read_bytes() == bytes(10) + b"abc" + bytes(7)
    back = HashedDataFile(tmp_path / "b.data", direct=direct)
    back.write_at(64, b"xyz")
    back.write_at(0, b"ab")
    assert back.finish(67) is None
    assert (tmp_path / "b.data").read_bytes() == b"ab" + bytes(62) + b"xyz"
    table = file_table(tmp_path, {"a.data": ("0" * 64, 300_000), "b.data": ("0" * 64, 1)})
    assert table["a.data"]["sha256"] == "0" * 64  # trusted: the size matches
    assert table["b.data"] == {"sha256": sha(tmp_path / "b.data"), "bytes": 67}  # size differs: read


def _takes_direct_io(directory: Path) -> bool:
    """Whether this directory's file system takes an aligned O_DIRECT write."""
    import errno
    import os

    from soup_export.datafile import ALIGN

    if not hasattr(os, "O_DIRECT"):
        return False
    raw = np.zeros(2 * ALIGN, np.uint8)
    block = raw[-raw.ctypes.data % ALIGN:][:ALIGN]
    try:
        fd = os.open(directory / "probe.direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        return os.pwrite(fd, memoryview(block), 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(directory / "probe.direct")


def _data_file_writes(seed: int = 3):
    """(offset, bytes) writes of many sizes with alignment holes, and the file they make."""
    rng = np.random.default_rng(seed)
    writes, offset = [], 0
    for size in [100, 3000, 70_000, 9000, 17, 1024, 8191, 8, 20_000, 5]:
        writes.append((offset, rng.integers(0, 256, size, dtype=np.uint8)))
        offset += size + int(rng.integers(0, 100))
    expected = bytearray(offset + 50)
    for at, data in writes:
        expected[at:at + data.size] = data.tobytes()
    return writes, bytes(expected)


@pytest.mark.parametrize("direct", [True, False])
def test_a_data_file_stages_its_writes_in_whole_chunks(tmp_path, monkeypatch, direct):
    """Every write goes through the chunk buffer: few system calls, made by the I/O threads while
    the next chunk is staged, each (with direct I/O) at an offset and of a length that are
    multiples of ALIGN, from an aligned address, except the file's unaligned end, written without
    O_DIRECT, so that the file needs no truncation; the bytes, the file's length and its SHA-256
    are those of the same writes made one by one."""
    import fcntl
    import os
    import threading

    from soup_export import datafile

    monkeypatch.setattr(datafile, "CHUNK", 16384)
    writes, expected = _data_file_writes()
    calls, real, opened, truncated = [], os.pwrite, {}, []

    def spy_write(fd, b, at):
        calls.append((at, memoryview(b), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)),
                      threading.current_thread().name))
        return real(fd, b, at)

    monkeypatch.setattr(datafile.os, "pwrite", spy_write)
    real_open, real_truncate = os.open, os.ftruncate

    def spy_open(path, flags, mode=0o777):
        opened["flags"] = flags
        return real_open(path, flags, mode)

    monkeypatch.setattr(datafile.os, "open", spy_open)
    monkeypatch.setattr(datafile.os, "ftruncate", lambda fd, n: truncated.append(n) or real_truncate(fd, n))
    fh = datafile.HashedDataFile(tmp_path / "d.data", direct=direct)
    for at, data in writes:
        fh.write_at(at, data)
    digest = fh.finish(len(expected))
    assert (tmp_path / "d.data").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert bool(opened["flags"] & getattr(os, "O_DIRECT", 0)) == (direct and hasattr(os, "O_DIRECT"))
    chunks = -(-len(expected) // 16384)  # the zeros after the last write (to finish's size) are staged too
    tail = fh.direct and len(expected) % datafile.ALIGN != 0
    assert len(calls) == chunks + tail < len(writes)  # whole chunks, the last one partial (and its end apart)
    assert [at for at, *_ in calls] == sorted(at for at, *_ in calls) and not truncated
    assert all(name.startswith("soup-export-io") for *_, name in calls[:chunks])  # the chunks: the I/O threads
    if fh.direct:
        *whole, (end, rest, end_direct, _) = calls
        assert all(d and at % datafile.ALIGN == 0 and view.nbytes % datafile.ALIGN == 0
                   and np.frombuffer(view, np.uint8).ctypes.data % datafile.ALIGN == 0 for at, view, d, _ in whole)
        assert not end_direct and end + rest.nbytes == len(expected) and rest.nbytes < datafile.ALIGN
    assert fh.direct == (direct and _takes_direct_io(tmp_path))  # kept to the end where the file system has it (its probe writes too)


@pytest.mark.parametrize("direct", [True, False])
def test_a_data_file_raises_a_failed_background_write_and_closes_only_after_it(tmp_path, monkeypatch, direct):
    """A chunk's write runs in an I/O thread: its failure (a full disk) is raised by the writer's
    next wait, at the latest by finish, never lost; and close (an export that failed elsewhere)
    returns only once the chunk being written is done, so no write outlives its descriptor."""
    import errno
    import os
    import threading
    import time

    from soup_export import datafile

    monkeypatch.setattr(datafile, "CHUNK", 8192)
    real, done = os.pwrite, []

    def full_disk(fd, b, at):
        if at >= 8192:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, b, at)

    monkeypatch.setattr(datafile.os, "pwrite", full_disk)
    fh = datafile.HashedDataFile(tmp_path / "full.data", direct=direct)
    with pytest.raises(OSError, match="No space left"):
        fh.write_at(0, np.ones(3 * 8192, np.uint8))  # the third chunk waits for the second's write
        fh.finish(3 * 8192)
    fh.close()
    assert fh.fd is None

    def slow(fd, b, at):
        time.sleep(0.2)  # still writing when close() is called
        n = real(fd, b, at)
        done.append(threading.current_thread().name)
        return n

    monkeypatch.setattr(datafile.os, "pwrite", slow)
    fh = datafile.HashedDataFile(tmp_path / "slow.data", direct=direct)
    fh.write_at(0, np.ones(8192, np.uint8))  # one whole chunk: handed to an I/O thread at once
    fh.close()
    assert done and done[0].startswith("soup-export-io") and fh.fd is None
    assert (tmp_path / "slow.data").read_bytes() == bytes([1]) * 8192


def test_a_data_file_falls_back_to_ordinary_writes_where_direct_io_is_refused(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT when the file is opened, or only at its first write (both
    EINVAL), gets ordinary writes with the same bytes and hash; SOUP_DIRECT_IO=0 turns it off."""
    import errno
    import os

    from soup_export import datafile

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system")
    writes, expected = _data_file_writes(4)
    real_open, real_pwrite, refused = os.open, os.pwrite, []

    def refuse_open(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def refuse_write(fd, data, at):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, at)

    for name, fake in (("open", refuse_open), ("pwrite", refuse_write)):
        with monkeypatch.context() as m:
            m.setattr(datafile.os, name, fake)
            fh = datafile.HashedDataFile(tmp_path / f"{name}.data", direct=True)
            for at, data in writes:
                fh.write_at(at, data)
            assert fh.finish(len(expected)) == hashlib.sha256(expected).hexdigest()
        assert (tmp_path / f"{name}.data").read_bytes() == expected and not fh.direct
    assert refused == ["open", "write"]  # each refused once, then ordinary writes
    monkeypatch.setenv("SOUP_DIRECT_IO", "0")
    assert not datafile.direct_io() and not datafile.HashedDataFile(tmp_path / "x").direct
    monkeypatch.setenv("SOUP_DIRECT_IO", "1")
    assert datafile.direct_io()


def test_files_written_from_memory_go_direct_when_large(tmp_path, monkeypatch):
    """write_file: a file of DIRECT_MIN bytes or more is written as a data file is (O_DIRECT where
    the system has it), a smaller one as usual; both hold exactly the bytes given."""
    import os

    from soup_export import datafile

    opened, real_open = [], os.open

    def spy_open(path, flags, mode=0o777):
        opened.append((Path(path).name, bool(flags & getattr(os, "O_DIRECT", 0))))
        return real_open(path, flags, mode)

    monkeypatch.setattr(datafile.os, "open", spy_open)
    big, small = os.urandom(datafile.DIRECT_MIN + 4097), b'{"a": 1}\n'
    datafile.write_file(tmp_path / "big.json", big)
    datafile.write_file(tmp_path / "small.json", small)
    assert (tmp_path / "big.json").read_bytes() == big and (tmp_path / "small.json").read_bytes() == small
    assert opened == [("big.json", hasattr(os, "O_DIRECT"))]  # the small one by Path.write_bytes
    monkeypatch.setenv("SOUP_DIRECT_IO", "0")
    opened.clear()
    datafile.write_file(tmp_path / "big2.json", big)
    assert (tmp_path / "big2.json").read_bytes() == big and opened == []


def test_the_bank_pass_fuses_small_tensors_on_one_torch_thread_and_restores_the_count(debug_ckpt, monkeypatch):
    """The norms' vectors are fused with torch on one thread (a parallel region's workers would spin
    on the cores the kernel needs next), larger tensors with every thread; the count is restored
    after each, even when a fusion raises."""
    from soup_export import emit

    from soup_export.graph import Arch

    bank = Bank.open(debug_ckpt)
    _, g = graph_bytes(Arch.from_hf(bank.info.run.model.to_hf()), make_plan("fp32", {}))
    alphas = [bank.alpha(np.array([0.5, 0.25, 0.25], np.float32))] * 2
    seen, real = {}, emit.combine_many

    def spy(shared, *args, **kwargs):
        seen[shared.numel()] = torch.get_num_threads()
        return real(shared, *args, **kwargs)

    monkeypatch.setattr(emit, "combine_many", spy)
    monkeypatch.setattr(emit, "SMALL", 1000)  # the debug model's tensors are all small: split them here
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in emit.fused_weights(bank, g, alphas, exact=True):
            assert torch.get_num_threads() == 2
        assert {n < 1000 for n in seen} == {True, False}
        assert all(threads == (1 if n < 1000 else 2) for n, threads in seen.items()), seen

        def boom(shared, *_, **__):
            if shared.numel() < 1000:
                raise OSError("disk gone")
            return real(shared, *_, **__)

        monkeypatch.setattr(emit, "combine_many", boom)
        with pytest.raises(OSError):
            for _ in emit.fused_weights(bank, g, alphas, exact=True):
                pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_native_quantization_of_fused_values_equals_quantize_nbits_bit_for_bit():
    """Every int4 export (single builds too) encodes through the compiled quantization when there
    is one: on the same fp32 values it must give quantize_nbits' bytes exactly, through encode_mixes
    for both the MatMulNBits and the gather layouts."""
    from soup_export.emit import encode_mixes
    from soup_export.graph import Stored, _encode_one

    native = _native_kernel_or_skip()
    rng = np.random.default_rng(7)
    fused = rng.normal(size=(3, 37, 96)).astype(np.float32)
    fused[0, 1, :32] = 0  # an all-zero block
    fused[1, 2, 32:64] = (np.arange(32) - 16) * 2.0 ** -5  # ties at every half
    fused[2, 3, :32] = rng.normal(size=32).astype(np.float32) * 1e-40  # subnormals
    rep = Rep("nbits", bits=4, block=32)
    for w in fused:
        q, scales = native.quantize(w, threads=2)
        ref = quantize_nbits(w, rep)
        assert np.array_equal(q, ref["q"]) and np.array_equal(scales, ref["scales"])
    for how in ("nbits-linear", "nbits-gather"):
        spec = Stored("w", np.dtype(np.uint8), (), "w", how, rep, "q")
        for got, w in zip(encode_mixes(fused, spec), fused):
            ref = _encode_one(w, spec)
            assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), how


def test_native_kernel_falls_back_without_a_compiler_or_when_disabled(monkeypatch, tmp_path):
    from soup_export import native

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("SOUP_NATIVE", raising=False)
    try:
        for cc in ("/nonexistent/cc", "false", "false"):  # no compiler; one that fails (a warning), then remembered
            monkeypatch.setenv("CC", cc)
            native._load.cache_clear()
            assert native.kernel() is None and not native.applies(Rep("nbits", bits=4, block=32), (4, 32), (np.zeros((2, 4, 32)),))
            assert not native.quantizes(Rep("nbits", bits=4, block=32), (4, 32))
        assert len(list((tmp_path / "soup" / "native").glob("*.failed"))) == 1
        monkeypatch.delenv("CC")
        monkeypatch.setenv("SOUP_NATIVE", "0")
        native._load.cache_clear()
        assert native.kernel() is None
    finally:
        native._load.cache_clear()


@pytest.mark.parametrize("tier,params", [("fp16", None), ("int8", None), ("mixed", None), ("int4", None),
                                         ("int4", {"symmetric": "false"})])
def test_every_tier_runs_and_stays_close_on_held_out_text(hf_dir, debug_data, tmp_path, tier, params):
    from soup_export.evaltext import from_data
    from soup_export.parity import ParityConfig, quantized_vs_fp32

    fp32 = write_tier(hf_dir, tmp_path / "fp32", "fp32")
    q = write_tier(hf_dir, tmp_path / tier, tier, params)
    windows = from_data(debug_data, "sources", np.array([0.5, 0.5, 0.0]), 8, 32)
    report = quantized_vs_fp32(fp32, q, tier, windows, ParityConfig().max_dppl(tier))
    # judged by dPPL and KL, not top-1: a barely trained model's near-ties make top-1 flip on any noise
    max_kl = {"fp16": 1e-4, "int8": 1e-3, "mixed": 5e-3, "int4": 2e-2}[tier]  # local: 6e-9, 5e-6, 4e-5, 5e-4
    assert report["dppl"] <= ParityConfig().max_dppl(tier) and 0 <= report["mean_kl"] <= max_kl
    assert (tmp_path / tier / "model.onnx.data").stat().st_size < (tmp_path / "fp32" / "model.onnx.data").stat().st_size


# ----------------------------------------------------------------------------- budget
def test_size_parsing():
    assert parse_size("12MB") == 12_000_000 and parse_size("1.5 KiB") == 1536 and parse_size("800") == 800
    for bad in ("twelve", "12XB", "-3MB", "0"):
        with pytest.raises(BudgetError):
            parse_size(bad)


def test_predicted_size_is_exact_for_every_tier(hf_dir, tmp_path):
    arch, _ = read_arch(hf_dir)
    for tier, params in [(t, None) for t in TIERS] + [("int4", {"symmetric": "false"}), ("mixed", {"symmetric": "false"})]:
        out = write_tier(hf_dir, tmp_path / f"{tier}-{bool(params)}", tier, params)
        actual = (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
        assert predict(arch, tier, params).total == actual, (tier, params)
    assert predict(arch, "int4", {"symmetric": "false"}).total > predict(arch, "int4").total  # the zero points


def test_budget_picks_the_highest_precision_that_fits_or_explains_why_none_does(hf_dir):
    arch, _ = read_arch(hf_dir)
    sizes = {t: predict(arch, t).total for t in TIERS}
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["mixed"] > sizes["int4"]
    assert choose_tier(arch, "auto", None)[0] == "fp32"
    assert choose_tier(arch, "auto", sizes["int8"])[0] == "int8"
    assert choose_tier(arch, "auto", sizes["int8"] - 1)[0] == "mixed"
    with pytest.raises(BudgetError, match=r"no tier fits .*int4 .*model\.embed_tokens\.weight"):
        choose_tier(arch, "auto", sizes["int4"] - 1)
    with pytest.raises(BudgetError, match="no tier fits"):
        choose_tier(arch, "fp32", sizes["fp16"])


def test_storage_records_the_embedding_fallback_when_the_width_is_not_a_block_multiple():
    from dataclasses import replace

    from soup_export.graph import Arch

    arch = Arch(vocab=300, hidden=48, layers=1, heads=4, kv_heads=2, head_dim=12, ff=96, max_pos=64,
                rope_theta=10000.0, eps=1e-5, tie=True)
    g = DecoderGraph(arch, make_plan("int4"))
    storage = g.storage()
    assert storage["embed"]["describe"] == "fp16" and storage["lm_head"]["describe"] == "fp16"
    assert storage["requested"]["embed"]["describe"] == "int4 block 32" and "not a multiple of block" in storage["notes"][0]
    assert not DecoderGraph(replace(arch, hidden=64, head_dim=16), make_plan("int4")).storage()["notes"][:1] == storage["notes"][:1]
