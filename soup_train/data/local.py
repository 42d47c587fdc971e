"""Extra domains from the user's own files or a hub dataset, read through HF `datasets`.

`NAME=PATH_GLOB` reads local files: .txt/.md (one document per file), .jsonl/.json and .parquet
(one document per row, column `text`). `NAME=hf:DATASET[:SPLIT]` loads a hub dataset (for
clusters with a hub mirror; nothing here downloads in tests or the demo).
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

from soup_train.data.sources import Provenance, chunk_text, dedup
from soup_train.errors import DataError

_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_spec(spec: str) -> tuple[str, str]:
    if "=" not in spec:
        raise DataError(f"source {spec!r} is not NAME=PATH_GLOB or NAME=hf:DATASET "
                        "(e.g. --source legal='contracts/*.txt')")
    name, where = (x.strip() for x in spec.split("=", 1))
    if not NAME_RE.fullmatch(name):
        raise DataError(f"source name {name!r} must be letters, digits, '.', '_' or '-' (e.g. legal)")
    return name, where


def _rows(builder: str, files: list[str], cache: Path) -> list[str]:
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(cache / "hf-datasets"), **kwargs)
    if "text" not in ds.column_names:
        raise DataError(f"{files[0]}: no 'text' column (columns: {', '.join(ds.column_names)}); "
                        "put each document in a field named text")
    return [t for t in ds["text"] if isinstance(t, str)]


def load_user_source(spec: str, cache: Path, doc_chars: int, max_docs: int) -> tuple[str, list[str], Provenance]:
    """(name, documents, provenance) of one --source spec."""
    name, where = parse_spec(spec)
    if where.startswith("hf:"):
        import datasets

        dataset, _, split = where[3:].partition(":")
        try:
            texts = list(datasets.load_dataset(dataset, split=split or "train", cache_dir=str(cache / "hf-datasets"))["text"])
        except Exception as exc:  # noqa: BLE001 - hub/offline failures are the user's environment
            raise DataError(f"cannot load hub dataset {dataset!r} for source {name} ({exc}); "
                            "on an offline machine use local files instead") from None
        provider = where
    else:
        files = sorted(glob.glob(str(Path(where).expanduser()), recursive=True))
        if not files:
            raise DataError(f"source {name}: no file matches {where!r}; pass a glob of .txt/.md/.jsonl/.parquet files")
        unknown = sorted({Path(f).suffix for f in files} - set(_BUILDERS))
        if unknown:
            raise DataError(f"source {name}: cannot read {', '.join(unknown)} files; use .txt, .md, .jsonl, .json or .parquet")
        texts = []
        for builder in sorted(set(_BUILDERS.values())):
            group = [f for f in files if _BUILDERS[Path(f).suffix] == builder]
            texts += _rows(builder, group, cache) if group else []
        provider = f"local:{where}"
    docs = dedup([c for t in texts for c in chunk_text(t, doc_chars)])
    docs = docs[:max_docs] if max_docs else docs
    if not docs:
        raise DataError(f"source {name}: {where} holds no document of at least 50 characters")
    return name, docs, Provenance(name, provider, (), False, len(docs), sum(map(len, docs)))
