"""Write safetensors files one tensor at a time (the header first, from the known shapes).

`safetensors.save_file` needs every tensor in memory at once; fusion must hold only one dense
tensor (plus the bank slice it comes from), so the file is streamed: 8-byte little-endian
header length, the JSON header (padded to 8 bytes), then each tensor's bytes in header order.
Written to a temporary name and renamed on `close()`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8"}


class SafetensorsWriter:
    """`SafetensorsWriter(path, [(name, dtype, shape), ...])`, then `write(name, tensor)` in that order."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path, self.tmp = Path(path), Path(path).with_name(f".{Path(path).name}.tmp")
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset, self.order = 0, []
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape, nbytes = self.order[self.next]
        assert name == expected, f"tensors must be written in header order: expected {expected}, got {name}"
        assert tuple(tensor.shape) == shape, f"{name}: shape {tuple(tensor.shape)} != {shape}"
        data = tensor.detach().to(dtype).contiguous().cpu()
        self.file.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
        self.next += 1

    def close(self) -> None:
        assert self.next == len(self.order), f"{len(self.order) - self.next} tensors were not written"
        self.file.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
