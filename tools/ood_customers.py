"""Out-of-domain customers for the reproduction: text from Debian packages the training corpus does not use.

Each customer is one package's text cut into documents (`chunk_text`, the corpus's own cutter): the
customer gives files to build from and other files are held out to score the specialist. Kinds:

    devil      reference prose   dict-devil: Ambrose Bierce's "The Devil's Dictionary" (dictd data)
    jargon     reference prose   jargon-text: the Jargon File's entries (technical slang)
    manpages   technical text    manpages: section 5 and 7 pages (troff source)
    crawl      dialogue          crawl-common: Dungeon Crawl Stone Soup's monster speech database

None of these packages, nor text derived from them, is in `soup_train.data.sources`. Packages are
fetched once into the sources cache (`fetch.apt_package`), never installed.
"""
from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soup_train.data.fetch import apt_package
from soup_train.data.sources import chunk_text, dedup

DOC_CHARS = 2000  # characters per document (a customer's "file")


@dataclass(frozen=True)
class OodCustomer:
    name: str
    kind: str  # reference prose | technical text | dialogue
    package: str
    documents: Callable[[Path], list[str]]  # package root -> raw texts


def _gz(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")


def devil(root: Path) -> list[str]:
    return [_gz(root / "usr/share/dictd/devil.dict.dz")]  # dictzip is gzip-compatible; cut by `documents`


def jargon(root: Path) -> list[str]:
    text = _gz(root / "usr/share/doc/jargon-text/jargon.txt.gz")
    entries = re.split(r"\n(?=\s*:[^:\n]{1,80}:)", text)  # ":headword: n." starts an entry
    return [e for e in entries if e.lstrip().startswith(":") and len(e) > 200]  # not the headword index


def manpages(root: Path) -> list[str]:
    pages = sorted((root / "usr/share/man").glob("man[57]/*.gz"))
    return [_gz(p) for p in pages if not p.is_symlink()]


def crawl(root: Path) -> list[str]:
    text = (root / "usr/share/crawl/dat/database/monspeak.txt").read_text(errors="replace")
    return ["".join(e for e in text.split("%%%%") if e.count('"') >= 4)]  # the entries with speech


CUSTOMERS = (OodCustomer("devil", "reference prose", "dict-devil", devil),
             OodCustomer("jargon", "reference prose", "jargon-text", jargon),
             OodCustomer("manpages", "technical text", "manpages", manpages),
             OodCustomer("crawl", "dialogue", "crawl-common", crawl))


def documents(customer: OodCustomer, cache: Path) -> list[str]:
    """The customer's documents: the package's texts cut to at most DOC_CHARS, without repeats."""
    root, _ = apt_package(customer.package, cache)
    return dedup([c for t in customer.documents(root) for c in chunk_text(t, DOC_CHARS)])


def split_files(docs: list[str], fit: int, held: int) -> tuple[list[str], list[str]]:
    """`fit` files to build from and `held` other files to score on, spread evenly over the package
    (every k-th document), the held-out ones interleaved with the others."""
    step = max(1, len(docs) // (fit + held))
    picked = docs[::step][:fit + held]
    every = (fit + held) // held
    scored = [d for i, d in enumerate(picked) if i % every == every - 1][:held]
    return [d for d in picked if d not in scored][:fit], scored
