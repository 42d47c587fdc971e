"""What both reproductions share: the corpus at a regime's vocabulary, and the commit that ran them."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path


def commit_of_repo() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return head + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ensure_corpus(data: Path, vocab_size: int, regimes_by_vocab: dict[int, str]) -> None:
    """The default corpus tokenized with `vocab_size` tokens in `data`, prepared on first use (a few
    minutes); exits with what to do when `data` holds something else."""
    from soup_train.cli import CACHE
    from soup_train.data.prepare import prepare
    from soup_train.presets import prepare_preset

    if (data / "data.json").is_file():
        vocab = json.loads((data / "data.json").read_text())["vocab_size"]
        if vocab != vocab_size:
            other = regimes_by_vocab.get(vocab)
            hint = f"pass --regime {other} for this data, or " if other else ""
            sys.exit(f"error: {data} has a {vocab}-token vocabulary, the regime needs {vocab_size}; "
                     f"{hint}omit --data to use the regime's own data directory")
        return
    if data.exists():
        sys.exit(f"error: {data} exists but is not a data directory; remove it or pass another --data")
    print(f"== prepare {data}: the default corpus, vocabulary {vocab_size}", flush=True)
    prepare(replace(prepare_preset("default"), vocab_size=vocab_size), data, CACHE)
