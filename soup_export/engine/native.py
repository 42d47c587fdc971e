"""Export's compiled int4 kernels (`native_q4.c`): quantize fused values, or fuse the mixes of an
export and quantize them in one pass.

The kernels are compiled on first use with the system C compiler (`$CC`, default `cc`) for this CPU
(`-march=native`) into the user cache (`$XDG_CACHE_HOME/soup/native`, keyed by the source, the
flags, the compiler and the target it resolves for this CPU, so a home directory shared by other
machines never loads a library built for another CPU), and loaded with ctypes. They use GCC's
vector extensions (GCC 9 or later): another compiler fails to build them, which is warned about
once and remembered in the cache. Without a compiler, or with `SOUP_NATIVE=0`, `kernel()` is None
and export uses the torch path (`combine_many` + `quantize_nbits`), which is also the reference
the tests hold the kernels to. Asking for the kernel costs a process about 20 ms (the compiler
names its target), once.

Both apply to 4-bit, block-32, symmetric storage of matrices whose rows are whole blocks (the
int4 tier and the mixed tier's body, the defaults); asymmetric storage and other widths use torch.
- `quantize` (the same quantization of already fused values) encodes the exports that write HF
  weights (parity on, the default, or no `--no-hf`): those are fused by `combine`, bit-identical to
  the soup's forward, and quantized bit for bit as `quantize_nbits` would.
- `fuse_quantize` fuses too, for the exports that write no HF weights (`--no-parity --no-hf`),
  single builds and batches alike: a batch's customers share each read of the bank, and one
  customer's sums run over four experts at a time, in runs of the bank. A mix's int4 bytes are the
  same in a single build and in any batch; they equal `combine`'s to fp32 rounding.

The source is written once for the CPU's vector width (AVX-512, AVX2, or 4-wide SSE/NEON) and
register count: a batch's tile of mixes keeps its sums in registers (8 mixes x 32 columns with
AVX-512, 6 x 16 with AVX2). A tile larger than the register file spills every sum to the stack
on every expert, which makes a pass an order of magnitude slower (measured: docs/internals.md).

A batch's tiles read the bank either where it is mapped or from a copy of each chunk: the same
bytes, but which is faster depends on the processor's prefetchers, not on its instruction set
(two AVX-512 machines measured opposite winners: docs/internals.md). So `reads_in_place()`
measures both once per machine, before the first batch's pass, and keeps the answer beside the
library (an export's settings can decide instead: SOUP_NATIVE_READS).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from soup_export.cache import cached_json, user_cache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_q4.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-tree-loop-distribute-patterns", "-fPIC", "-shared",
         "-pthread")  # every sum one FMA chain; no memset calls in the tiles
BLOCK, BITS = 32, 4


def kernel():
    """The loaded library (`fuse_q4`, `quantize_q4`), or None (no compiler, or a failed build).
    Whether an export uses it is its settings' choice (`EngineSettings.kernel`)."""
    return _load()


