"""soup-run against ground truth: every decode step of `stream` against a full recompute in
transformers, the sampling rules on hand-made logits, and the manifest check file by file.
(These are what a JavaScript runner will be held to as well.)"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from soup_run import GenerationConfig, RunError, Specialist
from soup_run.generate import stream
from soup_run.integrity import verify
from soup_run.sampling import Sampling, choose, penalise

LOGIT_TOL = 1e-4  # fp32 onnxruntime with the KV cache vs transformers recomputing the whole sequence
PROMPTS = ["Permission is hereby granted, free of charge, to any person", "import os"]


@pytest.fixture(scope="module")
def export(debug_ckpt, debug_data, tmp_path_factory):
    """An fp32 specialist with its HF directory (the transformers reference)."""
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_export.bank import Bank

    root = tmp_path_factory.mktemp("truth")
    bank = Bank.open(debug_ckpt)
    build(debug_ckpt, validate({"licences": 0.7, "python-code": 0.3}, bank.info.domains), root / "fp32",
          ExportSpec(quant="fp32", data=str(debug_data)))
    return root / "fp32"


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one row", "left-padded batch"])
def test_every_decode_step_equals_a_full_recompute_in_transformers(export, prompts):
    """The logits `stream` chooses each token from (prefill, then every decode step with the cache, on
    a left-padded batch too) equal transformers' logits for that row's whole sequence, recomputed
    alone without a cache, within 1e-4: a position, a mask or a cache that went wrong shows here."""
    from transformers import AutoModelForCausalLM

    model = Specialist(export / "onnx")
    steps = []
    step = model.step

    def recording(ids, mask, positions, past, all_logits=False):
        logits, past = step(ids, mask, positions, past, all_logits)
        steps.append(logits.copy())
        return logits, past

    model.step = recording
    rows = [model.encode(p) for p in prompts]
    out = [[] for _ in rows]
    for event in stream(model, rows, GenerationConfig(max_new_tokens=16, stop_at_eos=False)):
        if event.token >= 0:
            out[event.row].append(event.token)
    assert all(len(o) == 16 for o in out) and len(steps) == 16  # the prefill and 15 decode steps
    reference = AutoModelForCausalLM.from_pretrained(str(export / "hf"), dtype=torch.float32).eval()
    worst = 0.0
    for i, prompt in enumerate(rows):
        with torch.no_grad():
            full = reference(torch.tensor([prompt + out[i]])).logits[0].numpy()
        for k, logits in enumerate(steps):  # step k predicts the token after prompt + out[:k]
            worst = max(worst, float(np.abs(logits[i] - full[len(prompt) + k - 1]).max()))
    assert worst <= LOGIT_TOL, worst


# ------------------------------------------------------------------ sampling, on hand-made logits
def draws(logits, sampling: Sampling, n: int = 20000, seen=None) -> np.ndarray:
    """How often each token is drawn, as a share of n seeded draws."""
    rng = np.random.default_rng(0)
    logits = np.asarray(logits, np.float32)
    seen = np.zeros(len(logits), bool) if seen is None else np.asarray(seen)
    counts = np.bincount([choose(logits, seen, sampling, rng) for _ in range(n)], minlength=len(logits))
    return counts / n


def test_the_repetition_penalty_pushes_seen_tokens_down_whatever_their_sign():
    logits = np.array([2.0, -2.0, 1.0, 0.5])
    seen = np.array([True, True, False, False])
    assert penalise(logits, seen, 2.0).tolist() == [1.0, -4.0, 1.0, 0.5]  # positive halved, negative doubled
    greedy = Sampling(repetition_penalty=2.0)
    assert choose(np.array([3.0, 2.0]), np.array([True, False]), greedy, np.random.default_rng(0)) == 1
    assert choose(np.array([-1.0, -1.5]), np.array([True, False]), greedy, np.random.default_rng(0)) == 1
    assert choose(np.array([3.0, 2.0]), np.array([False, False]), greedy, np.random.default_rng(0)) == 0


def test_temperature_scales_the_softmax():
    logits = [0.0, np.log(3.0)]  # softmax: 1/4, 3/4
    assert np.allclose(draws(logits, Sampling(temperature=1.0)), [0.25, 0.75], atol=0.015)
    assert np.allclose(draws(logits, Sampling(temperature=0.5)), [0.1, 0.9], atol=0.015)  # 1 : 9
    assert np.allclose(draws(logits, Sampling(temperature=100.0)), [0.5, 0.5], atol=0.02)
    assert choose(np.asarray(logits), np.zeros(2, bool), Sampling(), np.random.default_rng(0)) == 1  # 0: greedy


def test_top_k_keeps_the_k_most_likely_and_their_relative_mass():
    logits = np.log([0.1, 0.4, 0.2, 0.3])
    shares = draws(logits, Sampling(temperature=1.0, top_k=2))
    assert shares[0] == shares[2] == 0.0
    assert np.allclose(shares[[1, 3]], [4 / 7, 3 / 7], atol=0.015)


def test_top_p_keeps_the_smallest_set_with_that_mass():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    shares = draws(logits, Sampling(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert shares[2] == shares[3] == 0.0 and np.allclose(shares[:2], [0.625, 0.375], atol=0.015)
    shares = draws(logits, Sampling(temperature=1.0, top_p=0.85))  # needs the third token too
    assert shares[3] == 0.0 and np.allclose(shares[:3], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.015)


# ------------------------------------------------------------------ the manifest, file by file
def test_every_file_the_manifest_lists_is_checked(export, tmp_path):
    """Each file of onnx/ that the manifest lists, altered in turn (one bit, same size), is refused by
    name; the count verified is the count listed."""
    manifest = json.loads((export / "manifest.json").read_text())
    listed = sorted(rel for rel in manifest["files"] if rel.startswith("onnx/"))
    assert "onnx/model.onnx" in listed and "onnx/model.onnx.data" in listed
    assert verify(export / "onnx") == len(listed)
    for rel in listed:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(export, copy)
        target = copy / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(RunError, match="does not match its SHA-256") as exc:
            Specialist(copy / "onnx")
        assert rel.split("/")[-1] in str(exc.value), rel
        shutil.rmtree(copy)
