"""An external-data file written at increasing offsets and hashed as it is written.

Export writes each specialist's `model.onnx.data` tensor after tensor in the graph's storage
order; hashing the bytes on their way to the file saves the manifest reading every file back
(about 3 ms per 5 MB specialist, which in a batch is a large part of each customer's cost).
The hash covers exactly the file's bytes: alignment holes are zeros in the file and in the hash,
and the file ends where `finish` says. A write that goes back before the end of the previous one
(emit never makes one) drops the running hash, and the manifest then reads the file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

_ZEROS = bytes(1 << 16)


class HashedDataFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None  # opened at the first write (by the thread that writes it, once its directory exists)
        self.hash: hashlib._Hash | None = hashlib.sha256()
        self.pos = 0  # where the previous write ended
        self.digest: str | None = None  # set by finish
        self.closed = False

    def _open(self) -> int:
        if self.fd is None:
            if self.closed:  # never reopened (with O_TRUNC) by a write that outlived a failed export
                raise ValueError(f"{self.path} was closed")
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return self.fd

    def write_at(self, offset: int, data: np.ndarray | bytes) -> None:
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if self.hash is not None:
            if offset < self.pos:
                self.hash = None
            else:
                self._zeros(offset - self.pos)
                self.hash.update(view)
        fd, done = self._open(), 0
        while done < view.nbytes:  # one positioned write, unbuffered (a short write continues)
            done += os.pwrite(fd, view[done:], offset + done)
        self.pos = max(self.pos, offset + view.nbytes)

    def finish(self, size: int) -> str | None:
        """End the file at `size` bytes and close it; its SHA-256 (hex), or None if not known (also
        kept as `digest`)."""
        os.ftruncate(self._open(), size)
        self.close()
        if self.hash is None or size < self.pos:
            return None
        self._zeros(size - self.pos)
        self.digest = self.hash.hexdigest()
        return self.digest

    def close(self) -> None:
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _zeros(self, n: int) -> None:
        while n > 0:
            self.hash.update(_ZEROS[:min(n, len(_ZEROS))])
            n -= len(_ZEROS)
