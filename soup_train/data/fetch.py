"""Fetch packages from the machine's registries into a cache, without installing anything.

- Debian packages: `apt-get download PKG` then `dpkg-deb -x PKG.deb DIR`. If apt's package
  lists are missing (fresh containers), a private list directory under the cache is refreshed
  with `apt-get update -o Dir::State::Lists=...` and used instead.
- npm packages: `npm pack PKG`, then the tarball is extracted with tarfile's `data` filter (no
  absolute paths, links or devices escape the directory).
Each package is extracted once into `CACHE/{apt,npm}/NAME/` (complete when `.done` exists);
a later call reports it as cached. Every subprocess has a timeout.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
TIMEOUT = 600


class SourceUnavailable(Exception):
    """A provider could not deliver its source (no network, no tool, no such package)."""


def _run(cmd: list[str], cwd: Path) -> str:
    if shutil.which(cmd[0]) is None:
        raise SourceUnavailable(f"{cmd[0]} not found on this machine")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"`{' '.join(cmd)}` timed out after {TIMEOUT} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise SourceUnavailable(f"`{' '.join(cmd)}` failed: {lines[-1] if lines else proc.returncode}")
    return proc.stdout


def _cached(target: Path) -> bool:
    return (target / ".done").is_file()


def _finish(tmp: Path, target: Path) -> None:
    (tmp / ".done").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def apt_package(name: str, cache: Path) -> tuple[Path, list[str]]:
    """(extracted root, [downloaded .deb names]) of one Debian package."""
    target = cache / "apt" / name
    if _cached(target):
        return target, []
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        work = Path(tmp)
        opts = ["-o", "APT::Sandbox::User=root"] if _is_root() else []
        try:
            _run(["apt-get", "download", *opts, name], work)
        except SourceUnavailable as first:
            lists = cache / "apt-lists"
            (lists / "partial").mkdir(parents=True, exist_ok=True)
            private = [*opts, "-o", f"Dir::State::Lists={lists}"]
            log.info("apt-get download %s failed (%s); refreshing a private package list", name, first)
            _run(["apt-get", "update", *private], work)
            _run(["apt-get", "download", *private, name], work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise SourceUnavailable(f"apt-get download {name} produced no .deb")
        tree = work / "tree"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(tree)], work)
        _finish(tree, target)
        return target, [d.name for d in debs]


def apt_candidates(pattern: str) -> list[str]:
    """Package names matching a regex (newest version-looking name first), e.g. ^linux-doc-[0-9.]+$."""
    try:
        out = _run(["apt-cache", "search", "--names-only", pattern], Path.cwd())
    except SourceUnavailable:
        return []
    names = [line.split(" - ")[0].strip() for line in out.splitlines() if line.strip()]
    return sorted(names, key=_version_key, reverse=True)


def _version_key(name: str) -> tuple:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", name))


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


def npm_package(name: str, cache: Path) -> tuple[Path, list[str]]:
    """(extracted `package/` root, [tarball name]) of one npm package."""
    target = cache / "npm" / name
    if _cached(target):
        return target, []
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        work = Path(tmp)
        _run(["npm", "pack", "--silent", name], work)
        tarballs = sorted(work.glob("*.tgz"))
        if not tarballs:
            raise SourceUnavailable(f"npm pack {name} produced no tarball")
        tree = work / "tree"
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tree, filter="data")
        _finish(tree, target)
        return target, [tarballs[0].name]
