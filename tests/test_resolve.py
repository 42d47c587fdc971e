"""Resolve: the bank opened, hashed and fused into a plain HF Llama directory; the HF side files."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from soup_export.bank import Bank
from soup_export.dense import dense_weights
from soup_export.mix import validate
from soup_export.resolve import resolve_batch

from stages import SOUP_TOL, sha


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

    from soup_export import cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights, calls, real = tmp_path / "model.safetensors", [], cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: calls.append(path) or real(path))
    weights.write_bytes(b"bank")
    digest = hashlib.sha256(b"bank").hexdigest()
    assert cache.cached_sha256(weights) == digest and len(calls) == 1
    assert cache.cached_sha256(weights) == digest and len(calls) == 1  # from the cache
    (cached,) = (tmp_path / "cache" / "soup" / "sha256").glob("*.json")
    weights.write_bytes(b"other bank")  # another size and mtime: hashed again
    assert cache.cached_sha256(weights) == hashlib.sha256(b"other bank").hexdigest() and len(calls) == 2
    stat = weights.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for entry in ({"key": key, "value": "abc"}, {**key, "sha256": digest}):  # not a digest; the old layout
        cached.write_text(json.dumps(entry))
        before = len(calls)
        assert cache.cached_sha256(weights) == hashlib.sha256(b"other bank").hexdigest()
        assert len(calls) == before + 1 and json.loads(cached.read_text())["value"] == cache.cached_sha256(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: hashed again
    assert cache.cached_sha256(weights) == hashlib.sha256(b"other bank").hexdigest() and len(calls) == before + 2


def test_hf_config_files_are_transformers_own_cached_by_their_inputs(monkeypatch, tmp_path):
    from soup_export import layout
    from soup_train.config import ModelConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, real, calls = ModelConfig(vocab_size=300), layout._hf_config_files, []
    made = real(model, 7, "float32")
    monkeypatch.setattr(layout, "_hf_config_files", lambda *args: calls.append(args) or real(*args))
    assert layout.hf_config_files(model, 7, "float32") == made and len(calls) == 1  # made, and cached
    (cached,) = (tmp_path / "soup" / "hf-configs").glob("*.json")
    assert layout.hf_config_files(model, 7, "float32") == made and len(calls) == 1  # from the cache
    assert layout.hf_config_files(model, 8, "float32") != made and len(calls) == 2  # other inputs: made
    cached.write_text("{")  # unreadable: made again, and the cache rewritten
    assert layout.hf_config_files(model, 7, "float32") == made and len(calls) == 3
    assert json.loads(cached.read_text())["value"]["config.json"] == made["config.json"].decode()
    monkeypatch.setattr(layout, "library_version", lambda name: "0.0.0-other")  # another transformers: made
    assert layout.hf_config_files(model, 7, "float32") == made and len(calls) == 4


def test_opening_a_checkpoint_imports_neither_transformers_nor_dynamo(debug_ckpt, tmp_path):
    """An export's start-up: the checkpoint's shapes checked on the meta device without torch._dynamo
    (its import took 1-1.5 s) and, once cached, the HF configs made without transformers (2.6-3.4 s)."""
    import os
    import sys

    from procs import run_command

    code = ("import sys; from pathlib import Path; from soup_export.bank import Bank; from soup_export.layout import hf_side_files; "
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


def test_added_tokens_are_read_without_parsing_the_whole_tokenizer(debug_ckpt):
    """The EOS id for the HF side files comes from tokenizer.json's added_tokens array, decoded
    alone: the same list as a full parse, on the real tokenizer and where the key's name also
    appears as a value, as an escaped vocabulary entry, or not at all."""
    from soup_export.layout import added_tokens

    text = (Bank.open(debug_ckpt).path / "tokenizer.json").read_text()
    assert added_tokens(text) == json.loads(text)["added_tokens"] != []
    tricky = json.dumps({"note": "added_tokens", "model": {"vocab": {'"added_tokens": [': 5}},
                         "added_tokens": [{"id": 3, "content": "<eos>"}]})
    assert added_tokens(tricky) == [{"id": 3, "content": "<eos>"}]
    assert added_tokens(json.dumps({"model": {"vocab": {"added_tokens": 1}}})) == []
