"""A dense model on disk as the source of an export pass: a resolved HF directory, or an fp32 ONNX
directory, read as the fp32 weights a bank pass would have fused.

The stage commands (`graph`, `quantize`), parity's fp32 reference and the SmallTalk mixture's
models go through the same engine as `build`, with this source in place of a bank: it yields each
weight with no experts, so Theta is the weight itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from soup_export.errors import ExportInputError
from soup_export.layout import DATA_FILE, HF_WEIGHTS, MODEL_FILE


class DenseSource:
    """fp32 HF-layout weights by name, from an HF directory (safetensors) or an fp32 ONNX directory."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory)
        self.weight, self.shapes = _open(self.path)

    def tensors(self, names: list[str] | None = None, progress: bool = False,
                mapped: object = None) -> Iterator[tuple[str, torch.Tensor, tuple]]:
        """(name, fp32 weight, no experts), in the order of `names`."""
        for name in names if names is not None else self.shapes:
            yield name, torch.from_numpy(np.ascontiguousarray(self.weight(name), np.float32)), ()

    def map(self) -> None:
        return None

    def workspace(self, mixes: int, names: list[str] | None = None) -> torch.Tensor:
        return torch.empty(mixes * max((math.prod(self.shapes[n]) for n in names or self.shapes), default=0))


def dense_weights(directory: Path) -> Callable[[str], np.ndarray]:
    """fp32 weights by HF name, of an HF directory or an fp32 ONNX directory."""
    return _open(Path(directory))[0]


def _open(directory: Path) -> tuple[Callable[[str], np.ndarray], dict[str, tuple[int, ...]]]:
    """(fp32 weights by HF name, their shapes) of an HF directory or an fp32 ONNX directory."""
    directory = Path(directory)
    if (directory / HF_WEIGHTS).is_file():
        from safetensors import safe_open

        handle = safe_open(str(directory / HF_WEIGHTS), framework="np")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        return (lambda name: handle.get_tensor(name).astype(np.float32)), shapes
    if (directory / MODEL_FILE).is_file():
        tensors = _onnx_fp32_weights(directory)
        return (lambda name: np.ascontiguousarray(tensors[name])), {k: v.shape for k, v in tensors.items()}
    raise ExportInputError(f"{directory} holds neither {HF_WEIGHTS} nor {MODEL_FILE}; pass a resolved or "
                           "fp32 ONNX specialist directory")


def _onnx_fp32_weights(directory: Path) -> dict[str, np.ndarray]:
    if not (directory / DATA_FILE).is_file():
        raise ExportInputError(f"{directory} has {MODEL_FILE} but no {DATA_FILE}; copy the whole directory")
    try:
        model = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise ExportInputError(f"{directory / MODEL_FILE} is not a readable ONNX model ({exc}); copy it again") from None
    data = np.memmap(directory / DATA_FILE, dtype=np.uint8, mode="r")
    tensors = {}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if not info or t.name.startswith("model.rotary_emb."):
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if dtype != np.float32:
            raise ExportInputError(f"{directory} is not an fp32 ONNX specialist ({t.name} is {dtype}); "
                                   "quantize from the fp32 export or from the resolved HF directory")
        off, n = int(info.get("offset", 0)), int(info["length"])
        arr = np.frombuffer(data[off:off + n], dtype=np.float32).reshape(tuple(t.dims))
        if t.name.endswith(".T"):
            tensors[t.name[:-2]] = arr.T
        else:
            tensors[t.name] = arr
    return tensors
