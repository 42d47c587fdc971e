"""Stage 7, manifest: what was built, from what, how, and how well; no absolute paths.

`manifest.json` records the exact spec (as given), the normalised domain weights, alpha, the
checkpoint's SHA-256, every output file's SHA-256 and bytes (paths relative to the export
directory), the quantization plan, predicted vs actual size, parity metrics and library versions.
"""
from __future__ import annotations

import functools
import json
import platform
from importlib import metadata
from pathlib import Path

from soup_export.files import file_sha256, read_json

FORMAT = "soup-export-v1"
MANIFEST = "manifest.json"
LIBRARIES = ("soup", "torch", "transformers", "tokenizers", "safetensors", "onnx", "onnxruntime",
             "onnxruntime-genai", "numpy")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{lib: library_version(lib) for lib in LIBRARIES}}


@functools.lru_cache(maxsize=None)
def library_version(lib: str) -> str:
    """An installed distribution's version ("not installed" if absent), looked up once per process:
    each lookup parses the package's metadata (about 0.5 ms)."""
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "not installed"


def file_table(root: Path, known: dict[str, tuple[str, int]] | None = None) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under root except root's own manifest
    (a mixture's table covers the manifests of its models). `known`: {relative path: (sha256,
    bytes)} of files hashed as they were written; each is used only if the file still has that size."""
    known = known or {}
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p != root / MANIFEST:
            rel, size = p.relative_to(root).as_posix(), p.stat().st_size
            sha = known[rel][0] if rel in known and known[rel][1] == size else file_sha256(p)
            table[rel] = {"sha256": sha, "bytes": size}
    return table


def write_manifest(root: Path, record: dict, known: dict[str, tuple[str, int]] | None = None) -> dict:
    """Write root/manifest.json; returns the manifest as JSON reads it back."""
    data = {"format": FORMAT, **record, "files": file_table(root, known), "versions": dict(versions())}
    text = json.dumps(data, indent=2) + "\n"
    (root / MANIFEST).write_text(text)
    return json.loads(text)


def read_manifest(root: Path) -> dict:
    from soup_export.errors import ExportInputError

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ExportInputError(f"{root} has no {MANIFEST}; pass a directory written by `soup-export build` "
                               "(or one customer's directory of a `soup-export batch`)")
    data = read_json(path)
    if data.get("format") != FORMAT:
        raise ExportInputError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data
