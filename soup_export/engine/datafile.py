"""An external-data file written at increasing offsets and hashed as it is written.

Export writes each specialist's `model.onnx.data` tensor after tensor in the graph's storage
order; hashing the bytes on their way to the file saves the manifest reading every file back,
which in a batch is a large part of each customer's cost (measured: docs/internals.md). The hash
covers exactly the file's bytes: alignment holes are zeros in the file and in the hash, and the
file ends where `finish` says. A write that goes back before the end of the previous one
(emit never makes one) drops the running hash, and the manifest then reads the file.

Every byte goes through a staging buffer of CHUNK bytes (holes as zeros), hashed and written
whole: a specialist's 130 tensors (the norms and scales a few KB each) would otherwise cost as
many system calls and hash updates.

Direct I/O: where the system has O_DIRECT (Linux) the file is opened with it, and each chunk goes
from the buffer to the device without a copy into the page cache. On the virtual machines
measured, that copy is more than half of a batch's CPU work per customer, because memory handed
back to the host is faulted in again page by page; a direct write costs a small fraction of it
(docs/internals.md). A batch of many customers then also leaves the bank's pages in the cache.
The file is readable at once as usual; the first reader (parity, a runtime) reads it from the
device. A file system that refuses O_DIRECT (EINVAL, when opening or writing) gets ordinary
writes, and so does an export whose settings turn direct I/O off (`EngineSettings.direct_io`,
SOUP_DIRECT_IO=0).

Background writes: a direct write waits for the device, so each full chunk is handed to the
process's I/O threads (IO_THREADS) and the next one is staged in a second buffer meanwhile,
rather than export's writer threads waiting in writes; a file has at most one chunk being
written. A failed write is raised at the file's next wait (the next chunk, or `finish`); `close`
waits for the chunk being written before closing the descriptor. The last chunk's unaligned end
is written without O_DIRECT, so the file ends where its bytes do: shrinking it by a truncation
after a padded direct write would wait for the device again (measured: docs/internals.md).
"""
from __future__ import annotations

import errno
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from soup_export.meter import section

ALIGN = 4096  # direct I/O: the buffer's address, file offsets and lengths are multiples of this
CHUNK = 1 << 20  # bytes staged before a write (a multiple of ALIGN; large, so the writes' system calls cost little)
IO_THREADS = 4  # threads that make the chunks' writes, for every file of the process


DIRECT_MIN = 1 << 16  # bytes: a smaller file written from memory is written as usual (a direct write waits for the device)


