"""The fast executor: one tensor-major pass from the bank to finished specialists (`build`, `batch`).

For every weight, in the graph's storage order: read the shared tensor and its experts once,
fuse them for every mix (fp32: `soup_math.combine` for each mix when HF weights are written;
otherwise, for int4 matrices, the compiled kernel of `native`, which fuses and quantizes in one
pass, and for the rest `combine_many`, one matrix product per block of columns for all mixes),
encode it (`encode`), and hand the arrays to writer threads that place them in each mix's
`model.onnx.data` at the offsets the graph names (and the fused tensor to its HF
`model.safetensors`, when asked). `model.onnx` is the same bytes for every mix. No intermediate
file is written and read back; peak memory is one bank tensor plus one fused tensor per mix (on
the kernel path, the int4 outputs of up to five tensors: one being fused, four waiting for the
writer), every norm's vector for every mix (fused before the pass and kept until written: a few KB
each), and each mix's two 1 MB write buffers (`datafile.CHUNK`: one staged, one being written). A
machine's first shipping-only int4 batch also times the kernel's two ways of reading the bank, on
128 MB of its own (`native.reads_in_place`). docs/internals.md explains each choice.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from soup_export import stopping
from soup_export.engine import native
from soup_export.engine.datafile import HashedDataFile, write_file
from soup_export.engine.encode import encode_mixes, encode_one, kernel_parts
from soup_export.graph import DecoderGraph, rotary_table, weight_order
from soup_export.layout import DATA_FILE, HF_DIR, HF_WEIGHTS, ONNX_DIR, SPEC_FILE
from soup_export.meter import section
from soup_train.model.soup_math import combine_many
from soup_train.stream import SafetensorsWriter, all_written


def run(source, job, outputs, settings, progress: bool = False):
    """The pass (see `engine.run_pass`). Returns, per output, the SHA-256 and bytes of the files
    whose hash is already known ({relative path: (sha256, bytes)}: the files written from memory,
    the same for every output but the spec, hashed once; each data file, hashed as it was
    written), and how the pass ran."""
    import torch

    from soup_export.engine import PassResult

    g = job.layout
    alphas = [o.alpha for o in outputs]
    kernel = settings.kernel and native.kernel() is not None
    small = job.onnx_files()
    files = [(m, HashedDataFile(o.onnx / DATA_FILE, settings.direct_io)) for m, o in enumerate(outputs)]
    hf_writers = []
    in_place = None
    if kernel and not job.write_hf and len(outputs) > 1 and any(
            native.quantizes(s.rep, tuple(source.shapes[s.weight])) for s in g.stored if s.weight in source.shapes):
        # measured now (once per machine) if never, not during the pass
        in_place = READS[settings.reads] if settings.reads != "auto" else native.reads_in_place(torch.get_num_threads())
    try:
        with all_written(hf_writers), _Writer(files, lanes=min(torch.get_num_threads(), MAX_LANES)) as writer:
            # every output's directories and small files, made by the writer's lanes while the first
            # tensors are fused (creating a customer's files takes milliseconds on some file systems:
            # docs/internals.md)
            writer.submit(_write_small_files, outputs, job.side_files, small, job.write_hf, job.link_shared,
                          settings.direct_io)
            specs = [(name, torch.float32, source.shapes[name]) for name in weight_order(g) if not name.startswith("@")]
            for o in outputs if job.write_hf else ():
                o.hf.mkdir(parents=True, exist_ok=True)
                hf_writers.append(SafetensorsWriter(o.hf / HF_WEIGHTS, specs, {"format": "pt"}))
            weights = fused_weights(source, g, alphas, exact=bool(hf_writers), progress=progress, kernel=kernel,
                                    in_place=in_place)
            _write_weights(weights, hf_writers, writer, kernel)
            writer.submit(_finish, g.data_size())
    finally:
        for _, fh in files:
            fh.close()
    hashed = {name: _digest(data) for name, data in small.items()}
    known = []
    for (_, fh), o in zip(files, outputs):
        table = {f"{ONNX_DIR}/{name}": h for name, h in hashed.items()}
        table.update({f"{HF_DIR}/{name}": hashed[name] for name in job.side_files} if job.write_hf else {})
        if o.spec is not None:
            table.update({f"{d}/{SPEC_FILE}": _digest(o.spec) for d in (ONNX_DIR, HF_DIR)})
        known.append({**table, **({f"{ONNX_DIR}/{DATA_FILE}": (fh.digest, g.data_size())} if fh.digest else {})})
    used = {**settings.to_dict(), "kernel": kernel, "reads": None if in_place is None else
            ("in-place" if in_place else "copy"), "writes": "direct" if any(fh.direct for _, fh in files) else "buffered"}
    return PassResult(known, used)


READS = native.READS  # EngineSettings.reads -> in place (True) or through copies


def _write_small_files(lane, outputs, side_files, small, write_hf, link_shared: bool, direct: bool) -> None:
    """A lane's outputs' directories and the files written from memory: the HF side files and
    spec (in `hf/` too when HF weights are written), `model.onnx`, the runtime configs (the large
    ones, tokenizer.json and model.onnx, with direct I/O, as the data files). With `link_shared`,
    the files that are the same bytes for every output are written once per lane and hard-linked
    into its other outputs' directories (see `_link`)."""
    with section("other files"):
        written: dict[str, Path] = {}  # name -> the lane's copy of that file (side files are alike in hf/ and onnx/)
        for m, _ in lane:
            subs = {outputs[m].onnx: small, **({outputs[m].hf: side_files} if write_hf else {})}
            for sub, files in subs.items():
                sub.mkdir(parents=True, exist_ok=True)
                if outputs[m].spec is not None:
                    write_file(sub / SPEC_FILE, outputs[m].spec, direct)
                for name, data in files.items():
                    path = sub / name
                    if not link_shared or name not in written or not _link(written[name], path):
                        write_file(path, data, direct)
                        written.setdefault(name, path)


