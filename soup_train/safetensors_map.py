"""Zero-copy, read-only access to a safetensors file too large for memory (export's bank).

`safetensors_header` parses the header from the file's first bytes (safetensors' own reader maps
the whole file privately, which the kernel refuses for a bank larger than memory);
`MappedSafetensors` gives every tensor as a view of one shared read-only map, and reads ahead
(posix_fadvise) in the order fusion reads, on a background thread.
"""
from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from soup_train.errors import CheckpointError
from soup_train.model.soup_math import EXPERTS_PREFIX


class MappedSafetensors:
    """Zero-copy tensors of a safetensors file: views of one read-only memory map.

    `safe_open(...).get_tensor` copies every tensor out of the map; fusion reads each bank tensor
    exactly once, so the copy would double the memory traffic of the whole export. The map is
    shared and read-only: the kernel charges none of it against the process's memory (a private,
    writable map of a bank larger than memory is refused), and the pages it reads are page cache
    that the kernel drops under pressure. A view must never be written to (the process would get
    SIGSEGV); fusion only reads them. bf16 and fp16 tensors are views too (reinterpreted from their
    16-bit words), converted to fp32 by whoever fuses them, a block at a time.
    """

    _NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "I8": np.int8}

    def __init__(self, path: Path) -> None:
        self.header, self.base = safetensors_header(path)
        self.path = path
        self._prefetched: set[str] = set()
        self._ahead: queue.SimpleQueue | None = None  # (offset, length) ranges for the read-ahead thread
        self._warm: bool | None = None  # whether the whole file looked resident when first asked
        # a plain ndarray over the map (which it keeps open): slicing np.memmap runs a Python hook per view
        self.map = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)

    def prefetch(self, groups: list[list[str]]) -> None:
        """Ask the kernel to read these tensors' bytes ahead (posix_fadvise WILLNEED, in the order
        given, on one background thread: asking blocks while the device is busy), so that a bank
        read from disk arrives while the tensor before is fused. Each tensor is asked for once, and
        only if its bytes are not already in the page cache (`_cached`: a warm bank pays no thread
        and no system calls, which would slow a warm pass markedly; measured: docs/internals.md).
        A no-op where the system has no fadvise."""
        wanted = [k for group in groups for k in group if k not in self._prefetched]
        if not wanted or not hasattr(os, "posix_fadvise") or self.warm():
            return
        self._prefetched.update(wanted)
        wanted = [k for k in wanted if not self._cached(k)]
        if not wanted:
            return
        if self._ahead is None:  # a daemon thread: an export that stops does not wait for its read-ahead
            self._ahead = queue.SimpleQueue()
            threading.Thread(target=_read_ahead, args=(self.path, self._ahead), daemon=True,
                             name="soup-export-read-ahead").start()
            weakref.finalize(self, self._ahead.put, None)  # the map gone: the thread ends
        for k in wanted:
            for offset, length in self._read_order(k):
                self._ahead.put((offset, length))

    def warm(self) -> bool:
        """Whether the whole bank looks resident (asked once per map, at WARM_PROBES points spread
        over its data): a warm bank is read with no read-ahead and no per-tensor probes."""
        if self._warm is None:
            start, end = self.base, self.map.size
            step = max(1, (end - start) // WARM_PROBES)
            self._warm = self._resident(list(range(start, end, step)) + [end - 1] if end > start else [])
        return self._warm

    def _cached(self, key: str) -> bool:
        """Whether a tensor's bytes look resident: its first, middle and last byte."""
        start, end = (self.base + o for o in self.header[key]["data_offsets"])
        return end <= start or self._resident([start, (start + end) // 2, end - 1])

    def _resident(self, offsets: list[int]) -> bool:
        """Whether every one of these bytes is in the page cache: a one-byte read that must not wait
        for the disk (RWF_NOWAIT) at each. False where that cannot be asked."""
        if not hasattr(os, "RWF_NOWAIT"):
            return not offsets
        byte = bytearray(1)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for offset in offsets:
                os.preadv(fd, [byte], offset, os.RWF_NOWAIT)
            return True
        except OSError:  # EAGAIN: on disk; EOPNOTSUPP: the file system cannot say
            return False
        finally:
            os.close(fd)

    def _read_order(self, key: str) -> list[tuple[int, int]]:
        """(offset, length) pieces of a tensor's bytes in the order fusion reads them: an expert bank
        (n, ...) window by window of every expert (the kernel sums the experts' rows side by side),
        anything else front to back."""
        start, end = (self.base + o for o in self.header[key]["data_offsets"])
        shape = self.header[key]["shape"]
        if not key.startswith(EXPERTS_PREFIX) or len(shape) < 2 or shape[0] < 2:
            return [(start, end - start)]
        stride = (end - start) // shape[0]
        return [(start + j * stride + w, min(READ_AHEAD, stride - w))
                for w in range(0, stride, READ_AHEAD) for j in range(shape[0])]

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        if entry["dtype"] not in self._NUMPY:
            raise CheckpointError(f"{self.path}: tensor {key} is stored as {entry['dtype']}; export reads "
                                  f"{', '.join(self._NUMPY)} (write the checkpoint in fp32 or bf16)")
        start, end = (self.base + o for o in entry["data_offsets"])
        array = self.map[start:end].view(self._NUMPY[entry["dtype"]]).reshape(entry["shape"])
        with warnings.catch_warnings():  # "not writable": by design, see the class docstring
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor


WARM_PROBES = 64  # bytes probed over a whole bank to tell a warm one (a cold or partly cached one reads ahead)
READ_AHEAD = 4 << 20  # bytes asked for per fadvise call (per expert, in an expert bank's windows)


def _read_ahead(path: Path, ranges: queue.SimpleQueue) -> None:
    """posix_fadvise(WILLNEED) over each (offset, length) taken from `ranges`, READ_AHEAD bytes at a
    time, until None. Best effort: an error only loses the read-ahead."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        while (item := ranges.get()) is not None:
            offset, length = item
            for start in range(offset, offset + length, READ_AHEAD):
                os.posix_fadvise(fd, start, min(READ_AHEAD, offset + length - start), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def safetensors_header(path: Path) -> tuple[dict, int]:
    """({tensor name: {dtype, shape, data_offsets}}, offset of the data) of a safetensors file, read
    from its first bytes without mapping it (safetensors' own reader maps the whole file privately,
    which a bank larger than memory is refused). A file too short for its header, or whose tensors
    lie past its end, is a one-line CheckpointError."""
    def corrupt(detail: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: {detail}; the checkpoint is missing or corrupt (copy it again)")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            (n,) = struct.unpack("<Q", fh.read(8)) if size >= 8 else (-1,)
            if not 0 < n <= min(size - 8, 100 << 20):
                raise corrupt("no safetensors header")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise corrupt(exc.strerror or str(exc)) from None
    except (ValueError, UnicodeDecodeError):
        raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a mapping")
    header.pop("__metadata__", None)
    try:
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        valid = all(isinstance(e["shape"], list) and isinstance(e["dtype"], str) for e in header.values())
    except (KeyError, TypeError, ValueError, IndexError):
        raise corrupt("its header is malformed") from None
    if not valid or 8 + n + end > size:
        raise corrupt(f"it is truncated ({size} bytes, its header names {8 + n + end})")
    for key, e in header.items():
        width = DTYPE_BYTES.get(e["dtype"])
        if width is not None and e["data_offsets"][1] - e["data_offsets"][0] != width * math.prod(e["shape"]):
            raise corrupt(f"tensor {key}'s bytes do not match its shape {e['shape']} and dtype {e['dtype']}")
    return header, 8 + n


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
BANK_DTYPES = ("F32", "BF16", "F16")  # what export fuses (in fp32)
