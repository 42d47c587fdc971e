"""ORT format for onnxruntime mobile (`--ort-format`), with onnxruntime's own tools.

`model.ort` is written next to `model.onnx` by onnxruntime's converter
(`onnxruntime.tools.convert_onnx_models_to_ort`, fixed optimizations, weights inside the
flatbuffer), and onnxruntime's mobile usability checker reports how well NNAPI (Android) and
CoreML (iOS) could take the graph; the CPU execution provider always runs it. The report goes
into the manifest; the converted model must give the same logits as model.onnx.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from soup_export.errors import ExportInputError
from soup_export.layout import MODEL_FILE, ORT_FILE


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def write_ort_format(onnx_dir: Path) -> dict:
    """Convert onnx_dir/model.onnx to onnx_dir/model.ort; return the converter's and checker's report."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    source = Path(onnx_dir) / MODEL_FILE
    noisy = logging.getLogger("ort_format_model.utils")
    level = noisy.level
    noisy.setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(dir=Path(onnx_dir).parent, prefix=".ort-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(source, output_dir=Path(tmp), optimization_styles=[OptimizationStyle.Fixed])
        produced = sorted(Path(tmp).glob("*.ort"))
        if len(produced) != 1:
            raise ExportInputError(f"onnxruntime's converter produced {len(produced)} .ort files for {source}")
        shutil.move(str(produced[0]), Path(onnx_dir) / ORT_FILE)
    noisy.setLevel(level)
    return {"file": ORT_FILE, "bytes": (Path(onnx_dir) / ORT_FILE).stat().st_size,
            "max_abs_logit_diff_vs_onnx": _same_logits(Path(onnx_dir)), "usability": mobile_usability(source)}


def mobile_usability(model: Path) -> dict:
    """onnxruntime's NNAPI / CoreML suitability verdicts for the graph."""
    from onnxruntime.tools.mobile_helpers.usability_checker import analyze_model

    logger = logging.getLogger("soup_export.mobile_usability")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        usable = bool(analyze_model(model, skip_optimize=False, logger=logger))
    finally:
        logger.removeHandler(handler)
    verdicts = {}
    for line in handler.lines:
        m = re.match(r"Model should perform well with (.+?) as is: (\w+)", line)
        if m:
            verdicts[m.group(1)] = m.group(2)
    return {"cpu": "YES", **verdicts, "may_use_mobile_accelerators": usable}


def _same_logits(onnx_dir: Path) -> float:
    import onnxruntime as ort

    from soup_export.layout import LOGITS, decoder_feeds, read_arch

    arch, _ = read_arch(onnx_dir)
    past = [np.zeros((1, arch.kv_heads, 0, arch.head_dim), np.float32) for _ in range(2 * arch.layers)]
    feeds = decoder_feeds(np.arange(1, 9, dtype=np.int64)[None] % arch.vocab, np.ones((1, 8), np.int64),
                          np.arange(8, dtype=np.int64)[None], past)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a, b = (ort.InferenceSession(str(onnx_dir / name), opts, providers=["CPUExecutionProvider"]).run([LOGITS], feeds)[0]
            for name in (MODEL_FILE, ORT_FILE))
    return float(np.abs(a - b).max())
