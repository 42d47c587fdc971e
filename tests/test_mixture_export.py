"""`soup-export mixture` and `soup-run` on a SmallTalk mixture: layout, one budget for all models,
per-model parity, routing parity, routing on the device equal to PyTorch's, integrity, CLI errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soup_export.cli import main as export_main
from soup_export.errors import BudgetError
from soup_export.mixture import choose_tier, members
from soup_train.errors import CheckpointError
from soup_train.smalltalk.routing import prefix_scores, route
from soup_train.smalltalk.run import SmallTalkRun

SCORE_TOL = 1e-4  # mean prefix log-likelihood, PyTorch fp32 vs onnxruntime fp32
TEXTS = ["It is a truth universally acknowledged, that a single man in possession",
         "def read_config(path):\n    with open(path) as fh:\n        return json.load(fh)",
         "Permission is hereby granted, free of charge, to any person obtaining a copy"]


@pytest.fixture(scope="module")
def mixture_fp32(smalltalk_run, tmp_path_factory):
    from soup_export.build import ExportSpec
    from soup_export.mixture import export_mixture

    out = tmp_path_factory.mktemp("mixture") / "fp32"
    export_mixture(smalltalk_run, out, ExportSpec(quant="fp32"), progress=False)
    return out


def test_layout_sizes_parity_and_routing_parity(smalltalk_run, mixture_fp32):
    m = json.loads((mixture_fp32 / "manifest.json").read_text())
    run = SmallTalkRun.open(smalltalk_run)
    assert m["kind"] == "smalltalk-mixture" and m["tier"] == "fp32" and m["prefix_len"] == run.prefix_len
    paths = [r["path"] for r in m["models"]]
    assert paths == ["routers/router_00", "routers/router_01", "experts/expert_00", "experts/expert_01"]
    on_disk = sum((mixture_fp32 / p / "onnx" / f).stat().st_size for p in paths for f in ("model.onnx", "model.onnx.data"))
    assert m["size"]["total"] == on_disk == sum(r["bytes"] for r in m["models"])
    assert all(r["bytes"] == r["predicted"] for r in m["models"])  # the prediction is exact
    for r in m["models"]:
        # parity (b) and (d) are enforced by the export; recomputed here from the files it wrote:
        # onnxruntime against transformers, logits and greedy tokens, within the model's context
        from soup_export.ort_model import OrtDecoder
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(mixture_fp32 / r["path"] / "hf")).eval()
        ort = OrtDecoder(mixture_fp32 / r["path"] / "onnx")
        ids = np.random.default_rng(0).integers(1, ort.arch.vocab, size=(2, ort.arch.max_pos))
        new = min(32, ort.arch.max_pos - 4)  # parity (d)'s 32 tokens
        with torch.no_grad():
            assert np.abs(ort.logits(ids) - hf(torch.as_tensor(ids)).logits.numpy()).max() <= 1e-4, r["path"]
            greedy = hf.generate(torch.as_tensor(ids[:1, :4]), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
        assert ort.greedy(ids[0, :4].tolist(), new) == greedy, r["path"]
        sub = json.loads((mixture_fp32 / r["path"] / "manifest.json").read_text())
        assert sub["kind"] == f"smalltalk-{r['kind']}" and sub["source"]["sha256"] == r["source"]["sha256"]
        assert f"{r['path']}/manifest.json" in m["files"]  # the mixture's table covers every model's manifest
    assert m["routing_parity"]["agreement"] >= 0.98 and sum(m["routing_parity"]["shares"]) == m["routing_parity"]["sequences"]
    text = (mixture_fp32 / "manifest.json").read_text()
    assert str(mixture_fp32) not in text and str(smalltalk_run) not in text  # no absolute paths


def test_hf_directories_are_the_runs_models(smalltalk_run, mixture_fp32):
    from transformers import AutoModelForCausalLM

    run = SmallTalkRun.open(smalltalk_run)
    expert = run.load_experts()[1]
    hf = AutoModelForCausalLM.from_pretrained(str(mixture_fp32 / "experts/expert_01/hf")).eval()
    x = torch.randint(0, run.config.expert.vocab_size, (2, 12))
    with torch.no_grad():
        assert (hf(x).logits - expert(x)).abs().max().item() <= 1e-5


def test_one_budget_for_the_whole_mixture(smalltalk_run, tmp_path):
    from soup_export.build import ExportSpec
    from soup_export.mixture import export_mixture

    run = SmallTalkRun.open(smalltalk_run)
    _, totals = choose_tier(members(run), "auto", None, None)
    budget = (totals["int4"] + totals["mixed"]) // 2  # only int4 fits, counted over all four models
    per_model_int8 = max(totals["int8"] // 4, 1)
    assert per_model_int8 < budget < totals["mixed"]  # a per-model budget would have allowed int8
    m = export_mixture(smalltalk_run, tmp_path / "small", ExportSpec(max_size=budget), progress=False)
    assert m["tier"] == "int4" and m["size"]["total"] <= budget and m["size"]["headroom"] == budget - m["size"]["total"]
    from soup_export.mixture import held_out, member_windows

    windows, routes = held_out(run)
    for member, r in zip(members(run), m["models"]):
        c = r["parity"]["c_quantized_vs_fp32"]
        assert c["tier"] == "int4" and member.rel == r["path"]
        # the export enforced c["max_dppl"]; its figures, recomputed from the files it wrote on the
        # model's held-out windows: the int4 graph in onnxruntime against transformers' fp32 model
        dppl, kl, tokens = _dppl_and_kl(tmp_path / "small" / r["path"], member_windows(member, windows, routes))
        assert c["tokens"] == tokens and c["dppl"] == pytest.approx(dppl, abs=1e-5), (r["path"], c, dppl)
        assert c["mean_kl"] == pytest.approx(kl, rel=1e-3), (r["path"], c, kl)
    assert m["routing_parity"]["agreement"] >= 0.9
    with pytest.raises(BudgetError, match="no tier fits the 4 models"):
        export_mixture(smalltalk_run, tmp_path / "none", ExportSpec(max_size=totals["int4"] // 2), progress=False)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none*"))


def _dppl_and_kl(root, windows: np.ndarray) -> tuple[float, float, int]:
    """dPPL and mean KL of root/onnx (onnxruntime) against root/hf (transformers, fp32) on `windows`."""
    from soup_export.ort_model import OrtDecoder
    from transformers import AutoModelForCausalLM

    x, y = torch.as_tensor(windows[:, :-1]), torch.as_tensor(windows[:, 1:])
    with torch.no_grad():
        lf = torch.log_softmax(AutoModelForCausalLM.from_pretrained(str(root / "hf")).eval()(x).logits.double(), -1)
    lq = torch.log_softmax(torch.as_tensor(OrtDecoder(root / "onnx").logits(windows[:, :-1])).double(), -1)
    nll_f, nll_q = (-lp.gather(-1, y[..., None]).mean() for lp in (lf, lq))
    return float(torch.exp(nll_q - nll_f)) - 1, float((lf.exp() * (lf - lq)).sum(-1).mean()), y.numel()


def test_device_routing_and_generation_equal_pytorch(smalltalk_run, mixture_fp32):
    from soup_run.generate import GenerationConfig, generate_ids
    from soup_run.mixture import RoutedMixture

    run = SmallTalkRun.open(smalltalk_run)
    device = RoutedMixture(mixture_fp32)
    routers, experts = run.load_routers(), run.load_experts()
    for text in TEXTS:
        ids = device.encode(text)
        window = np.asarray([ids[:run.prefix_len + 1]])
        ref = prefix_scores(routers, window, run.prefix_len)[0]
        assert np.abs(device.scores(ids) - ref).max() <= SCORE_TOL
        e, _ = device.route(text)
        assert e == route(ref[None])[0]
        prompt = ids[:run.config.expert.max_seq_len - 8]
        got = generate_ids(device.expert(e), prompt, GenerationConfig(max_new_tokens=8, stop_at_eos=False))
        x = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(8):
                x = torch.cat([x, experts[e](x)[:, -1].argmax(-1, keepdim=True)], 1)
        assert got == x[0, len(prompt):].tolist()


def test_soup_run_cli_routes_and_refuses_a_tampered_mixture(mixture_fp32, tmp_path):
    cmd = [sys.executable, "-m", "soup_run.cli"]
    prompt = "It is a truth universally acknowledged"
    proc = subprocess.run([*cmd, "generate", str(mixture_fp32), "--prompt", prompt, "--max-new-tokens", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(prompt), proc.stderr
    assert "-> expert " in proc.stderr and "router 1" in proc.stderr
    (tmp_path / "t.txt").write_text(TEXTS[1])
    proc = subprocess.run([*cmd, "score", str(mixture_fp32), str(tmp_path / "t.txt")], capture_output=True, text=True)
    assert proc.returncode == 0 and ": expert " in proc.stdout and "perplexity" in proc.stdout, proc.stderr
    bad = tmp_path / "bad"
    shutil.copytree(mixture_fp32, bad)
    with open(bad / "experts/expert_00/manifest.json", "a") as fh:
        fh.write(" ")
    proc = subprocess.run([*cmd, "generate", str(bad), "--prompt", prompt], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not match the mixture's manifest" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_export_inspect_and_errors(smalltalk_run, mixture_fp32, tmp_path):
    runner = CliRunner()
    r = runner.invoke(export_main, ["inspect", str(mixture_fp32)])
    assert r.exit_code == 0 and "mixture of 2 experts" in r.output and "routing: " in r.output, r.output
    r = runner.invoke(export_main, ["mixture", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "is not a SmallTalk run" in r.output
    r = runner.invoke(export_main, ["mixture", str(smalltalk_run), "--out", str(mixture_fp32)])
    assert r.exit_code != 0 and "--force" in r.output
    partial = tmp_path / "partial"
    shutil.copytree(smalltalk_run, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(CheckpointError, match="are not trained"):
        members(SmallTalkRun.open(partial))
    r = runner.invoke(export_main, ["mixture", str(partial), "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "are not trained" in r.output and not (tmp_path / "y").exists()


def test_routed_chat_routes_the_first_line_and_again_after_reset(mixture_fp32):
    from soup_run.generate import GenerationConfig
    from soup_run.mixture import RoutedMixture, run_routed_chat

    device = RoutedMixture(mixture_fp32)
    said, routed = [], []
    lines = ["", "It is a truth universally acknowledged", "and more", "/reset", "def f(x):", "/quit", "never read"]
    run_routed_chat(device, GenerationConfig(max_new_tokens=3), lines, said.append, lambda e, s: routed.append(e))
    text = "".join(said)
    assert "routing needs a text of at least 2 tokens" in text  # a blank first line is refused, the chat goes on
    assert len(routed) == 2 and "[new conversation]" in text
    assert routed == [device.route("It is a truth universally acknowledged")[0], device.route("def f(x):")[0]]
