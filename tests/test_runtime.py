"""soup-run: KV cache, padding, sampling, integrity, ORT format, CLI, and the same greedy tokens
as transformers, optimum and onnxruntime-genai on one exported specialist."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from soup_run import GenerationConfig, RunError, Specialist, generate
from soup_run.generate import generate_ids
from soup_run.sampling import Sampling

LOGIT_TOL = 1e-4  # incremental vs full recompute, fp32 in onnxruntime
PROMPT = "Permission is hereby granted, free of charge"


@pytest.fixture(scope="module")
def exports(debug_ckpt, debug_data, tmp_path_factory):
    """An fp32 and an int4 export (the int4 one with the ORT format), parity on."""
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_export.bank import Bank

    root = tmp_path_factory.mktemp("runtime")
    bank = Bank.open(debug_ckpt)
    mix = validate({"licences": 0.8, "python-docs": 0.2}, bank.info.domains)
    build(debug_ckpt, mix, root / "fp32", ExportSpec(quant="fp32", data=str(debug_data)))
    build(debug_ckpt, mix, root / "int4", ExportSpec(quant="int4", data=str(debug_data), ort_format=True))
    return root


def full_logits(model: Specialist, ids: list[int]) -> np.ndarray:
    x = np.asarray([ids])
    return model.step(x, np.ones_like(x), np.arange(len(ids))[None], model.empty_past(1), all_logits=True)[0][0]


def test_incremental_decoding_equals_full_recompute(exports):
    model = Specialist(exports / "fp32")
    ids = model.encode(PROMPT)
    logits, past = model.step(np.asarray([ids[:5]]), np.ones((1, 5)), np.arange(5)[None], model.empty_past(1))
    steps = [logits[0]]
    for t in range(5, len(ids)):
        logits, past = model.step(np.asarray([[ids[t]]]), np.ones((1, t + 1)), np.asarray([[t]]), past)
        steps.append(logits[0])
    full = full_logits(model, ids)
    assert np.abs(np.stack(steps) - full[4:]).max() <= LOGIT_TOL


def test_left_padded_batch_gives_each_row_its_own_tokens(exports):
    model = Specialist(exports / "fp32")
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    prompts = ["import os", PROMPT]
    batched = generate(model, prompts, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in prompts]


def test_sampling_is_deterministic_per_seed(exports):
    model = Specialist(exports / "fp32")
    hot = lambda seed: GenerationConfig(max_new_tokens=16, seed=seed, stop_at_eos=False,  # noqa: E731
                                        sampling=Sampling(temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2))
    ids = model.encode(PROMPT)
    assert generate_ids(model, ids, hot(7)) == generate_ids(model, ids, hot(7))
    assert len({tuple(generate_ids(model, ids, hot(s))) for s in range(4)}) > 1
    with pytest.raises(RunError, match="top-p"):
        Sampling(top_p=0)


def test_stop_strings_cut_the_output(exports):
    model = Specialist(exports / "fp32")
    free = generate(model, [PROMPT], GenerationConfig(max_new_tokens=24, stop_at_eos=False))[0]
    stop = free[3:5]
    cut = generate(model, [PROMPT], GenerationConfig(max_new_tokens=24, stop=(stop,), stop_at_eos=False))[0]
    assert stop not in cut and free.startswith(cut) and len(cut) <= free.index(stop)


def test_same_greedy_tokens_in_soup_run_transformers_optimum_and_genai(exports):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    from soup_run.genai_engine import GenaiSpecialist

    model = Specialist(exports / "fp32")
    ids = model.encode(PROMPT)
    n = 16
    cfg = GenerationConfig(max_new_tokens=n, stop_at_eos=False)
    ours = generate_ids(model, ids, cfg)
    x = torch.tensor([ids])
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
    hf = AutoModelForCausalLM.from_pretrained(exports / "fp32" / "hf").eval().generate(x, **kwargs)[0, len(ids):].tolist()
    opt = ORTModelForCausalLM.from_pretrained(exports / "fp32" / "onnx", use_cache=True, use_io_binding=False)
    assert ours == hf == opt.generate(x, **kwargs)[0, len(ids):].tolist()
    genai = GenaiSpecialist(exports / "fp32")
    assert [e.token for e in genai.stream([ids], GenerationConfig(max_new_tokens=n, stop_at_eos=False))] == ours
    q_ours = generate_ids(Specialist(exports / "int4"), ids, cfg)
    q_genai = [e.token for e in GenaiSpecialist(exports / "int4").stream([ids], cfg)]
    assert q_ours == q_genai  # both engines agree on the quantized artifact too


def test_ort_format_loads_and_matches(exports):
    onnx_model = Specialist(exports / "int4")
    ort_model = Specialist(exports / "int4", ort_format=True)
    assert ort_model.model_file.name == "model.ort"
    ids = onnx_model.encode(PROMPT)
    assert np.abs(full_logits(onnx_model, ids) - full_logits(ort_model, ids)).max() <= 1e-5
    import json

    report = json.loads((exports / "int4" / "manifest.json").read_text())["ort_format"]
    assert report["usability"]["cpu"] == "YES" and "NNAPI" in report["usability"]


def test_score_matches_transformers_perplexity(exports, tmp_path):
    from transformers import AutoModelForCausalLM

    from soup_run.score import score_files

    text = tmp_path / "t.txt"
    text.write_text(PROMPT + " to any person obtaining a copy of this software.\n")
    row = score_files(Specialist(exports / "fp32"), [text])[0]
    model = AutoModelForCausalLM.from_pretrained(exports / "fp32" / "hf").eval()
    ids = torch.tensor([Specialist(exports / "fp32").encode(text.read_text())])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert abs(row["nll"] - loss) <= 1e-4 and row["tokens"] == ids.shape[1] - 1


def test_chat_keeps_the_cache_across_turns(exports):
    from soup_run.chat import Conversation

    model = Specialist(exports / "fp32")
    conv = Conversation(model, GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    out: list[str] = []
    conv.turn("import os", out.append)
    conv.turn("Permission is", out.append)
    assert len(conv.tokens) > len(model.encode("import os\nPermission is\n"))
    full = full_logits(model, conv.tokens)[-1]
    assert np.abs(conv.logits[0] - full).max() <= LOGIT_TOL  # the cached state equals a recompute


def test_integrity_check_refuses_tampered_truncated_or_unverifiable_models(exports, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exports / "fp32", copy)
    data = copy / "onnx" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(RunError, match="does not match its SHA-256"):
        Specialist(copy)
    Specialist(copy, verify_files=False)  # the opt-out
    data.write_bytes(bytes(raw[:-10]))
    with pytest.raises(RunError, match="truncated"):
        Specialist(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(RunError, match="no manifest.json"):
        Specialist(copy)
    assert Specialist(exports / "fp32").verified >= 5
    with pytest.raises(RunError, match=r"no model.onnx or model.ort under .*exports: pass one, e.g. .*"):
        Specialist(exports)  # the directory that holds the exports, not one of them


@pytest.mark.parametrize("args, message", [
    (["generate", "{fp32}"], "give at least one --prompt"),
    (["generate", "{tmp}", "--prompt", "x"], "no model.onnx or model.ort"),
    (["generate", "{fp32}", "--prompt", "x", "--top-p", "2"], "0 < top-p <= 1"),
    (["score", "{fp32}", "{tmp}/missing.txt"], "is not a file"),
    (["generate", "{fp32}", "--prompt", "x", "--ort-format"], "has no model.ort"),
])
def test_cli_errors_are_one_line_and_exit_2(exports, tmp_path, args, message):
    argv = [a.format(fp32=exports / "fp32", tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "soup_run.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_streams_generation_and_scores(exports, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "soup_run.cli", "generate", str(exports / "int4"), "--prompt", PROMPT,
                           "--max-new-tokens", "8"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(PROMPT), proc.stderr
    (tmp_path / "a.txt").write_text(PROMPT * 3)
    proc = subprocess.run([sys.executable, "-m", "soup_run.cli", "score", str(exports / "int4"), str(tmp_path / "a.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "perplexity" in proc.stdout
