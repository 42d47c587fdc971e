"""Tokenized windows per domain, as raw memory-mapped files, and the data directory's index.

Layout: `DATA/shards/{view}/{split}/{i:03d}.bin` holds the windows of domain i of the view
(`sources` or `clusters`), row-major (count, window) in the index's dtype. Both views hold the
same windows, grouped differently. `DATA/data.json` is the index.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soup_train.errors import DataError

INDEX = "data.json"
FORMAT = "soup-data-v1"
VIEWS = ("sources", "clusters")
SPLITS = ("train", "test")


def read_index(data_dir: Path) -> dict:
    """The index of a data directory; a clear error when it is not one."""
    path = Path(data_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{data_dir} is not a data directory (no {INDEX}); build one with "
                        f"`soup-train prepare --preset debug --out {data_dir}`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rebuild it with `soup-train prepare --force`") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}; "
                        "rebuild it with `soup-train prepare --force`")
    return index


def shard_path(data_dir: Path, view: str, split: str, i: int) -> Path:
    return Path(data_dir) / "shards" / view / split / f"{i:03d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def write_shard(path: Path, windows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(windows).tofile(path)


@dataclass
class DomainShards:
    """The windows of every domain of one view and split: `arrays[i]` is (count_i, window)."""

    names: list[str]
    window: int
    arrays: list[np.ndarray]

    @classmethod
    def open(cls, data_dir: Path, view: str, split: str) -> "DomainShards":
        index = read_index(data_dir)
        if view not in index["views"]:
            raise DataError(f"unknown domain view {view!r}; choose one of {', '.join(index['views'])}")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose train or test")
        meta = index["views"][view]
        dtype, window = np.dtype(index["dtype"]), int(index["window"])
        arrays = []
        for i, count in enumerate(meta[split]):
            path = shard_path(data_dir, view, split, i)
            expected = count * window * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"shard {path} is missing or truncated (expected {expected} bytes); "
                                "rebuild the data directory with `soup-train prepare --force`")
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(count, window)) if count
                          else np.zeros((0, window), dtype))
        return cls(list(meta["names"]), window, arrays)

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(a) for a in self.arrays], dtype=np.int64)

    def natural(self) -> np.ndarray:
        """The natural domain frequencies: each domain's share of the windows."""
        counts = self.counts.astype(np.float64)
        return counts / counts.sum()