def write_file(path: Path, data: bytes, direct: bool) -> None:
    """`data` as the file `path`, the way a data file is written (with `direct`: direct I/O) if it is large."""
    if len(data) < DIRECT_MIN or not direct or not hasattr(os, "O_DIRECT"):
        Path(path).write_bytes(data)
        return
    fh = HashedDataFile(path, direct=True, hashed=False, metered=None)
    try:
        fh.write_at(0, data)
        fh.finish(len(data))
    finally:
        fh.close()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _io_pool() -> ThreadPoolExecutor:
    """The process's I/O threads (made at the first write; a forked child makes its own)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="soup-export-io")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _aligned_buffer() -> np.ndarray:
    raw = np.empty(CHUNK + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + CHUNK]


class HashedDataFile:
    """A file written at increasing offsets through staged chunks, hashed on the way (see the module
    docstring). `direct`: O_DIRECT where the system has it; `metered`: the meter part its writes
    count to (`engine.meter`; None: its caller's)."""

    def __init__(self, path: Path, direct: bool, hashed: bool = True, metered: str | None = "data-file writes") -> None:
        self.path = Path(path)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.metered = metered
        self.fd: int | None = None  # opened at the first write (by the thread that writes it, once its directory exists)
        self.hash: hashlib._Hash | None = hashlib.sha256() if hashed else None
        self.pos = 0  # where the previous write ended
        self.start = 0  # the file offset of the staged bytes: a multiple of CHUNK while staging
        self.staged = 0  # bytes staged, the file's [start, start + staged)
        self.buf: np.ndarray | None = None  # CHUNK bytes at an ALIGN-aligned address, made at the first write
        self.writing: tuple[Future, np.ndarray] | None = None  # the chunk being written, and its buffer
        self.spare: np.ndarray | None = None  # the other buffer, once its write is done
        self.end = 0  # where the furthest write (a direct write's padding included) ended
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
            self.end = max(self.end, self.pos)
            return
        self._stage(None, offset - self.pos)  # a hole: zeros in the file and in the hash
        self._stage(view, view.nbytes)
        self.pos = offset + view.nbytes

    def _stage(self, view: memoryview | None, n: int) -> None:
        """Append n bytes of view (None: zeros) to the staged bytes, writing each chunk once full."""
        done = 0
        while done < n:
            if self.buf is None:
                self.buf, self.spare = self.spare if self.spare is not None else _aligned_buffer(), None
            k = min(n - done, CHUNK - self.staged)
            if view is None:
                self.buf[self.staged:self.staged + k] = 0
            else:
                self.buf[self.staged:self.staged + k] = np.frombuffer(view[done:done + k], np.uint8)
            self.staged += k
            done += k
            if self.staged == CHUNK:
                self._flush()

    def _flush(self, last: bool = False) -> None:
        """Hash the staged bytes and hand their write to an I/O thread: the next chunk is staged in
        the other buffer meanwhile, and the caller never waits for the device unless the chunk
        before is still being written. With direct I/O a chunk is padded with zeros to a multiple
        of ALIGN (which later writes or `finish`'s truncation replace), except the `last` one: its
        aligned part is written direct and the rest with an ordinary write, so the file ends where
        its bytes do (shrinking it by a truncation would wait for the device again)."""
        if not self.staged:
            return
        data = memoryview(self.buf)[:self.staged]
        self._hash(data)
        self._open()
        direct_part = self.staged
        if self.direct and last:
            direct_part -= self.staged % ALIGN
        elif self.direct:
            direct_part = -(-self.staged // ALIGN) * ALIGN
            self.buf[self.staged:direct_part] = 0
        if direct_part:
            self._wait()
            self.writing = (_io_pool().submit(self._write, self.start, memoryview(self.buf)[:direct_part]), self.buf)
            self.end = max(self.end, self.start + direct_part)
        if direct_part < self.staged:  # the last chunk's unaligned end: an ordinary write, after the rest
            self._wait()
            self._clear_direct_flag()
            self._write(self.start + direct_part, data[direct_part:])
            self.end = max(self.end, self.start + self.staged)
        self.buf = None
        self.start += self.staged
        self.staged = 0

    def _wait(self) -> None:
        """Wait for the chunk being written (raising its error), and keep its buffer for the next."""
        if self.writing is not None:
            future, self.spare = self.writing
            self.writing = None
            future.result()

    def _stop_staging(self) -> None:
        if self.staging:
            self._flush()
            self._wait()
            self.staging, self.hash = False, None
            self._buffered()

    def _hash(self, view: memoryview) -> None:
        if self.hash is not None:
            with section("hashing"):
                self.hash.update(view)

    def _write(self, offset: int, view: memoryview) -> None:
        if self.metered is None:
            return self._pwrite(offset, view)
        with section(self.metered, view.nbytes):
            return self._pwrite(offset, view)

    def _pwrite(self, offset: int, view: memoryview) -> None:
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
        self._clear_direct_flag()
        self.direct = False

    def _clear_direct_flag(self) -> None:
        if self.direct and self.fd is not None:
            import fcntl  # POSIX only, as O_DIRECT is

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def finish(self, size: int) -> str | None:
        """End the file at `size` bytes and close it; its SHA-256 (hex), or None if not known (also
        kept as `digest`)."""
        fd = self._open()
        if self.staging and size > self.pos:  # the zeros up to the end: staged, so written and hashed
            self._stage(None, size - self.pos)
            self.pos = size
        self._flush(last=True)
        self._wait()
        if self.end != size:  # a direct write's padding, a write behind, or an end before the last write
            os.ftruncate(fd, size)
        self.close()
        if self.hash is None or size < self.pos:
            return None
        self.digest = self.hash.hexdigest()
        return self.digest

    def close(self) -> None:
        """Close the file once the chunk being written is done (its error, if any, is the caller's
        failure already: an export that closes without `finish` has failed)."""
        self.closed = True
        if self.writing is not None:
            self.writing[0].exception()
            self.writing = None
        self.buf = self.spare = None
        self.staged = 0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
