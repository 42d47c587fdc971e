"""Reading a user's text files (for domain estimation and evaluation)."""
from __future__ import annotations

from pathlib import Path

from soup_train.errors import DataError


def read_texts(paths: tuple[Path, ...] | list[Path]) -> list[str]:
    """The contents of files, and of the .txt/.md files under directories, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"text file {path} does not exist; pass text files or directories of .txt files")
    if not files:
        raise DataError(f"no .txt or .md files under {', '.join(map(str, paths))}")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not any(t.strip() for t in texts):
        raise DataError("the given text files are all empty")
    return texts
