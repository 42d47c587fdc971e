"""The engine: both executors write every tier, the same bytes where they sum in the same order and
within a stated fp32 bound where they do not; the settings are typed, read once and recorded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from soup_export.bank import Bank
from soup_export.build import ExportSpec, batch
from soup_export.engine import EngineSettings
from soup_export.mix import validate
from soup_export.quantize import TIERS, make_plan

# A shipping-only fast batch fuses every mix in one matrix product (or the int4 kernel) instead of
# `combine` per mix: the same sums in another order. Measured on the 16-expert synthetic soup below:
# fp32 values (weights, norms, int4 scales) differ by at most 1.6e-7 relative to the largest value of
# their tensor, and no int4 level differs. The bounds sit a few times above (a level may flip where a
# value lies on a rounding boundary).
FP32_REL_BOUND = 1e-6
INT4_LEVEL_FLIPS = 1e-3


def files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def bank16(debug_data, tmp_path_factory) -> Path:
    """A synthetic soup of 16 full-rank experts, so that every fusion path (one matrix product per
    batch, the int4 kernel) applies."""
    from dataclasses import replace

    from soup_train.config import ModelConfig, RunConfig, SoupConfig
    from soup_train.synthetic import write_synthetic_checkpoint

    run = RunConfig(model=ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384),
                    soup=SoupConfig(n_experts=16))
    run = replace(run, data=replace(run.data, path=str(debug_data), domains="sources"))
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("bank16") / "run", run, debug_data)


def mixes(ckpt: Path):
    domains = Bank.open(ckpt).info.domains
    return [validate({domains[0]: 0.7, domains[1]: 0.3}, domains, "weights", "acme"),
            validate({domains[-1]: 1.0}, domains, "weights", "globex"),
            validate({d: 1.0 for d in domains}, domains, "weights", "initech")]


@pytest.mark.parametrize("tier", TIERS)
def test_both_executors_write_the_same_bytes_for_every_tier(bank16, tmp_path, tier):
    """With HF weights written (parity's path), fast fuses every mix by `combine` as the reference
    does, and its compiled quantization is quantize_nbits bit for bit: every file is the same."""
    ms = mixes(bank16)
    for executor in ("reference", "fast"):
        spec = ExportSpec(quant=tier, parity=False, engine=EngineSettings(executor=executor))
        batch(bank16, ms, tmp_path / executor, spec, progress=False)
    ref, fast = files(tmp_path / "reference"), files(tmp_path / "fast")
    assert ref.keys() == fast.keys() and len(ref) > 20
    differ = sorted(k for k in ref if ref[k] != fast[k] and k != "batch.json")
    assert differ == [], differ
    for name in ("acme", "globex"):
        recorded = json.loads((tmp_path / "fast" / name / "manifest.json").read_text())["engine"]
        assert recorded["executor"] == "fast" and set(recorded) >= {"kernel", "reads", "writes", "direct_io"}
        assert json.loads((tmp_path / "reference" / name / "manifest.json").read_text())["engine"]["executor"] \
            == "reference"


def _data(root: Path) -> tuple[dict, bytes]:
    import onnx

    model = onnx.load(str(root / "onnx" / "model.onnx"), load_external_data=False)
    layout = {t.name: ({e.key: e.value for e in t.external_data}, t.data_type, tuple(t.dims))
              for t in model.graph.initializer if t.external_data}
    return layout, (root / "onnx" / "model.onnx.data").read_bytes()


def _array(layout, data, name):
    import onnx

    info, dtype, dims = layout[name]
    off, n = int(info["offset"]), int(info["length"])
    return np.frombuffer(data[off:off + n], onnx.helper.tensor_dtype_to_np_dtype(dtype)).reshape(dims)


@pytest.mark.parametrize("tier", ["fp32", "int4"])
def test_a_shipping_only_fast_batch_is_the_reference_to_fp32_rounding(bank16, tmp_path, tier):
    """Without HF weights, fast sums in another order (one matrix product, or the int4 kernel): its
    values stay within FP32_REL_BOUND of the reference's, and int4 levels flip on at most
    INT4_LEVEL_FLIPS of the values (a value at a rounding boundary)."""
    from soup_export.quantize import _unpack_nibbles

    ms = mixes(bank16)
    for executor in ("reference", "fast"):
        spec = ExportSpec(quant=tier, parity=False, keep_hf=False, engine=EngineSettings(executor=executor))
        batch(bank16, ms, tmp_path / executor, spec, progress=False)
    worst, flips, values, checked = 0.0, 0, 0, 0
    for m in ms:
        (ref_layout, ref), (fast_layout, fast) = _data(tmp_path / "reference" / m.name), _data(tmp_path / "fast" / m.name)
        assert ref_layout == fast_layout
        for name in ref_layout:
            a, b = _array(ref_layout, ref, name), _array(fast_layout, fast, name)
            if a.dtype == np.float32:
                scale = max(float(np.abs(a).max()), 1e-30)
                worst = max(worst, float(np.abs(a - b).max()) / scale)
            elif name.endswith(".q4"):
                la, lb = _unpack_nibbles(a).astype(int), _unpack_nibbles(b).astype(int)
                assert np.abs(la - lb).max() <= 1, name
                flips, values = flips + int((la != lb).sum()), values + la.size
            checked += 1
    assert checked > 10
    assert worst <= FP32_REL_BOUND, worst
    if tier == "int4":
        assert values and flips / values <= INT4_LEVEL_FLIPS, flips / values


def test_settings_are_read_once_validated_and_recorded(debug_ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from soup_export.cli import main
    from soup_train.errors import ConfigError

    env = {"SOUP_NATIVE": "0", "SOUP_NATIVE_READS": "in-place", "SOUP_DIRECT_IO": "0"}
    assert EngineSettings.from_env("reference", env) == EngineSettings("reference", False, "in-place", False)
    assert EngineSettings.from_env(environ={}) == EngineSettings()
    for bad in ({"SOUP_NATIVE_READS": "sideways"}, {"SOUP_DIRECT_IO": "no"}):
        with pytest.raises(ConfigError):
            EngineSettings.from_env(environ=bad)
    with pytest.raises(ConfigError):
        EngineSettings(executor="turbo")
    monkeypatch.setenv("SOUP_DIRECT_IO", "0")
    monkeypatch.setenv("SOUP_NATIVE", "0")
    domains = Bank.open(debug_ckpt).info.domains
    r = CliRunner().invoke(main, ["build", str(debug_ckpt), "--mix", f"{domains[0]}=1", "--quant", "int4",
                                  "--no-parity", "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    engine = json.loads((tmp_path / "x" / "manifest.json").read_text())["engine"]
    assert engine == {"executor": "fast", "kernel": False, "reads": None, "direct_io": False, "writes": "buffered"}
    monkeypatch.setenv("SOUP_NATIVE_READS", "sideways")
    r = CliRunner().invoke(main, ["build", str(debug_ckpt), "--mix", f"{domains[0]}=1", "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "SOUP_NATIVE_READS='sideways'" in r.output and not (tmp_path / "y").exists()


def test_single_build_and_its_stage_commands_write_the_same_onnx(debug_ckpt, tmp_path):
    """`build` composes the stage functions: its onnx/ equals `resolve` then `quantize` of the same mix."""
    from click.testing import CliRunner

    from soup_export.cli import main

    domains = Bank.open(debug_ckpt).info.domains
    mix = f"{domains[0]}=0.5,{domains[1]}=0.5"
    runner = CliRunner()
    for args in (["build", str(debug_ckpt), "--mix", mix, "--quant", "int8", "--no-parity", "--out", str(tmp_path / "b")],
                 ["resolve", str(debug_ckpt), "--mix", mix, "--out", str(tmp_path / "hf")],
                 ["quantize", str(tmp_path / "hf"), "--quant", "int8", "--out", str(tmp_path / "q")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
    built, staged = files(tmp_path / "b" / "onnx"), files(tmp_path / "q")
    assert built == staged


def test_the_bank_pass_fuses_small_tensors_on_one_torch_thread_and_restores_the_count(debug_ckpt, monkeypatch):
    """The norms' vectors are fused with torch on one thread (a parallel region's workers would spin
    on the cores the kernel needs next), larger tensors with every thread; the count is restored
    after each, even when a fusion raises."""
    from soup_export.engine import fast as emit
    from soup_export.graph import compile_graph
    from soup_export.layout import Arch

    bank = Bank.open(debug_ckpt)
    _, g = compile_graph(Arch.from_hf(bank.info.run.model.to_hf()), make_plan("fp32", {}))
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


def test_a_batchs_kernel_reads_as_its_settings_say_and_the_manifest_records_it(bank16, tmp_path):
    """SOUP_NATIVE_READS (EngineSettings.reads) decides how a shipping-only batch's kernel reads the
    bank: both ways give the same bytes, and each manifest says which was used."""
    from soup_export.engine import native

    if native.kernel() is None:
        pytest.skip("no compiled kernel on this machine")
    ms = mixes(bank16)
    for reads in ("in-place", "copy"):
        spec = ExportSpec(quant="int4", parity=False, keep_hf=False, engine=EngineSettings(reads=reads))
        batch(bank16, ms, tmp_path / reads, spec, progress=False)
        for m in ms:
            assert json.loads((tmp_path / reads / m.name / "manifest.json").read_text())["engine"]["reads"] == reads
    assert files(tmp_path / "in-place").keys() == files(tmp_path / "copy").keys()
    differ = [k for k, v in files(tmp_path / "in-place").items() if files(tmp_path / "copy")[k] != v and k != "batch.json"]
    assert differ == []