@functools.lru_cache(maxsize=1)
def _load():
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        log.info("no C compiler: int4 export uses the torch path")
        return None
    lib_path = _library_path(cc)
    failed = lib_path.with_suffix(".failed")
    if failed.is_file():  # this compiler could not build this source before: do not retry on every export
        log.info("the native int4 kernel does not build with %s (see %s); int4 export uses the torch path", cc, failed)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc, lib_path)))
        lib.soup_path = lib_path
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()[-3:]
        message = f"{exc}{': ' + ' '.join(detail) if detail else ''}"
        log.warning("the native int4 kernel could not be built with %s (%s); int4 export uses the torch path "
                    "(the same int4 format; the kernel needs GCC 9 or later)", cc, message)
        try:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(message + "\n")
        except OSError:
            pass
        return None
    ptr, long = ctypes.c_void_p, ctypes.c_long
    lib.fuse_q4.argtypes = [ptr, ptr, long, long, long, ptr, long, long, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.quantize_q4.argtypes = [ptr, long, long, long, ptr, ptr]
    lib.tile_width.argtypes = lib.chunk_size.argtypes = []
    for fn in (lib.fuse_q4, lib.quantize_q4, lib.tile_width):
        fn.restype = ctypes.c_int
    lib.chunk_size.restype = long
    return lib


def _target(cc: str) -> str:
    """What -march=native compiles for: the compiler's resolved target options (GCC), else the
    first processor's whole /proc/cpuinfo entry (model, features, on x86 and ARM alike)."""
    try:
        out = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _library_path(cc: str) -> Path:
    """Where the shared library for this source, compiler and CPU lives in the cache."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, cc, _target(cc)]).encode()).hexdigest()
    return user_cache("native") / f"native_q4-{key[:24]}.so"


def _build(cc: str, lib: Path | None = None) -> Path:
    """The kernel's shared library: from the cache, or compiled (raises with the compiler's error)."""
    lib = lib or _library_path(cc)
    if not lib.is_file():
        root = lib.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True, timeout=300)
            tmp.replace(lib)  # atomic: a concurrent export sees no half-written library
        finally:
            tmp.unlink(missing_ok=True)
    return lib


def tile_width() -> int:
    """The most mixes the built kernel fuses together (8 with AVX-512, 6 with AVX2); a batch's
    last mixes take one tile of their own width."""
    return int(kernel().tile_width())


def chunk_size() -> int:
    """The bank floats one kernel thread copies per chunk of a batch (a quarter of its L2 cache,
    at most 2^17): a chunk is whole rows of every expert."""
    return int(kernel().chunk_size())


def applies(rep, shape: tuple[int, ...], experts: tuple) -> bool:
    """Whether `fuse_quantize` can encode this weight: 4-bit block-32 symmetric storage of a matrix
    whose rows are whole blocks, full (not low-rank) experts, and a built kernel."""
    return quantizes(rep, shape) and len(experts) == 1 and experts[0].shape[0] > 0


def quantizes(rep, shape: tuple[int, ...]) -> bool:
    """Whether `quantize` can encode a matrix of this shape in this storage (and the kernel is built)."""
    return (rep.kind == "nbits" and rep.bits == BITS and rep.block == BLOCK and rep.symmetric and len(shape) == 2
            and shape[1] % BLOCK == 0 and kernel() is not None)


READS = {"in-place": True, "copy": False}


def reads_in_place(threads: int) -> bool:
    """Whether a batch's tiles, on `threads` threads, read the bank where it is mapped (True) rather
    than a copy of each chunk, as `calibrate_reads` measured on this machine with as many threads
    (once, kept in the user cache beside the built library; an unwritable cache is measured again
    once per process). Both give the same bytes."""
    return kernel() is not None and _measured_reads(threads)["in_place"]


# the calibration's matrix: a bank of 128 MB, past the caches as an export's bank is (a smaller
# bank narrows the margin: docs/internals.md), and a batch of 16
CALIBRATION = {"experts": 32, "rows": 1024, "cols": 1024, "mixes": 16, "rounds": 5}


@functools.lru_cache(maxsize=None)
def _measured_reads(threads: int) -> dict:
    path = Path(kernel().soup_path)
    key = {"library": path.name, "threads": threads, **CALIBRATION}
    return cached_json(path.with_name(f"{path.stem}.reads.json"), key, lambda: calibrate_reads(threads),
                       lambda v: isinstance(v, dict) and isinstance(v.get("in_place"), bool))


def calibrate_reads(threads: int, experts: int = CALIBRATION["experts"], rows: int = CALIBRATION["rows"],
                    cols: int = CALIBRATION["cols"], mixes: int = CALIBRATION["mixes"],
                    rounds: int = CALIBRATION["rounds"]) -> dict:
    """Time a batch's fusion both ways on a synthetic bank, alternately `rounds` times (the first
    round a warm-up): {"in_place": whether in place was faster by the medians, "ms": both medians}.
    About 0.3 s (and 128 MB), once per machine and thread count."""
    bank = np.full((experts, rows, cols), 0.5, np.float32)
    shared, alphas = np.zeros((rows, cols), np.float32), np.full((mixes, experts), 1 / experts, np.float32)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for in_place in times:
            start = time.perf_counter()
            fuse_quantize(shared, bank, alphas, threads, in_place=in_place)
            times[in_place].append(time.perf_counter() - start)
    ms = {mode: 1e3 * statistics.median(times[READS[mode]][1:] or times[READS[mode]]) for mode in READS}
    return {"in_place": ms["in-place"] < ms["copy"], "ms": ms}


def fuse_quantize(shared: np.ndarray, bank: np.ndarray, alphas: np.ndarray, threads: int,
                  in_place: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every mix's int4 storage of S + sum_j alphas[m, j] bank[j]: q (mixes, rows, cols / 32, 16)
    and scales (mixes, rows, cols / 32). shared (rows, cols), bank (n, rows, cols) fp32, or uint16
    holding bf16 words (widened as they are read: the bytes of the same values stored in fp32),
    alphas (mixes, n). `in_place`: how a batch's tiles read an fp32 bank (None:
    `reads_in_place(threads)`, asked only for a batch); a bf16 bank is always widened into copies."""
    lib = kernel()
    rows, cols = shared.shape
    bf16 = bank.dtype == np.uint16
    shared, bank = np.ascontiguousarray(shared, np.float32), np.ascontiguousarray(bank, np.uint16 if bf16 else np.float32)
    alphas = np.ascontiguousarray(alphas, np.float32)
    mixes, n = alphas.shape
    assert bank.shape == (n, rows, cols) and cols % BLOCK == 0, (bank.shape, shared.shape, alphas.shape)
    q, scales = _outputs(mixes, rows, cols)
    place = False if bf16 else bool(reads_in_place(threads) if in_place is None and mixes > 1 else in_place)
    _check(lib.fuse_q4(shared.ctypes.data, bank.ctypes.data, n, rows, cols, alphas.ctypes.data, mixes, threads,
                       q.ctypes.data, scales.ctypes.data, int(place), int(bf16)))
    return q, scales


def quantize(w: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_nbits(w, int4 block 32 symmetric) of a fused (rows, cols) matrix, bit for bit:
    q (rows, cols / 32, 16) and scales (rows, cols / 32)."""
    lib = kernel()
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    q, scales = _outputs(1, rows, cols)
    _check(lib.quantize_q4(w.ctypes.data, rows, cols, threads, q.ctypes.data, scales.ctypes.data))
    return q[0], scales[0]


def _outputs(mixes: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.empty((mixes, rows, cols // BLOCK, BLOCK * BITS // 8), np.uint8),
            np.empty((mixes, rows, cols // BLOCK), np.float32))


def _check(code: int) -> None:
    if code:
        raise RuntimeError(f"native int4 kernel failed with code {code}")