def _link(existing: Path, path: Path) -> bool:
    """Whether `path` could be made a hard link to `existing` (a file with the same bytes): one copy
    on disk for every customer of a batch, and no inode to allocate (slow on ext4 after many
    deletions: docs/internals.md). False where the file system has no hard links (or refuses
    more): the caller writes the file instead."""
    try:
        os.link(existing, path)
        return True
    except OSError:
        return False


def _finish(lane, size: int) -> None:
    for _, fh in lane:
        fh.finish(size)


def _digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


class Weight(NamedTuple):
    """One stored weight of the bank pass, fused for every mix."""

    name: str
    parts: list  # its stored parts with their offsets in the data file
    encoded: Callable | None  # encoded(m, stored part) -> mix m's arrays; None: `fused` is to be encoded
    fused: object  # the (mixes, *shape) fp32 fusion (a torch tensor), or None (kernel outputs, rotary tables)
    fresh: bool  # whether `fused` stays valid after the next weight (False: it lives in the reused workspace)


def fused_weights(source, g: DecoderGraph, alphas, exact: bool, progress: bool = False, kernel: bool = True,
                  in_place: bool | None = None, mapped=None) -> Iterator[Weight]:
    """The bank pass of an export: every stored weight in the graph's storage order. With `exact`
    every mix is fused by `combine` itself; otherwise (and with `kernel`) int4 matrices go through
    the compiled kernel where it applies, reading the bank in place or through copies as `in_place`
    says (None: as measured). A torch fusion lives in a reused workspace, valid until the next
    weight, but the small vectors (fewer than SMALL values per mix: the norms'), which the kernel
    never takes, are all fused first, before any large tensor, and kept until their turn (see
    `_small_fusions`); other small fusions are copied out of the workspace. `mapped`: a map of the
    bank to read through (default: a new one)."""
    import torch

    by_weight: dict[str, list] = {}
    for s, offset in zip(g.stored, g.offsets()):
        by_weight.setdefault(s.weight, []).append((s, offset))
    workspace, coefs = source.workspace(len(alphas)), torch.stack(alphas).numpy() if alphas else None
    mapped = source.map() if mapped is None else mapped  # one map (and one parse of its header) for both
    early = _small_fusions(source, mapped, by_weight, alphas, workspace, exact)
    tensors = source.tensors([n for n in weight_order(g) if n not in early and not n.startswith("@")], progress, mapped)
    for name, parts in by_weight.items():
        if name.startswith("@rotary."):  # architecture-derived tables: the same bytes for every mix
            yield Weight(name, parts, functools.partial(_every_mix, rotary_table(g.arch, name.split(".")[1])), None, True)
            continue
        if name in early:
            yield Weight(name, parts, None, early[name], True)
            continue
        dense, shared, experts = next(tensors)
        assert dense == name, (dense, name)
        if kernel and not exact and all(native.applies(s.rep, tuple(shared.shape), experts) for s, _ in parts):
            # every mix fused and quantized in one compiled pass: no fp32 fused tensor at all
            q, scales = _kernel_fusion(shared, experts[0], coefs, in_place)
            yield Weight(name, parts, functools.partial(kernel_parts, q, scales), None, True)
            continue
        small = shared.numel() < SMALL
        with _one_torch_thread(small):
            fused = combine_many(shared, experts, alphas, workspace=workspace, exact=exact)  # (mixes, *shape)
        if small:
            fused = fused.clone()
        yield Weight(name, parts, None, fused, small)


