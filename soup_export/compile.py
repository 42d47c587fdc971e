"""Stages 3 and 4, graph and quantize: a dense model (a resolved HF directory or an fp32 ONNX
directory) compiled to an ONNX specialist at a tier, through the same engine as `build`.

`soup-export graph` and `soup-export quantize` call `write_tier`; so do parity's fp32 reference of
a quantized tier and the SmallTalk mixture's routers and experts.
"""
from __future__ import annotations

from pathlib import Path

from soup_export.dense import DenseSource
from soup_export.engine import EngineSettings, Job, Output, run_pass
from soup_export.graph import compile_graph
from soup_export.layout import SPEC_FILE, Arch, read_arch, side_files_of
from soup_export.quantize import make_plan


def write_tier(src: Path, out: Path, tier: str, params: dict | None = None,
               settings: EngineSettings | None = None, arch: Arch | None = None) -> Path:
    """The ONNX specialist of the dense model in `src` at `tier` (declared `params`), as `out/onnx`'s
    files written directly into `out` (which may exist): model.onnx, model.onnx.data, the runtime
    configs, and the side files `src` holds. `settings`: the engine's (default: the environment's)."""
    arch = arch or read_arch(src)[0]
    files = side_files_of(src)
    spec = files.pop(SPEC_FILE, None)
    job = Job(compile_graph(arch, make_plan(tier, params)), files)
    run_pass(DenseSource(src), job, [Output(Path(out), _no_alpha(), spec, flat=True)],
             settings or EngineSettings.from_env())
    return Path(out)


def _no_alpha():
    import torch

    return torch.empty(0)
