"""`soup-train prepare`: corpus -> held-out split -> tokenizer -> windows -> domains -> shards.

Pipeline (one function per stage; the whole directory is built under a temporary name next to
`out` and renamed at the end, so a failed run leaves nothing half-written):
1. documents per domain from the preset's sources plus the user's `--source`s;
2. per domain, a seeded shuffle, a `max_chars` cap, and a document-level test split
   (`test_fraction`, at most `max_test_docs`) that no training step and not the tokenizer sees;
3. a byte-level BPE tokenizer trained on the training documents;
4. per domain and split, documents tokenized, joined with `<|endoftext|>`, cut into
   non-overlapping windows of seq_len + 1 tokens (the remainder is dropped);
5. the embedder fitted on training windows; per-source centroids and k-means clusters;
6. shards of both views, the domain map, and `data.json`.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from soup_train.config import PrepareConfig, to_dict
from soup_train.data.domains import DomainMap, kmeans, nearest
from soup_train.data.embed import make_embedder
from soup_train.data.local import load_user_source
from soup_train.data.shards import FORMAT, INDEX, token_dtype, write_shard, shard_path
from soup_train.data.sources import load_preset
from soup_train.data.tokenizer import EOS, train_tokenizer
from soup_train.errors import DataError

log = logging.getLogger(__name__)
EMBED_FIT_MAX = 20_000  # windows used to fit the embedder and the k-means (all are assigned)


def prepare(cfg: PrepareConfig, out: Path, cache: Path, *, force: bool = False) -> dict:
    """Build the data directory `out`; returns its index (`data.json`)."""
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to rebuild it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        index = _build(cfg, tmp, Path(cache))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _build(cfg: PrepareConfig, tmp: Path, cache: Path) -> dict:
    start = time.perf_counter()
    corpus, provenance = collect(cfg, cache)
    train_docs, test_docs = split_documents(corpus, cfg)
    tmp.mkdir(parents=True)
    write_corpus(tmp, train_docs, test_docs)
    log.info("training a %d-token byte-level BPE on %d documents", cfg.vocab_size, sum(map(len, train_docs.values())))
    tok = train_tokenizer((d for docs in train_docs.values() for d in docs), cfg.vocab_size, tmp / "tokenizer.json")
    window = cfg.seq_len + 1
    windows = {split: {n: to_windows(tok, docs, window) for n, docs in split_docs.items()}
               for split, split_docs in (("train", train_docs), ("test", test_docs))}
    names = [n for n in corpus if len(windows["train"][n]) and len(windows["test"][n])]
    for dropped in sorted(set(corpus) - set(names)):
        log.warning("domain %s has too little text for one train and one test window; dropped", dropped)
    if len(names) < 2:
        raise DataError(f"only {len(names)} domain(s) with enough text; a soup needs at least 2 domains")
    domain_map, labels = build_domains(cfg, tok, windows, names)
    domain_map.save(tmp)
    views = write_views(tmp, windows, names, labels, domain_map, token_dtype(tok.get_vocab_size()))
    index = {"format": FORMAT, "prepare": to_dict(cfg), "vocab_size": tok.get_vocab_size(), "window": window,
             "dtype": token_dtype(tok.get_vocab_size()).name, "eos_id": tok.token_to_id(EOS),
             "views": views, "provenance": [p.to_dict() for p in provenance if p.source in names],
             "seconds": round(time.perf_counter() - start, 1)}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def collect(cfg: PrepareConfig, cache: Path) -> tuple[dict[str, list[str]], list]:
    """{domain: documents} from the preset and the user's sources, with provenance."""
    corpus, provenance = load_preset(cfg.preset, cache, doc_chars=cfg.doc_chars, max_docs=cfg.max_docs or None)
    for spec in cfg.sources:
        name, docs, prov = load_user_source(spec, cache, cfg.doc_chars, cfg.max_docs)
        if name in corpus:
            raise DataError(f"source name {name!r} is already a domain of preset {cfg.preset!r}; pick another name")
        corpus[name] = docs
        provenance.append(prov)
    return corpus, provenance


