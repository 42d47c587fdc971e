"""Pluggable text embedders for clustering and Algorithm 3 (saved with the data, never pickled).

- `hashing-svd` (default, offline, fast): word 1-2-gram hashing, sublinear TF x IDF, L2 norm,
  then a truncated SVD to `embed_dim` dimensions and L2 norm. Saved as `embedder.json` plus
  `embedder.safetensors` (IDF and SVD components).
- `sentence-transformers:<model name or local path>`: when the package is installed; the model
  must be available locally (nothing downloads at run time).
Every embedder returns L2-normalised float32 rows, so nearest centroid = largest cosine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from soup_train.errors import ConfigError, DataError

CONFIG, TENSORS = "embedder.json", "embedder.safetensors"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class HashingSvdEmbedder:
    kind = "hashing-svd"

    def __init__(self, dim: int = 64, n_features: int = 32768, seed: int = 0) -> None:
        self.dim, self.n_features, self.seed = dim, n_features, seed
        self.idf: np.ndarray | None = None
        self.components: np.ndarray | None = None  # (dim, n_features)

    def _vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=self.n_features, ngram_range=(1, 2), alternate_sign=False,
                                 norm=None, token_pattern=r"(?u)\b\w+\b|[^\w\s]")

    def _tfidf(self, texts: list[str]):
        from sklearn.preprocessing import normalize

        counts = self._vectorizer().transform(texts).tocsr().astype(np.float32)
        counts.data = 1.0 + np.log(counts.data)
        return normalize(counts.multiply(self.idf).tocsr())

    def fit(self, texts: list[str]) -> "HashingSvdEmbedder":
        from sklearn.decomposition import TruncatedSVD

        counts = self._vectorizer().transform(texts).tocsr()
        df = np.bincount(counts.indices, minlength=self.n_features)
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
        x = self._tfidf(texts)
        dim = max(1, min(self.dim, x.shape[0] - 1, self.n_features - 1))
        svd = TruncatedSVD(n_components=dim, random_state=self.seed, algorithm="randomized", n_iter=5)
        svd.fit(x)
        self.components = np.ascontiguousarray(svd.components_, dtype=np.float32)  # sklearn's is Fortran-ordered
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        assert self.components is not None, "fit or load the embedder first"
        return _normalise(self._tfidf(texts) @ self.components.T)

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        (directory / CONFIG).write_text(json.dumps({"kind": self.kind, "dim": int(self.components.shape[0]),
                                                    "n_features": self.n_features, "seed": self.seed}) + "\n")
        save_file({"idf": self.idf, "components": self.components}, str(directory / TENSORS))

    @classmethod
    def load(cls, directory: Path, config: dict) -> "HashingSvdEmbedder":
        from safetensors.numpy import load_file

        emb = cls(config["dim"], config["n_features"], config.get("seed", 0))
        tensors = load_file(str(directory / TENSORS))
        emb.idf, emb.components = tensors["idf"], np.ascontiguousarray(tensors["components"])
        return emb


class SentenceTransformerEmbedder:
    kind = "sentence-transformers"

    def __init__(self, model: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError("embedder 'sentence-transformers:...' needs the sentence-transformers package; "
                              "pip install it into the venv or use embedder=hashing-svd") from None
        self.model_name = model
        try:
            self.model = SentenceTransformer(model, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here is a missing/unusable local model
            raise ConfigError(f"cannot load sentence-transformers model {model!r} from local files ({exc}); "
                              "pass a local model directory") from None

    def fit(self, texts: list[str]) -> "SentenceTransformerEmbedder":
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        return _normalise(self.model.encode(texts, batch_size=64, show_progress_bar=False))

    def save(self, directory: Path) -> None:
        (directory / CONFIG).write_text(json.dumps({"kind": self.kind, "model": self.model_name}) + "\n")

    @classmethod
    def load(cls, directory: Path, config: dict) -> "SentenceTransformerEmbedder":
        return cls(config["model"])


def make_embedder(name: str, dim: int, n_features: int, seed: int):
    """An unfitted embedder from PrepareConfig.embedder."""
    if name == HashingSvdEmbedder.kind:
        return HashingSvdEmbedder(dim, n_features, seed)
    if name.startswith(SentenceTransformerEmbedder.kind + ":"):
        return SentenceTransformerEmbedder(name.split(":", 1)[1])
    raise ConfigError(f"unknown embedder {name!r}; use hashing-svd or sentence-transformers:<local model path>")


def load_embedder(directory: Path):
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise DataError(f"no embedder in {directory} ({CONFIG} missing); rebuild with `soup-train prepare`")
    config = json.loads(path.read_text())
    kinds = {c.kind: c for c in (HashingSvdEmbedder, SentenceTransformerEmbedder)}
    if config.get("kind") not in kinds:
        raise DataError(f"{path}: unknown embedder kind {config.get('kind')!r}")
    return kinds[config["kind"]].load(Path(directory), config)