def _kernel_fusion(shared, bank, coefs: np.ndarray, in_place: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """`native.fuse_quantize` of one matrix for every mix. The kernel reads fp32 and bf16 banks as
    they are mapped (bf16 widened as it is read: half the bytes from disk); an fp16 bank goes
    through in blocks of rows, each converted into one reused fp32 buffer (quantization blocks lie
    along a row, so the bytes are those of the whole matrix converted at once, without holding it)."""
    import torch

    threads = torch.get_num_threads()
    if bank.dtype in (torch.float32, torch.bfloat16):
        words = bank.numpy() if bank.dtype == torch.float32 else bank.view(torch.int16).numpy().view(np.uint16)
        return native.fuse_quantize(shared.numpy(), words, coefs, threads, in_place=in_place)
    n, rows, cols = bank.shape
    step = max(1, min(rows, UPCAST_ROWS_VALUES // max(1, n * cols)))
    staging = torch.empty(n * step * cols)
    q = scales = None
    for r in range(0, rows, step):
        k = min(step, rows - r)
        block = staging[:n * k * cols].view(n, k, cols)
        block.copy_(bank[:, r:r + k])
        q_r, s_r = native.fuse_quantize(shared[r:r + k].numpy(), block.numpy(), coefs, threads, in_place=in_place)
        if q is None:  # the outputs once, filled block by block (no per-block pieces to fragment the heap)
            q = np.empty((q_r.shape[0], rows, *q_r.shape[2:]), q_r.dtype)
            scales = np.empty((s_r.shape[0], rows, *s_r.shape[2:]), s_r.dtype)
        q[:, r:r + k], scales[:, r:r + k] = q_r, s_r
    return q, scales


UPCAST_ROWS_VALUES = 1 << 23  # fp16 bank values converted at a time for the kernel (32 MB in fp32)


def _small_fusions(source, mapped, by_weight: dict, alphas, workspace, exact: bool) -> dict:
    """{name: (mixes, size) fused copy} of the small vectors (the norms'; no kernel takes them),
    fused one after another on one torch thread before the pass (kept until their turn: a few KB
    per mix; small matrices are fused in their turn, as they could be the whole model). Fused between two
    kernel calls, each would find the bank's pages and the caches cold after a matrix's pass;
    fused together, they cost little (measured: docs/internals.md). The same `combine_many`
    calls, so the same bytes."""
    names = [name for name in by_weight if not name.startswith("@") and len(source.shapes[name]) == 1
             and math.prod(source.shapes[name]) < SMALL]
    if not names:
        return {}
    with _one_torch_thread(True):
        return {name: combine_many(shared, experts, alphas, workspace=workspace, exact=exact).clone()
                for name, shared, experts in source.tensors(names, mapped=mapped)}


# values per mix: a torch fusion of fewer (the norms; on small models, whole matrices) runs on one
# thread and is copied out of the workspace. A shipping-only batch's fusion by matrix product may
# round its last bits differently on one thread than on several: the same bytes every time still.
SMALL = 1 << 16


@contextlib.contextmanager
def _one_torch_thread(small: bool):
    """Torch on one thread for a small fusion (the norms' vectors). A parallel region's OpenMP
    workers spin for milliseconds after it ends, on the cores that the kernel's threads need next
    (measured: docs/internals.md)."""
    import torch

    before = torch.get_num_threads()
    if not small or before == 1:
        yield
        return
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(before)


def _write_weights(weights: Iterator[Weight], hf_writers, writer: "_Writer", kernel: bool) -> None:
    """Every stored tensor in the graph's storage order, so each data file is written front to back
    (and hashed on the way) by the writer's threads while the next tensor is fused. Everything is
    encoded here, before a writer sees it: the kernel's outputs and the rotary tables arrive
    encoded; a torch fusion is encoded mix by mix (block quantizations for every mix at once) and
    each mix's arrays go to its writer as soon as they are made, with at most PENDING_BYTES of them
    waiting (an encoded copy of every mix at once would double a batch's memory). Encoded arrays
    never point into the reused workspace (raw ones are copied out of it), so the next fusion never
    waits for a writer. HF weights are written here, in order. With HF weights (parity, or no
    --no-hf), every mix is fused by `combine` itself: bit-identical to its single build, so parity
    (a) compares the very weights a single build would ship (other orders of summation can move
    the logits past parity (a)'s 1e-5 bound: docs/internals.md)."""
    for w in weights:
        stopping.check()
        for hf, tensor in zip(hf_writers, w.fused if hf_writers and w.fused is not None else ()):  # (iter() of a tensor unbinds it)
            hf.write(w.name, tensor)
        if w.encoded is not None:
            writer.submit(_write_parts, w.parts, w.encoded)
            continue
        if w.fresh:  # small (the norms): every mix's arrays in one task per lane, as a whole weight
            encoded = dict(_encoded_mixes(w.fused, w.parts, kernel, copy_raw=False))
            writer.submit(_write_parts, w.parts, functools.partial(_lookup_mix, encoded))
            continue
        writer.start_weight()
        for m, arrays in _encoded_mixes(w.fused, w.parts, kernel, copy_raw=not w.fresh):
            writer.submit_mix(m, _write_parts, w.parts, functools.partial(_lookup, arrays),
                              nbytes=sum(a.nbytes for enc in arrays.values() for a in enc.values()))


def _encoded_mixes(fused, parts, kernel: bool, copy_raw: bool) -> Iterator[tuple[int, dict]]:
    """(m, {(how, rep): mix m's arrays}) of a torch fusion (mixes, *shape), one mix at a time; block
    quantizations are made for every mix at once (a fraction of the fused bytes). With `copy_raw`,
    raw arrays are copied out of the fusion (it lives in the reused workspace)."""
    kinds = {(s.how, s.rep): s for s, _ in parts}
    batched = {k: encode_mixes(fused.numpy(), s, kernel) for k, s in kinds.items()
               if s.how.startswith("nbits") and fused.dim() == 3}
    for m in range(fused.shape[0]):
        arrays = {}
        for k, s in kinds.items():
            enc = batched[k][m] if k in batched else encode_one(fused[m].numpy(), s)
            arrays[k] = {p: a.copy() for p, a in enc.items()} if copy_raw and s.how == "raw" else enc
        yield m, arrays


def _lookup(arrays: dict, m: int, s) -> dict[str, np.ndarray]:
    return arrays[(s.how, s.rep)]


def _lookup_mix(encoded: dict, m: int, s) -> dict[str, np.ndarray]:
    return encoded[m][(s.how, s.rep)]


def _every_mix(table: np.ndarray, m: int, s) -> dict[str, np.ndarray]:
    return {s.part: table}


def _write_parts(files, parts, encoded) -> None:
    """Mix m's stored arrays of one weight (`encoded(m, stored)`) into its data file, at their
    offsets, for each (m, data file) of `files`."""
    for m, fh in files:
        for s, offset in parts:
            arr = encoded(m, s)[s.part]
            assert arr.shape == s.shape and arr.dtype == s.dtype, s.name
            fh.write_at(offset, arr)


PENDING = 4  # weights submitted and not yet written, at most: memory holds up to PENDING + 1 tensors' outputs
PENDING_BYTES = 256 << 20  # a torch fusion's encoded mixes waiting for their writers, at most (one mix beyond)
MAX_LANES = 8  # writer threads, at most (one per core the export's threads use, and no more than the customers)


class _Writer:
    """Background threads that write the submitted weights in order, each to its own share of the
    customers' data files (so each file is still written front to back), with at most PENDING
    weights waiting or being written: the main thread goes on fusing while the writers catch up.
    Two lanes on two cores halve the writing and hashing that is left when the fusion is done
    (the last tensors of a batch, 16 customers' worth). `submit(fn, *args)` runs fn(lane's
    [(m, data file)], *args) in every lane; `submit_mix(m, fn, *args, nbytes=)` runs fn([(m, data
    file)], *args) in mix m's lane, for the weight begun by `start_weight`. A failed write raises
    in the submitting thread, at the next `submit`, `submit_mix` or `wait`."""

    def __init__(self, files: list, lanes: int) -> None:
        k = max(1, min(lanes, len(files)))
        self.files, self.k = files, k
        self.lanes = [files[i::k] for i in range(k)]
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix=f"soup-export-writer-{i}") for i in range(k)]
        self.pending = deque()  # per weight: its [(future, bytes it holds)]

    def submit(self, fn, *args) -> None:
        self.wait(left=PENDING - 1)
        self.pending.append([(pool.submit(fn, lane, *args), 0) for pool, lane in zip(self.pools, self.lanes)])

    def start_weight(self) -> None:
        self.wait(left=PENDING - 1)
        self.pending.append([])

    def submit_mix(self, m: int, fn, *args, nbytes: int = 0) -> None:
        while sum(b for weight in self.pending for _, b in weight) + nbytes > PENDING_BYTES and self._oldest():
            pass
        self.pending[-1].append((self.pools[m % self.k].submit(fn, [self.files[m]], *args), nbytes))

    def _oldest(self) -> bool:
        """Wait for the oldest pending write; False if there is none."""
        while self.pending and not self.pending[0]:
            if len(self.pending) == 1:
                return False
            self.pending.popleft()
        if not self.pending:
            return False
        future, _ = self.pending[0].pop(0)
        future.result()
        return True

    def wait(self, left: int = 0) -> None:
        while len(self.pending) > left:
            for future, _ in self.pending.popleft():
                future.result()
    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            for pool in self.pools:  # every lane told to stop first, then joined
                pool.shutdown(wait=False, cancel_futures=True)
            for pool in self.pools:
                pool.shutdown(wait=True)
