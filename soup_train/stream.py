"""Write safetensors files one tensor at a time (the header first, from the known shapes).

`safetensors.save_file` needs every tensor in memory at once; fusion must hold only one dense
tensor (plus the bank slice it comes from), so the file is streamed: 8-byte little-endian
header length, the JSON header (padded to 8 bytes), then each tensor's bytes in header order.
Written to a temporary name and renamed on `close()`.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8"}


class SafetensorsWriter:
    """`SafetensorsWriter(path, [(name, dtype, shape), ...])`, then `write(name, tensor)` in that order.
    With `hashed`, the file's SHA-256 is computed as it is written (`close` returns it): a checkpoint
    records it, and export never reads the whole bank again to hash it."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, hashed: bool = False) -> None:
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
        self.hash = hashlib.sha256() if hashed else None
        # the hash runs on its own thread while the next bytes are written (both release the GIL)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="soup-sha256") if hashed else None
        self._hashing = None
        self._put(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def _put(self, data) -> None:
        if self.hash is not None:
            self._wait_hash()  # in order: one update in flight (it holds `data` until it is done)
            self._hashing = self._hasher.submit(self.hash.update, data)
        self.file.write(data)

    def _wait_hash(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape = self.order[self.next][2]
        assert tuple(tensor.shape) == shape, f"{name}: shape {tuple(tensor.shape)} != {shape}"
        self.write_pieces(name, [tensor])

    def write_pieces(self, name: str, pieces) -> None:
        """Tensor `name` from consecutive pieces along its first dimension (for example one expert at
        a time), so that a tensor larger than memory never has to be whole."""
        expected, dtype, shape, nbytes = self.order[self.next]
        assert name == expected, f"tensors must be written in header order: expected {expected}, got {name}"
        written = 0
        for piece in pieces:
            data = piece.detach().to(dtype).contiguous().cpu()
            if data.numel():
                self._put(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # 0-dim too (AdamW step)
            written += data.numel() * data.element_size()
        assert written == nbytes, f"{name}: {written} bytes written, its shape {shape} needs {nbytes}"
        self.next += 1

    def close(self) -> str | None:
        """Finish the file under its name; returns its SHA-256 when it was made with `hashed=True`."""
        assert self.next == len(self.order), f"{len(self.order) - self.next} tensors were not written"
        self.file.close()
        if self.hash is not None:
            self._wait_hash()
            self._hasher.shutdown()
        self.tmp.replace(self.path)
        return self.hash.hexdigest() if self.hash is not None else None

    def abort(self) -> None:
        self.file.close()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
        self.tmp.unlink(missing_ok=True)


@contextmanager
def all_written(writers: list[SafetensorsWriter]) -> Iterator[list[SafetensorsWriter]]:
    """Close every writer in `writers` (a list the block may still append to) if the block succeeds;
    abort every one (its temporary file removed) if it fails."""
    try:
        yield writers
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
