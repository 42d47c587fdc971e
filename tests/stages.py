"""Helpers shared by the export stages' tests: the parity bounds, a file's hash, and a dense model
compiled to a tier through the engine (what `soup-export graph` / `quantize` run)."""
from __future__ import annotations

import hashlib
from pathlib import Path

SOUP_TOL = 1e-5  # fp32 soup vs fused dense (the bound)
ONNX_TOL = 1e-4  # fp32 PyTorch vs onnxruntime (the bound)
DOMAINS = ["python-code", "licences", "python-docs"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_tier(hf_dir: Path, out: Path, tier: str, params: dict | None = None) -> Path:
    """The ONNX specialist of a resolved HF directory at `tier`, written into `out`."""
    from soup_export.compile import write_tier as compile_tier

    return compile_tier(hf_dir, out, tier, params)
