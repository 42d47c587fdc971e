"""Domains and Algorithm 3: map any text to domain weights by nearest-centroid histogram.

Two views of the same windows:
- `sources`: one domain per named source. Each source keeps `source_centroids` k-means centroids
  of its training windows' embeddings (one centroid per source underfits sources as varied as
  "the Linux docs"); a window belongs to the source of its nearest centroid.
- `clusters`: k-means with k clusters over all training windows; named `cNN-<majority source>`.
A text is cut into windows of at most T tokens (T = the training window), every window is
embedded and assigned to its nearest centroid, and the normalised histogram is h.

Saved in `domains/` next to `tokenizer.json`, in the data directory and in every checkpoint:
`domains.json` (names, T), `centroids.safetensors`, and the embedder's files.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soup_train.data.embed import load_embedder
from soup_train.data.tokenizer import load_tokenizer
from soup_train.errors import DataError

DOMAINS_DIR, DOMAINS_JSON, CENTROIDS = "domains", "domains.json", "centroids.safetensors"


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit-norm centroids (k', d), labels) with k' = min(k, distinct rows)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(np.unique(x.round(5), axis=0))))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    c = km.cluster_centers_.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12), km.labels_


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (largest cosine; rows and centroids are unit-norm)."""
    return np.asarray(x @ centroids.T).argmax(axis=1)


@dataclass
class DomainMap:
    """Embedder + centroids of both views + the tokenizer that defines windows."""

    names: dict[str, list[str]]  # view -> domain names
    centroids: dict[str, np.ndarray]  # view -> (m, d)
    owners: dict[str, np.ndarray]  # view -> (m,) domain index of each centroid
    window_tokens: int
    embedder: object
    tokenizer: object = None

    @classmethod
    def load(cls, path: Path) -> "DomainMap":
        """From a data directory or a checkpoint (both hold `domains/` and `tokenizer.json`)."""
        from safetensors.numpy import load_file

        path = Path(path)
        meta_path = path / DOMAINS_DIR / DOMAINS_JSON
        if not meta_path.is_file():
            raise DataError(f"{path} has no domain map ({DOMAINS_DIR}/{DOMAINS_JSON}); pass a data directory "
                            "from `soup-train prepare` or a checkpoint directory")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(path / DOMAINS_DIR / CENTROIDS))
        views = list(meta["views"])
        return cls(names={v: list(meta["views"][v]) for v in views},
                   centroids={v: tensors[v] for v in views},
                   owners={v: tensors[f"{v}_owner"].astype(np.int64) for v in views},
                   window_tokens=int(meta["window_tokens"]),
                   embedder=load_embedder(path / DOMAINS_DIR),
                   tokenizer=load_tokenizer(path / "tokenizer.json"))

    def save(self, data_dir: Path) -> None:
        from safetensors.numpy import save_file

        out = Path(data_dir) / DOMAINS_DIR
        out.mkdir(parents=True, exist_ok=True)
        tensors = {v: np.ascontiguousarray(c, dtype=np.float32) for v, c in self.centroids.items()}
        tensors.update({f"{v}_owner": o.astype(np.int64) for v, o in self.owners.items()})
        save_file(tensors, str(out / CENTROIDS))
        self.embedder.save(out)
        (out / DOMAINS_JSON).write_text(json.dumps({"views": self.names, "window_tokens": self.window_tokens},
                                                   indent=2) + "\n")

    def view_names(self, view: str) -> list[str]:
        if view not in self.names:
            raise DataError(f"unknown domain view {view!r}; choose one of {', '.join(self.names)}")
        return self.names[view]

    def assign(self, embeddings: np.ndarray, view: str) -> np.ndarray:
        """Domain index of each embedded window."""
        self.view_names(view)
        return self.owners[view][nearest(embeddings, self.centroids[view])]

    def windows(self, texts: list[str]) -> list[str]:
        """The texts cut into windows of at most `window_tokens` tokens (blank windows dropped)."""
        out = []
        for enc in self.tokenizer.encode_batch([t for t in texts if t.strip()]):
            ids = enc.ids
            chunks = [ids[i:i + self.window_tokens] for i in range(0, len(ids), self.window_tokens)]
            out.extend(t for t in self.tokenizer.decode_batch(chunks) if t.strip())
        return out

    def histogram(self, texts: list[str], view: str = "sources") -> np.ndarray:
        """Algorithm 3: the normalised histogram of the windows' nearest domains."""
        names = self.view_names(view)
        windows = self.windows(texts)
        if not windows:
            raise DataError("the given texts are empty (no non-blank window); pass files with text in them")
        labels = self.assign(self.embedder.transform(windows), view)
        counts = np.bincount(labels, minlength=len(names)).astype(np.float64)
        return counts / counts.sum()


def copy_domain_files(data_dir: Path, dest: Path) -> None:
    """Copy the tokenizer and the domain map of a data directory into a checkpoint directory."""
    data_dir = Path(data_dir)
    shutil.copy2(data_dir / "tokenizer.json", dest / "tokenizer.json")
    shutil.copytree(data_dir / DOMAINS_DIR, dest / DOMAINS_DIR, dirs_exist_ok=True)
