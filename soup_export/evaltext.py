"""Held-out token windows for parity: the customer's own texts, or test windows drawn from mix(h).

Preference: texts given by the user; else the checkpoint's data directory (its test split, never
seen in training), sampled with Algorithm 1 at the customer's h with a fixed seed; else none
(stages a, b and d then run on seeded random tokens and stage c cannot run).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soup_export.errors import ParityError


def from_texts(texts: list[str], tokenizer_json: Path, n: int, length: int) -> np.ndarray:
    from soup_train.data.tokenizer import EOS, load_tokenizer

    tok = load_tokenizer(tokenizer_json)
    eos = tok.token_to_id(EOS)
    ids = np.concatenate([np.asarray(e.ids + [eos], np.int64) for e in tok.encode_batch(texts)])
    total = len(ids) // (length + 1)
    if total == 0:
        raise ParityError(f"the evaluation texts hold {len(ids)} tokens, fewer than one window of {length + 1}; "
                          "pass more text")
    # n windows spread evenly over all the text, each at the centre of its n-th of it, not the first
    # n windows: a customer's first file must not stand for the rest (a mix search fitted on the
    # first of two domains picks that one), nor may the last be left out
    count = min(n, total)
    picks = (2 * np.arange(count) + 1) * total // (2 * count) if count else np.zeros(0, np.int64)
    return ids[:total * (length + 1)].reshape(total, length + 1)[picks]


def from_data(data_dir: Path, view: str, h: np.ndarray, n: int, length: int, seed: int = 0) -> np.ndarray:
    from soup_train.data.shards import DomainShards

    shards = DomainShards.open(data_dir, view, "test")
    counts = shards.counts
    p = np.where(counts > 0, h, 0.0)
    if p.sum() <= 0:
        raise ParityError(f"{data_dir}: no test windows in the domains of this mix")
    rng = np.random.default_rng(seed)
    domains = rng.choice(len(p), size=n, p=p / p.sum())
    rows = [shards.arrays[d][int(rng.integers(counts[d]))] for d in domains]
    length = min(length, shards.window - 1)
    return np.stack(rows)[:, :length + 1].astype(np.int64)


def random_tokens(vocab: int, n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(n, length + 1), dtype=np.int64)


def resolve_data_dir(explicit: Path | None, recorded: str, domains: list[str], view: str,
                     vocab: int) -> Path | None:
    """--data, else the data path recorded in the checkpoint if it exists here; either must hold
    the checkpoint's domains (same view) and tokenizer size, or its windows would be meaningless."""
    candidates = [(Path(explicit), True)] if explicit is not None else ([(Path(recorded), False)] if recorded else [])
    for path, given in candidates:
        if not (path / "data.json").is_file():
            if given:
                raise ParityError(f"--data {path} is not a data directory from `soup-train prepare`")
            continue
        from soup_train.data.shards import read_index

        index = read_index(path)
        names = index.get("views", {}).get(view, {}).get("names")
        if names == list(domains) and index.get("vocab_size") == vocab:
            return path
        if given:
            raise ParityError(f"--data {path} is not the checkpoint's data (its {view} domains or vocabulary "
                              f"differ: {names}, vocab {index.get('vocab_size')}); pass the directory it was "
                              "trained on, or --eval-texts")
    return None
