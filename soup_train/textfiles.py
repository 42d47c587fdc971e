"""Reading a user's text files (for domain estimation and evaluation)."""
from __future__ import annotations

import logging
from pathlib import Path

from soup_train.errors import DataError

log = logging.getLogger(__name__)


def read_texts(paths: tuple[Path, ...] | list[Path]) -> list[str]:
    """The contents of files and directories of text files (see `read_named_texts`)."""
    return [text for _, text in read_named_texts(paths)]


def read_named_texts(paths: tuple[Path, ...] | list[Path]) -> list[tuple[str, str]]:
    """(path, contents) of files, and of every UTF-8 text file under directories, in a stable order.

    In a directory, hidden files and files that are not UTF-8 text (binaries) are skipped, with a
    log line naming how many; a customer's texts are whatever they have (.txt, .md, .py, .rst, ...).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"text file {path} does not exist; pass text files or directories of text files")
    texts, skipped = [], 0
    for f in files:
        try:
            texts.append((str(f), f.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            skipped += 1
    if skipped:
        log.info("skipped %d file(s) that are not UTF-8 text", skipped)
    if not texts:
        raise DataError(f"no text files under {', '.join(map(str, paths))}")
    if not any(t.strip() for _, t in texts):
        raise DataError("the given text files are all empty")
    return texts
