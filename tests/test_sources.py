"""Corpus sources: chunking, provider fallback, skipping, the R reader and the package cache.

Everything here is offline: packages are built locally with dpkg-deb and served by a stand-in
`apt-get` on PATH. The real registries are exercised by the `network` test only.
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
import zlib

import numpy as np
import pytest

from soup_train.data import sources
from soup_train.data.fetch import SourceUnavailable, apt_package
from soup_train.data.sources import Fetched, chunk_text, dedup, load_preset, load_source
from soup_train.errors import DataError


def test_chunk_text_cuts_at_line_boundaries_and_drops_fragments():
    lines = [f"line {i} " + "x" * 40 + "\n" for i in range(30)]  # 49 chars each
    chunks = chunk_text("".join(lines), 200)
    assert all(len(c) <= 200 for c in chunks)
    assert "\n".join(chunks) == "".join(lines).strip("\n")  # nothing lost, cuts between lines
    assert chunk_text("short\n" * 3, 200) == []  # under 50 characters
    long = chunk_text("y" * 450, 200)  # one line longer than doc_chars is hard-split
    assert [len(c) for c in long] == [200, 200, 50]


def test_dedup_ignores_whitespace_differences():
    assert dedup(["MIT  licence\ntext", "MIT licence text", "other", "  "]) == ["MIT  licence\ntext", "other"]


def provider(docs=None, error=None):
    def fetch(cache):
        if error:
            raise SourceUnavailable(error)
        return Fetched(docs, "fake")
    fetch.__name__ = f"fake_{error or 'ok'}"
    return fetch


def test_load_source_falls_back_to_the_next_provider_and_caps_deterministically(tmp_path):
    docs = [f"document number {i} " * 5 for i in range(50)]
    got, prov = load_source("x", [provider(error="no network"), provider(docs)], tmp_path, doc_chars=4000, max_docs=10)
    again, _ = load_source("x", [provider(docs)], tmp_path, doc_chars=4000, max_docs=10)
    assert len(got) == prov.documents == 10 and got == again and set(got) <= set(docs)
    assert got != docs[:10]  # a spread over the source, not its first files
    with pytest.raises(SourceUnavailable, match="fake_a: no network.*fake_b: offline"):
        load_source("x", [provider(error="a: no network"), provider(error="b: offline")], tmp_path,
                    doc_chars=4000, max_docs=None)


def test_unavailable_sources_are_skipped_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sources.PRESETS, "two", {"ok": [provider(["some text that is long enough " * 3])],
                                                 "gone": [provider(error="package not found")]})
    with caplog.at_level(logging.WARNING):
        corpus, provenance = load_preset("two", tmp_path)
    assert list(corpus) == ["ok"] and [p.source for p in provenance] == ["ok"]
    assert "source gone unavailable, skipped: fake_package not found: package not found" in caplog.text
    with pytest.raises(DataError, match="unknown corpus preset 'nope'; choose one of"):
        load_preset("nope", tmp_path)


def test_debug_preset_is_offline_and_has_the_three_fallback_domains(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no npm: nothing can be fetched
    corpus, provenance = load_preset("debug", tmp_path, max_docs=5)
    assert set(corpus) == {"python-code", "licences", "python-docs"}
    assert all(len(d) == 5 for d in corpus.values()) and not any(p.fetched for p in provenance)
    assert any("def " in d for d in corpus["python-code"])
    assert any("permission" in d.lower() or "licen" in d.lower() for d in corpus["licences"])


def test_default_preset_without_registries_keeps_the_offline_domains(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        corpus, _ = load_preset("default", tmp_path / "cache", max_docs=3)
    assert set(corpus) == {"python-code", "licences", "python-docs"}
    assert "source bible unavailable" in caplog.text and "apt-get not found" in caplog.text


def _serialize(obj) -> bytes:
    import rdata
    from rdata.conversion import convert_python_to_r_data

    return rdata.unparser.unparse_data(convert_python_to_r_data(obj), file_type="rds")


def test_r_lazyload_database_is_read_without_r(tmp_path):
    books = {"emma": np.array(["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich"]),
             "persuasion": np.array(["Chapter 1", "Sir Walter Elliot, of Kellynch Hall"])}
    blob, offsets = b"", {}
    for name, value in books.items():
        raw = _serialize(value)
        chunk = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        offsets[name] = np.array([len(blob), len(chunk)], dtype=np.int32)
        blob += chunk
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize({"variables": offsets, "compressed": True})))
    got = sources._read_r_lazyload(tmp_path)
    assert got == {k: [str(x) for x in v] for k, v in books.items()}


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """An `apt-get` on PATH that serves one locally built .deb and counts its calls."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: demo-text\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: test\n")
    (tree / "usr" / "share" / "demo").mkdir(parents=True)
    (tree / "usr" / "share" / "demo" / "words.txt").write_text("hello from a package\n")
    deb = tmp_path / "demo-text_1.0_all.deb"
    import subprocess

    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "apt-get"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\n"
                      f"case \"$*\" in *download*demo-text*) cp {deb} . ;; *download*) exit 100 ;; esac\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls"


def test_apt_packages_are_extracted_once_then_served_from_the_cache(fake_apt, tmp_path):
    cache = tmp_path / "cache"
    root, fetched = apt_package("demo-text", cache)
    assert fetched == ["demo-text_1.0_all.deb"]
    assert (root / "usr/share/demo/words.txt").read_text() == "hello from a package\n"
    root2, fetched2 = apt_package("demo-text", cache)
    assert root2 == root and fetched2 == [] and len(fake_apt.read_text().splitlines()) == 1
    with pytest.raises(SourceUnavailable, match="apt-get download .*missing-pkg.* failed"):
        apt_package("missing-pkg", cache)
    assert "update" in fake_apt.read_text()  # retried with a private, refreshed package list
    assert not [p for p in (cache / "apt").iterdir() if p.name.startswith(".")]  # no half-extracted dirs


@pytest.mark.network
def test_default_preset_fetches_every_domain_from_the_registries(tmp_path):
    corpus, provenance = load_preset("default", tmp_path, max_docs=20)
    assert set(corpus) == set(sources.SOURCES)
    assert all(p.fetched for p in provenance if p.source != "python-code")
    assert any("Elizabeth" in d or "Emma" in d for d in corpus["austen"])
