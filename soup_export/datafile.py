"""An external-data file written at increasing offsets and hashed as it is written.

Export writes each specialist's `model.onnx.data` tensor after tensor in the graph's storage
order; hashing the bytes on their way to the file saves the manifest reading every file back
(about 3 ms per 5 MB specialist, which in a batch is a large part of each customer's cost).
The hash covers exactly the file's bytes: alignment holes are zeros in the file and in the hash,
and the file ends where `finish` says. A write that goes back before the end of the previous one
(emit never makes one) drops the running hash, and the manifest then reads the file.

Every byte goes through a staging buffer of CHUNK bytes (holes as zeros), hashed and written
whole: a specialist's 130 tensors (the norms and scales a few KB each) had cost as many system
calls and hash updates.

Direct I/O: where the system has O_DIRECT (Linux) the file is opened with it, and each chunk goes
from the buffer to the device without a copy into the page cache. In the export benchmark, the
copies into the page cache took 10-12 ms of CPU per 5 MB specialist (0.43-0.49 GB/s: on the
virtual machines measured, memory that had been handed back to the host is faulted in again page
by page), which is more than half of a batch's work per customer; a direct write costs about
0.5 ms of CPU (the writes' CPU per customer in a batch went from 10.8 ms to 0.6 ms), and the writer thread waits for the device while the fusion goes on. A batch of
many customers then also leaves the bank's pages in the cache. The file is readable at once as
usual; the first reader (parity, a runtime) reads it from the device. A file system that refuses
O_DIRECT (EINVAL, when opening or writing) gets ordinary writes, and so does `SOUP_DIRECT_IO=0`.
"""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np

ALIGN = 4096  # direct I/O: the buffer's address, file offsets and lengths are multiples of this
CHUNK = 1 << 20  # bytes staged before a write (a multiple of ALIGN; 1 MB writes: 4 ms of CPU per 80 MB)
_ZEROS = bytes(1 << 16)


def direct_io() -> bool:
    """Whether data files are written with O_DIRECT (where the system has it; SOUP_DIRECT_IO=0: never)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("SOUP_DIRECT_IO", "1") != "0"


DIRECT_MIN = 1 << 16  # bytes: a smaller file written from memory is written as usual (a direct write waits for the device)


def write_file(path: Path, data: bytes) -> None:
    """`data` as the file `path`, the way a data file is written (direct I/O) if it is large."""
    if len(data) < DIRECT_MIN or not direct_io():
        Path(path).write_bytes(data)
        return
    fh = HashedDataFile(path, direct=True, hashed=False)
    try:
        fh.write_at(0, data)
        fh.finish(len(data))
    finally:
        fh.close()


class HashedDataFile:
    def __init__(self, path: Path, direct: bool | None = None, hashed: bool = True) -> None:
        self.path = Path(path)
        self.direct = (direct_io() if direct is None else direct) and hasattr(os, "O_DIRECT")
        self.fd: int | None = None  # opened at the first write (by the thread that writes it, once its directory exists)
        self.hash: hashlib._Hash | None = hashlib.sha256() if hashed else None
        self.pos = 0  # where the previous write ended
        self.start = 0  # the file offset of the staged bytes: a multiple of CHUNK while staging
        self.staged = 0  # bytes staged, the file's [start, start + staged)
        self.buf: np.ndarray | None = None  # CHUNK bytes at an ALIGN-aligned address, made at the first write
        self.staging = True  # False after a write behind the previous one: plain writes from then on
        self.digest: str | None = None  # set by finish
        self.closed = False

    def _open(self) -> int:
        if self.fd is None:
            if self.closed:  # never reopened (with O_TRUNC) by a write that outlived a failed export
                raise ValueError(f"{self.path} was closed")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            if self.direct:
                try:
                    self.fd = os.open(self.path, flags | os.O_DIRECT, 0o666)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                        raise
                    self.direct = False
            if self.fd is None:
                self.fd = os.open(self.path, flags, 0o666)
        return self.fd

    def write_at(self, offset: int, data: np.ndarray | bytes) -> None:
        if self.closed:
            raise ValueError(f"{self.path} was closed")
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if not view.nbytes:  # nothing to write (the file's end is set by finish)
            return
        if not self.staging or offset < self.pos:  # behind the previous write: no running hash from here on
            self._stop_staging()
            self._write(offset, view)
            self.pos = max(self.pos, offset + view.nbytes)
            return
        self._stage(None, offset - self.pos)  # a hole: zeros in the file and in the hash
        self._stage(view, view.nbytes)
        self.pos = offset + view.nbytes

    def _stage(self, view: memoryview | None, n: int) -> None:
        """Append n bytes of view (None: zeros) to the staged bytes, writing each chunk once full."""
        if self.buf is None and n:
            raw = np.empty(CHUNK + ALIGN, np.uint8)
            skip = -raw.ctypes.data % ALIGN
            self.buf = raw[skip:skip + CHUNK]
        done = 0
        while done < n:
            k = min(n - done, CHUNK - self.staged)
            if view is None:
                self.buf[self.staged:self.staged + k] = 0
            else:
                self.buf[self.staged:self.staged + k] = np.frombuffer(view[done:done + k], np.uint8)
            self.staged += k
            done += k
            if self.staged == CHUNK:
                self._flush()

    def _flush(self) -> None:
        """Hash and write the staged bytes (with direct I/O, zeros up to a multiple of ALIGN after
        them, which later writes or `finish`'s truncation replace)."""
        if not self.staged:
            return
        data = memoryview(self.buf)[:self.staged]
        self._hash(data)
        length = self.staged
        if self.direct:
            length = -(-length // ALIGN) * ALIGN
            self.buf[self.staged:length] = 0
        self._write(self.start, memoryview(self.buf)[:length])
        self.start += self.staged
        self.staged = 0

    def _stop_staging(self) -> None:
        if self.staging:
            self._flush()
            self.staging, self.hash = False, None
            self._buffered()

    def _hash(self, view: memoryview) -> None:
        if self.hash is not None:
            self.hash.update(view)

    def _write(self, offset: int, view: memoryview) -> None:
        fd, done = self._open(), 0
        while done < view.nbytes:  # one positioned write (a short one continues)
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # this file system refuses these direct writes: ordinary ones

    def _buffered(self) -> None:
        """Ordinary writes from now on (any offset, length and address)."""
        if self.direct and self.fd is not None:
            import fcntl  # POSIX only, as O_DIRECT is

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def finish(self, size: int) -> str | None:
        """End the file at `size` bytes and close it; its SHA-256 (hex), or None if not known (also
        kept as `digest`)."""
        self._flush()
        os.ftruncate(self._open(), size)
        self.close()
        if self.hash is None or size < self.pos:
            return None
        n = size - self.pos
        while n > 0:  # the zeros that the truncation added
            self.hash.update(_ZEROS[:min(n, len(_ZEROS))])
            n -= len(_ZEROS)
        self.digest = self.hash.hexdigest()
        return self.digest

    def close(self) -> None:
        self.closed = True
        self.buf, self.staged = None, 0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
