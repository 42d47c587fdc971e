"""The bank pass: from a source (a soup bank, or a dense model) to finished ONNX specialists.

One entry point, `run_pass(source, job, outputs, settings)`, writes for every output its `onnx/`
(the graph, its data file, the side and runtime files, the spec) and, if the job asks, `hf/` (the
fused weights as an HF directory), reading the source tensor by tensor, once for all outputs. Two
executors sit behind it, chosen by `EngineSettings.executor`:

    reference  plain torch and one ordinary file write per array: each mix fused by `combine`,
               each weight encoded by `encode.encode_one`. The specification.
    fast       the same pass with the compiled int4 kernel (fusion and quantization in one pass
               over the bank for every mix), writer threads, direct I/O and hard links.

Both write the same bytes when they sum in the same order: whenever HF weights are written
(`job.write_hf`, what parity needs) `fast` fuses every mix by `combine` too, and its compiled
quantization equals `quantize_nbits` bit for bit. A shipping-only `fast` pass (no HF weights)
fuses batches by one matrix product or in the kernel: the same sums in another order, equal to
the reference to fp32 rounding (tests/test_engine.py states and asserts the bound).
Encoding always happens before writing: a writer only places bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from soup_export.engine.settings import EngineSettings
from soup_export.graph import DecoderGraph
from soup_export.layout import GENERATION_CONFIG, MODEL_FILE, hf_dir, onnx_dir, runtime_files

__all__ = ["EngineSettings", "Job", "Output", "PassResult", "run_pass"]


@dataclass(frozen=True)
class Output:
    """One specialist of a pass: its export directory (staged), coefficients, and spec's bytes."""

    root: Path
    alpha: object  # torch.Tensor (n,): the mix's coefficients (empty for a dense source)
    spec: bytes | None = None  # soup_spec.json (None: not written)
    flat: bool = False  # the ONNX files directly in `root` (a stage command's output), not in root/onnx

    @property
    def onnx(self) -> Path:
        return Path(self.root) if self.flat else onnx_dir(self.root)

    @property
    def hf(self) -> Path:
        return hf_dir(self.root)


@dataclass(frozen=True)
class Job:
    """What a pass writes for every output: the compiled graph and the files alike for all."""

    graph: tuple[bytes, DecoderGraph]  # graph.compile_graph's (model.onnx bytes, layout)
    side_files: dict[str, bytes]  # the HF side files (config, generation config, tokenizer), in onnx/ and hf/
    write_hf: bool = False  # also hf/: the fused weights as model.safetensors
    link_shared: bool = False  # fast: files alike for every output hard-linked within a writer lane

    @property
    def layout(self) -> DecoderGraph:
        return self.graph[1]

    def onnx_files(self) -> dict[str, bytes]:
        """onnx/'s files written from memory, the same bytes for every output (the spec aside)."""
        g = self.layout
        generation = json.loads(self.side_files.get(GENERATION_CONFIG, b"{}"))
        return {**self.side_files, MODEL_FILE: self.graph[0],
                **runtime_files(g.arch, g.plan.tier, g.storage(), generation)}


@dataclass
class PassResult:
    known: list[dict[str, tuple[str, int]]]  # per output: {relative path: (sha256, bytes)} hashed while written
    used: dict = field(default_factory=dict)  # how the pass ran (executor, kernel, reads, writes), for the manifest


def run_pass(source, job: Job, outputs: list[Output], settings: EngineSettings, progress: bool = False) -> PassResult:
    """Write every output's directories from one pass over `source` (a `bank.Bank` or a
    `dense.DenseSource`). The roots are staged directories: every file is written under its final name."""
    if not outputs:
        return PassResult([], {**settings.to_dict()})
    missing = sorted(set(source.shapes) - set(w for w in _weights(job.layout)))
    assert not missing, f"the graph does not use {missing}"
    if settings.executor == "reference":
        from soup_export.engine import reference as executor
    else:
        from soup_export.engine import fast as executor
    return executor.run(source, job, outputs, settings, progress)


def _weights(g: DecoderGraph) -> list[str]:
    return [s.weight for s in g.stored if not s.weight.startswith("@")]
