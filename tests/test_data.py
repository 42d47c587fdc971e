"""`prepare` on the debug corpus: splits, tokenizer, shards, domains and Algorithm 3."""
from __future__ import annotations

import json

import numpy as np
import pytest

from soup_train.data.domains import DomainMap
from soup_train.data.embed import load_embedder
from soup_train.data.prepare import prepare
from soup_train.data.shards import DomainShards, read_index, shard_path
from soup_train.data.tokenizer import hf_tokenizer
from soup_train.errors import DataError
from soup_train.presets import prepare_preset


def corpus(data, split, name) -> list[str]:
    return [json.loads(line)["text"] for line in (data / "corpus" / split / f"{name}.jsonl").read_text().splitlines()]


def test_debug_corpus_has_three_domains_and_disjoint_held_out_documents(debug_data):
    index = read_index(debug_data)
    names = index["views"]["sources"]["names"]
    assert len(names) >= 3 and {"python-code", "licences", "python-docs"} <= set(names)
    for name in names:
        train, test = corpus(debug_data, "train", name), corpus(debug_data, "test", name)
        assert train and test and not set(train) & set(test)


def test_corpus_files_load_through_hf_datasets(debug_data):
    import datasets

    name = read_index(debug_data)["views"]["sources"]["names"][0]
    rows = datasets.load_dataset("json", data_files=str(debug_data / "corpus" / "test" / f"{name}.jsonl"), split="train")
    assert rows["text"] == corpus(debug_data, "test", name)


def test_tokenizer_loads_in_transformers_and_round_trips(debug_data):
    tok = hf_tokenizer(debug_data / "tokenizer.json")
    text = "def soup(h):\n    return S + sum(a * E for a, E in zip(alpha, experts))  # ünïcode"
    enc = tok(text)
    assert set(enc) == {"input_ids", "attention_mask"}
    assert tok.decode(enc["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and len(tok) == read_index(debug_data)["vocab_size"]


def test_shards_match_the_index_and_both_views_hold_the_same_windows(debug_data):
    index = read_index(debug_data)
    for split in ("train", "test"):
        by_source = DomainShards.open(debug_data, "sources", split)
        by_cluster = DomainShards.open(debug_data, "clusters", split)
        assert list(by_source.counts) == index["views"]["sources"][split]
        assert by_source.counts.sum() == by_cluster.counts.sum() > 0
        assert by_source.window == index["window"] == prepare_preset("debug").seq_len + 1
        rows = np.concatenate([a for a in by_source.arrays if len(a)])
        assert rows.max() < index["vocab_size"]


def test_truncated_shard_is_reported(debug_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(debug_data, copy)
    path = shard_path(copy, "sources", "train", 0)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="missing or truncated"):
        DomainShards.open(copy, "sources", "train")


def test_fitted_embedder_equals_its_saved_copy(tmp_path):
    """Regression: sklearn's SVD components are Fortran-ordered; saved raw they came back scrambled."""
    from soup_train.data.embed import HashingSvdEmbedder

    texts = [f"document {i} about {'code' if i % 2 else 'law'} number {i * 7}" for i in range(40)]
    emb = HashingSvdEmbedder(dim=8, n_features=1024)
    emb.fit(texts)
    emb.save(tmp_path)
    assert np.abs(load_embedder(tmp_path).transform(texts) - emb.transform(texts)).max() < 1e-6


def test_embedder_round_trips_without_pickle(debug_data):
    emb = load_embedder(debug_data / "domains")
    texts = ["import os\nprint(os.getcwd())", "Permission is hereby granted, free of charge"]
    x = emb.transform(texts)
    assert x.shape[0] == 2 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.allclose(load_embedder(debug_data / "domains").transform(texts), x)
    assert not list((debug_data / "domains").glob("*.pkl"))


def test_algorithm3_maps_held_out_texts_to_their_own_domain(debug_data):
    dm = DomainMap.load(debug_data)
    names = dm.view_names("sources")
    for i, name in enumerate(names):
        h = dm.histogram(corpus(debug_data, "test", name)[:32], "sources")
        assert h.shape == (len(names),) and abs(h.sum() - 1) < 1e-9
        assert h.argmax() == i and h[i] > 0.6, (name, h)
    hc = dm.histogram(corpus(debug_data, "test", names[0])[:8], "clusters")
    assert hc.shape == (prepare_preset("debug").k_clusters,)
    with pytest.raises(DataError, match="empty"):
        dm.histogram(["   "], "sources")


def test_prepare_refuses_to_overwrite_and_accepts_user_sources(debug_data, tmp_path):
    with pytest.raises(DataError, match="already exists"):
        prepare(prepare_preset("debug"), debug_data, tmp_path)
    texts = tmp_path / "legal"
    texts.mkdir()
    for i in range(6):
        (texts / f"c{i}.txt").write_text(f"Clause {i}. The party of the first part shall indemnify "
                                         "the party of the second part against all claims. " * 8)
    from dataclasses import replace

    cfg = replace(prepare_preset("debug"), sources=(f"legal={texts}/*.txt",))
    index = prepare(cfg, tmp_path / "out", tmp_path / "cache")
    assert "legal" in index["views"]["sources"]["names"]
    with pytest.raises(DataError, match="no file matches"):
        prepare(replace(cfg, sources=(f"x={tmp_path}/nothing/*.txt",)), tmp_path / "out2", tmp_path / "cache")
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def test_customer_text_directories_read_every_utf8_file_and_skip_binaries(tmp_path):
    from soup_train.textfiles import read_texts

    (tmp_path / "a.py").write_text("import os\n")
    (tmp_path / "b.rst").write_text("Title\n=====\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("plain text")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert read_texts([tmp_path]) == ["import os\n", "Title\n=====\n", "plain text"]
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "x.bin").write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(DataError, match="no text files"):
        read_texts([binary])
