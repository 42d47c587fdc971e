"""An external-data file written at increasing offsets and hashed as it is written.

Export writes each specialist's `model.onnx.data` tensor after tensor in the graph's storage
order; hashing the bytes on their way to the file saves the manifest reading every file back
(about 3 ms per 5 MB specialist, which in a batch is a large part of each customer's cost).
The hash covers exactly the file's bytes: alignment holes are zeros in the file and in the hash,
and the file ends where `finish` says. A write that goes back before the end of the previous one
(emit never makes one) drops the running hash, and the manifest then reads the file.

Small writes (the norms, the scales, each a few KB) are gathered into one buffer of up to BUFFER
bytes, holes included as zeros, and written and hashed with it: a specialist's 130 tensors
had cost as many system calls and hash updates: writing and hashing 16 customers' files of the
benchmark's model took 143 ms of CPU one tensor at a time, 105 ms gathered (58 ms of it hashing).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

_ZEROS = bytes(1 << 16)
BUFFER = 1 << 18  # bytes gathered before a write; a larger write goes to the file directly


class HashedDataFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None  # opened at the first write (by the thread that writes it, once its directory exists)
        self.hash: hashlib._Hash | None = hashlib.sha256()
        self.pos = 0  # where the previous write ended
        self.buffer = bytearray()  # the bytes [start, pos) not yet written (and not yet hashed)
        self.start = 0
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
        if offset < self.pos:  # behind the previous write: no running hash from here on
            self.flush()
            self.hash = None
            self._write(offset, view)
            return
        if self.buffer and offset + view.nbytes - self.start <= BUFFER:
            self.buffer += bytes(offset - self.pos)
            self.buffer += view
        else:
            self.flush()
            self._zeros(offset - self.pos)  # a hole in the file, zeros in the hash
            if view.nbytes < BUFFER:
                self.buffer, self.start = bytearray(view), offset
            else:
                self._hash(view)
                self._write(offset, view)
        self.pos = offset + view.nbytes

    def flush(self) -> None:
        """Write (and hash) the gathered bytes."""
        if self.buffer:
            view = memoryview(self.buffer)
            self._hash(view)
            self._write(self.start, view)
            self.buffer = bytearray()

    def _write(self, offset: int, view: memoryview) -> None:
        fd, done = self._open(), 0
        while done < view.nbytes:  # one positioned write, unbuffered (a short write continues)
            done += os.pwrite(fd, view[done:], offset + done)
        self.pos = max(self.pos, offset + view.nbytes)

    def _hash(self, view: memoryview) -> None:
        if self.hash is not None:
            self.hash.update(view)

    def finish(self, size: int) -> str | None:
        """End the file at `size` bytes and close it; its SHA-256 (hex), or None if not known (also
        kept as `digest`)."""
        self.flush()
        os.ftruncate(self._open(), size)
        self.close()
        if self.hash is None or size < self.pos:
            return None
        self._zeros(size - self.pos)
        self.digest = self.hash.hexdigest()
        return self.digest

    def close(self) -> None:
        self.closed = True
        self.buffer = bytearray()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _zeros(self, n: int) -> None:
        while n > 0 and self.hash is not None:
            self.hash.update(_ZEROS[:min(n, len(_ZEROS))])
            n -= len(_ZEROS)