def split_documents(corpus: dict[str, list[str]], cfg: PrepareConfig) -> tuple[dict, dict]:
    """Per domain: seeded shuffle, max_chars cap, then a held-out test split of whole documents."""
    train, test = {}, {}
    for i, (name, docs) in enumerate(corpus.items()):
        order = np.random.default_rng([cfg.seed, i]).permutation(len(docs))
        docs = [docs[j] for j in order]
        if cfg.max_chars:
            cumulative = np.cumsum([len(d) for d in docs])
            docs = docs[:max(2, int(np.searchsorted(cumulative, cfg.max_chars)) + 1)]
        if len(docs) < 2:
            log.warning("domain %s has %d document(s), need 2 (one to hold out); dropped", name, len(docs))
            continue
        n_test = min(cfg.max_test_docs, max(1, round(cfg.test_fraction * len(docs))), len(docs) - 1)
        test[name], train[name] = docs[:n_test], docs[n_test:]
    return train, test


def write_corpus(out: Path, train: dict[str, list[str]], test: dict[str, list[str]]) -> None:
    """corpus/{train,test}/NAME.jsonl, one {"text": ...} per line (loadable with HF datasets)."""
    for split, docs_by_name in (("train", train), ("test", test)):
        (out / "corpus" / split).mkdir(parents=True, exist_ok=True)
        for name, docs in docs_by_name.items():
            lines = (json.dumps({"text": d}, ensure_ascii=False) for d in docs)
            (out / "corpus" / split / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def to_windows(tok, docs: list[str], window: int) -> np.ndarray:
    """Documents tokenized, each followed by EOS, concatenated and cut into (n, window) rows."""
    eos = tok.token_to_id(EOS)
    ids = [np.asarray(e.ids + [eos], dtype=np.int64) for e in tok.encode_batch(docs)]
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    n = len(flat) // window
    return flat[:n * window].reshape(n, window)


def build_domains(cfg: PrepareConfig, tok, windows: dict, names: list[str]) -> tuple[DomainMap, dict]:
    """Fit the embedder, per-source centroids and k-means clusters; label every window."""
    texts = {split: {n: tok.decode_batch(windows[split][n].tolist()) for n in names} for split in windows}
    train_all = [t for n in names for t in texts["train"][n]]
    rng = np.random.default_rng(cfg.seed)
    fit_idx = np.sort(rng.choice(len(train_all), min(EMBED_FIT_MAX, len(train_all)), replace=False))
    log.info("embedding %d windows (%s) and clustering", len(train_all), cfg.embedder)
    embedder = make_embedder(cfg.embedder, cfg.embed_dim, cfg.hash_features, cfg.seed).fit([train_all[i] for i in fit_idx])
    emb = {split: {n: embedder.transform(texts[split][n]) for n in names} for split in texts}
    src_centroids, src_owner = [], []
    for i, n in enumerate(names):
        c, _ = kmeans(emb["train"][n], cfg.source_centroids, cfg.seed)
        src_centroids.append(c)
        src_owner += [i] * len(c)
    train_stack = np.concatenate([emb["train"][n] for n in names])
    clusters, _ = kmeans(train_stack[fit_idx], cfg.k_clusters, cfg.seed)
    labels = {split: {n: nearest(emb[split][n], clusters) for n in names} for split in emb}
    majority = _majority_source(labels["train"], names, len(clusters))
    cluster_names = [f"c{j:02d}-{majority[j]}" for j in range(len(clusters))]
    dm = DomainMap(names={"sources": list(names), "clusters": cluster_names},
                   centroids={"sources": np.concatenate(src_centroids), "clusters": clusters},
                   owners={"sources": np.asarray(src_owner), "clusters": np.arange(len(clusters))},
                   window_tokens=cfg.seq_len + 1, embedder=embedder, tokenizer=tok)
    return dm, labels


def _majority_source(labels: dict[str, np.ndarray], names: list[str], k: int) -> list[str]:
    counts = np.stack([np.bincount(labels[n], minlength=k) for n in names])  # (sources, k)
    return [names[int(counts[:, j].argmax())] if counts[:, j].sum() else "empty" for j in range(k)]


def write_views(out: Path, windows: dict, names: list[str], labels: dict, dm: DomainMap, dtype) -> dict:
    """Shards of both views; returns the index's `views` entry."""
    views = {"sources": {"names": names}, "clusters": {"names": dm.names["clusters"]}}
    for split in ("train", "test"):
        views["sources"][split] = []
        for i, n in enumerate(names):
            write_shard(shard_path(out, "sources", split, i), windows[split][n].astype(dtype))
            views["sources"][split].append(len(windows[split][n]))
        rows = np.concatenate([windows[split][n] for n in names])
        label = np.concatenate([labels[split][n] for n in names])
        views["clusters"][split] = []
        for j in range(len(dm.names["clusters"])):
            write_shard(shard_path(out, "clusters", split, j), rows[label == j].astype(dtype))
            views["clusters"][split].append(int((label == j).sum()))
    return views
