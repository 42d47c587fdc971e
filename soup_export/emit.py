"""One tensor-major pass from the bank to finished specialists (the path of `build` and `batch`).

For every weight, in the graph's storage order: read the shared tensor and its experts once,
fuse them for every mix (fp32: `soup_math.combine` for each mix when HF weights are written;
otherwise, for int4 matrices, the compiled kernel of `native`, which fuses and quantizes in one
pass, and for the rest `combine_many`, one matrix product per block of columns for all mixes), and
write the fused tensor to its HF `model.safetensors` (when asked) and its encoded form (the tier's storage) to its
`model.onnx.data` at the offset the graph already names. `model.onnx` is the same bytes for every
mix. No intermediate file is written and read back; peak memory is one bank tensor plus one
fused tensor per mix (on the kernel path, the int4 outputs of up to five tensors: one being
fused, four waiting for the writer), every norm's vector for every mix (fused before the pass and
kept until written: a few KB each), and each mix's two 1 MB write buffers (`datafile.CHUNK`: one
staged, one being written). A machine's first shipping-only int4 batch also times the kernel's
two ways of reading the bank, on 128 MB of its own (`native.reads_in_place`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from soup_export import native, stopping
from soup_export.datafile import HashedDataFile, write_file
from soup_export.graph import DATA_FILE, DecoderGraph, _encode_one, rotary_table
from soup_export.mix import Mix
from soup_export.onnx_dir import MODEL_FILE, runtime_configs
from soup_export.resolve import SPEC_FILE, Bank, hf_side_files, spec_bytes
from soup_train.stream import SafetensorsWriter
from soup_train.model.soup_math import combine_many


def weight_order(g: DecoderGraph) -> list[str]:
    """Dense weights in the order the graph stores them (each once)."""
    seen: dict[str, None] = {}
    for s in g.stored:
        if not s.weight.startswith("@"):
            seen.setdefault(s.weight, None)
    return list(seen)


def emit(bank: Bank, mixes: list[Mix], roots: list[Path], g: DecoderGraph, model_bytes: bytes,
         write_hf_weights: bool, progress: bool = False, link_shared: bool = False) -> list[dict[str, tuple[str, int]]]:
    """Write `root/onnx` for every mix, and `root/hf` (a complete HF directory) if `write_hf_weights`.
    The roots are staged directories (renamed into place once the whole export succeeded), so every
    file is written under its final name. With `link_shared`, the files that are the same bytes for
    every customer are written once per writer lane and hard-linked into its other customers'
    directories (and hf/ to onnx/).
    Returns, per root, the SHA-256 and bytes of the files whose hash is already known
    ({relative path: (sha256, bytes)}: the files written from memory, the same for every customer
    but the spec, hashed once; each data file, hashed as it was written)."""
    import torch

    if not mixes:
        return []
    order = weight_order(g)
    missing = sorted(set(bank.shapes) - set(order))
    assert not missing, f"the graph does not use {missing}"
    alphas = [bank.alpha(m.h) for m in mixes]
    common = hf_side_files(bank.info.run.model, bank.path / "tokenizer.json", "float32")  # the same for every customer
    configs = runtime_configs(g, json.loads(common["generation_config.json"]))
    spec_files = [spec_bytes(bank, mix, alpha, "float32") for mix, alpha in zip(mixes, alphas)]
    files = [(m, HashedDataFile(root / "onnx" / DATA_FILE)) for m, root in enumerate(roots)]  # staged: final names
    hf_writers = []
    if not write_hf_weights and len(mixes) > 1 and any(native.quantizes(s.rep, tuple(bank.shapes[s.weight]))
                                                       for s in g.stored if s.weight in bank.shapes):
        native.reads_in_place(torch.get_num_threads())  # measured now (once per machine) if never, not during the pass
    try:
        with _Writer(files, lanes=min(torch.get_num_threads(), MAX_LANES)) as writer:
            # every customer's directories and small files, made by the writer's lanes while the first
            # tensors are fused (on this machine's disk, creating files took 1-3 ms per customer)
            writer.submit(_write_small_files, roots, common, configs, spec_files, model_bytes, write_hf_weights,
                          link_shared)
            specs = [(name, torch.float32, bank.shapes[name]) for name in order]
            for root in roots if write_hf_weights else ():
                (root / "hf").mkdir(parents=True, exist_ok=True)
                hf_writers.append(SafetensorsWriter(root / "hf" / "model.safetensors", specs, {"format": "pt"}))
            _write_weights(bank, g, alphas, hf_writers, writer, files, progress)
            writer.submit(_finish, g.data_size())
        for w in hf_writers:
            w.close()
    except BaseException:
        for w in hf_writers:
            w.abort()
        raise
    finally:
        for _, fh in files:
            fh.close()
    hashed = {name: _digest(data) for name, data in {**common, **configs, MODEL_FILE: model_bytes}.items()}
    known = []
    for (_, fh), spec in zip(files, spec_files):
        table = {f"onnx/{name}": h for name, h in hashed.items()}
        table.update({f"hf/{name}": hashed[name] for name in common} if write_hf_weights else {})
        table.update({f"{d}/{SPEC_FILE}": _digest(spec) for d in ("onnx", "hf")})
        known.append({**table, **({f"onnx/{DATA_FILE}": (fh.digest, g.data_size())} if fh.digest else {})})
    return known


def _write_small_files(lane, roots, common, configs, spec_files, model_bytes, write_hf_weights,
                       link_shared: bool = False) -> None:
    """A lane's customers' directories and the files written from memory: the HF side files and
    spec (in `hf/` too when HF weights are written), `model.onnx`, the runtime configs (the large
    ones, tokenizer.json and model.onnx, with direct I/O, as the data files). With `link_shared`,
    the files that are the same bytes for every customer are written once per lane and hard-linked
    into its other customers' directories (see `_link`)."""
    shared = {**common, MODEL_FILE: model_bytes, **configs}
    written: dict[str, Path] = {}  # name -> the lane's copy of that file (common's are alike in hf/ and onnx/)
    for m, _ in lane:
        subs = {"onnx": shared, **({"hf": common} if write_hf_weights else {})}
        for sub, files in subs.items():
            (roots[m] / sub).mkdir(parents=True, exist_ok=True)
            write_file(roots[m] / sub / SPEC_FILE, spec_files[m])
            for name, data in files.items():
                path = roots[m] / sub / name
                if not link_shared or name not in written or not _link(written[name], path):
                    write_file(path, data)
                    written.setdefault(name, path)


def _link(existing: Path, path: Path) -> bool:
    """Whether `path` could be made a hard link to `existing` (a file with the same bytes): one copy
    on disk for every customer of a batch, and no inode to allocate (on ext4, after many deletions,
    creating a file took 0.2-0.4 ms). False where the file system has no hard links (or refuses
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


def encode_mixes(fused: np.ndarray, s) -> list[dict[str, np.ndarray]]:
    """Each mix's block-quantized (nbits) form of one matrix, fused (mixes, rows, cols). Block
    quantization treats rows independently, so it runs once over every mix's rows (fewer,
    cache-sized steps) and is split per mix."""
    assert s.how.startswith("nbits") and fused.ndim == 3, (s.how, fused.shape)
    mixes, rows, cols = fused.shape
    if native.quantizes(s.rep, (rows, cols)):  # the compiled quantization: the same bytes, faster
        # one thread: between two of torch's matrix products, its OpenMP workers still spin on the
        # other core (two threads took a single build from 0.20 to 0.29 s; one, to 0.18-0.19 s)
        q, scales = native.quantize(fused.reshape(mixes * rows, cols), 1)
        q, scales = q.reshape(mixes, rows, *q.shape[1:]), scales.reshape(mixes, rows, -1)
        return [_native_parts(q, scales, m, s) for m in range(mixes)]
    enc = _encode_one(fused.reshape(mixes * rows, cols), s)
    return [{k: v[m * rows:(m + 1) * rows] for k, v in enc.items()} for m in range(mixes)]


def _native_parts(q: np.ndarray, scales: np.ndarray, m: int, s) -> dict[str, np.ndarray]:
    """Mix m's stored arrays from the native kernel's (mixes, rows, blocks, 16) bytes and scales."""
    return {"q": q[m].reshape(q.shape[1], -1) if s.how == "nbits-gather" else q[m], "scales": scales[m]}


class _TorchEncoder:
    """Mix m's stored arrays of one fused tensor (mixes, *shape). Block quantizations are made for
    every mix at once (small: a fraction of the fused bytes); other encodings one mix at a time, as
    each thread asks for its mixes in order (an fp32 copy of every mix would double a batch's
    memory). The writer's lanes call it at the same time."""

    def __init__(self, fused) -> None:
        self.fused, self.batched = fused, {}
        self.lock, self.local = threading.Lock(), threading.local()  # local: the calling thread's last mix

    def __call__(self, m: int, s) -> dict[str, np.ndarray]:
        key = (s.how, s.rep)
        if s.how.startswith("nbits") and self.fused.dim() == 3:
            with self.lock:
                if key not in self.batched:
                    self.batched[key] = encode_mixes(self.fused.numpy(), s)
            return self.batched[key][m]
        local = self.local
        if getattr(local, "mix", None) != m:
            local.single, local.mix = {}, m
        if key not in local.single:
            local.single[key] = _encode_one(self.fused[m].numpy(), s)
        return local.single[key]


class Weight(NamedTuple):
    """One stored weight of the bank pass, fused for every mix."""

    name: str
    parts: list  # its stored parts with their offsets in the data file
    encoded: Callable  # encoded(m, stored part) -> mix m's arrays
    fused: object  # the (mixes, *shape) fp32 fusion (a torch tensor), or None (kernel outputs, rotary tables)
    fresh: bool  # whether `encoded` stays valid after the next weight (False: it reads the reused workspace)


def fused_weights(bank, g: DecoderGraph, alphas, exact: bool, progress: bool = False) -> Iterator[Weight]:
    """The bank pass of an export: every stored weight in the graph's storage order. With `exact`
    every mix is fused by `combine` itself; otherwise int4 matrices go through the compiled kernel
    where it applies. A torch fusion lives in a reused workspace, valid until the next weight, but
    the small vectors (fewer than SMALL values per mix: the norms'), which the kernel never takes,
    are all fused first, before any large tensor, and kept until their turn (see `_small_fusions`);
    other small fusions are copied out of the workspace."""
    import torch

    by_weight: dict[str, list] = {}
    for s, offset in zip(g.stored, g.offsets()):
        by_weight.setdefault(s.weight, []).append((s, offset))
    workspace, coefs = bank.workspace(len(alphas)), torch.stack(alphas).numpy()
    mapped = bank.map()  # one map (and one parse of its header) for both
    early = _small_fusions(bank, mapped, by_weight, alphas, workspace, exact)
    tensors = bank.tensors([n for n in weight_order(g) if n not in early], progress, mapped)
    for name, parts in by_weight.items():
        if name.startswith("@rotary."):  # architecture-derived tables: the same bytes for every mix
            yield Weight(name, parts, functools.partial(_every_mix, rotary_table(g.arch, name.split(".")[1])), None, True)
            continue
        if name in early:
            yield Weight(name, parts, _TorchEncoder(early[name]), early[name], True)
            continue
        dense, shared, experts = next(tensors)
        assert dense == name, (dense, name)
        if not exact and all(native.applies(s.rep, tuple(shared.shape), experts) for s, _ in parts):
            # every mix fused and quantized in one compiled pass: no fp32 fused tensor at all
            q, scales = _kernel_fusion(shared, experts[0], coefs)
            yield Weight(name, parts, functools.partial(_native_parts, q, scales), None, True)
            continue
        small = shared.numel() < SMALL
        with _one_torch_thread(small):
            fused = combine_many(shared, experts, alphas, workspace=workspace, exact=exact)  # (mixes, *shape)
        if small:
            fused = fused.clone()
        yield Weight(name, parts, _TorchEncoder(fused), fused, small)


def _kernel_fusion(shared, bank, coefs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`native.fuse_quantize` of one matrix for every mix. The kernel reads fp32 and bf16 banks as
    they are mapped (bf16 widened as it is read: half the bytes from disk); an fp16 bank goes
    through in blocks of rows, each converted into one reused fp32 buffer (quantization blocks lie
    along a row, so the bytes are those of the whole matrix converted at once, without holding it)."""
    import torch

    threads = torch.get_num_threads()
    if bank.dtype in (torch.float32, torch.bfloat16):
        words = bank.numpy() if bank.dtype == torch.float32 else bank.view(torch.int16).numpy().view(np.uint16)
        return native.fuse_quantize(shared.numpy(), words, coefs, threads)
    n, rows, cols = bank.shape
    step = max(1, min(rows, UPCAST_ROWS_VALUES // max(1, n * cols)))
    staging = torch.empty(n * step * cols)
    q = scales = None
    for r in range(0, rows, step):
        k = min(step, rows - r)
        block = staging[:n * k * cols].view(n, k, cols)
        block.copy_(bank[:, r:r + k])
        q_r, s_r = native.fuse_quantize(shared[r:r + k].numpy(), block.numpy(), coefs, threads)
        if q is None:  # the outputs once, filled block by block (no per-block pieces to fragment the heap)
            q = np.empty((q_r.shape[0], rows, *q_r.shape[2:]), q_r.dtype)
            scales = np.empty((s_r.shape[0], rows, *s_r.shape[2:]), s_r.dtype)
        q[:, r:r + k], scales[:, r:r + k] = q_r, s_r
    return q, scales


UPCAST_ROWS_VALUES = 1 << 23  # fp16 bank values converted at a time for the kernel (32 MB in fp32)


def _small_fusions(bank, mapped, by_weight: dict, alphas, workspace, exact: bool) -> dict:
    """{name: (mixes, size) fused copy} of the small vectors (the norms'; no kernel takes them),
    fused one after another on one torch thread before the pass (kept until their turn: a few KB
    per mix; small matrices are fused in their turn, as they could be the whole model). Fused between two
    kernel calls, each had taken about 0.2 ms (the bank's pages and the caches cold after a
    matrix's pass), 3.7 ms of an 80 ms single build; together, a few tenths of a millisecond.
    The same `combine_many` calls, so the same bytes."""
    names = [name for name in by_weight if not name.startswith("@") and len(bank.shapes[name]) == 1
             and math.prod(bank.shapes[name]) < SMALL]
    if not names:
        return {}
    with _one_torch_thread(True):
        return {name: combine_many(shared, experts, alphas, workspace=workspace, exact=exact).clone()
                for name, shared, experts in bank.tensors(names, mapped=mapped)}


# values per mix: a torch fusion of fewer (the norms; on small models, whole matrices) runs on one
# thread and is copied out of the workspace. A shipping-only batch's fusion by matrix product may
# round its last bits differently on one thread than on several: the same bytes every time still.
SMALL = 1 << 16


@contextlib.contextmanager
def _one_torch_thread(small: bool):
    """Torch on one thread for a small fusion (the norms' vectors). A parallel region's OpenMP
    workers spin for milliseconds after it ends, on the cores that the kernel's threads need next:
    in a 16-mix pass of the benchmark's bank, the 17 norms' regions left a worker spinning for a
    quarter of the pass's CPU time, and running them on one thread made the pass 20% faster."""
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


def _write_weights(bank, g, alphas, hf_writers, writer: "_Writer", files, progress) -> None:
    """Every stored tensor in the graph's storage order, so each data file is written front to back
    (and hashed on the way). Fresh arrays are written by a background thread while the next tensor
    is fused (what it writes is bound into each task by `fused_weights`). A fusion that lives in the
    reused workspace is written here, once the writer has finished with everything before it (a
    wait that the norms, copied out, no longer cause: they had made the main thread wait for the
    writer 17 times a pass, about 40 ms of a 16-mix batch's 320). HF weights are written here, in order."""
    # With HF weights (parity, or no --no-hf), every mix is fused by `combine` itself: bit-identical to its
    # single build, so parity (a) compares the very weights a single build would ship (a batch's
    # other orders of summation moved the demo's logits by up to 1.05e-5, past the 1e-5 bound).
    for w in fused_weights(bank, g, alphas, exact=bool(hf_writers), progress=progress):
        stopping.check()
        for hf, tensor in zip(hf_writers, w.fused if hf_writers and w.fused is not None else ()):  # (iter() of a tensor unbinds it)
            hf.write(w.name, tensor)
        if w.fresh:
            writer.submit(_write_parts, w.parts, w.encoded)
            continue
        writer.wait()  # in storage order, after everything before it
        _write_parts(files, w.parts, w.encoded)


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
MAX_LANES = 8  # writer threads, at most (one per core the export's threads use, and no more than the customers)


class _Writer:
    """Background threads that write the submitted weights in order, each to its own share of the
    customers' data files (so each file is still written front to back), with at most PENDING
    weights waiting or being written: the main thread goes on fusing while the writers catch up.
    Two lanes on two cores halve the writing and hashing that is left when the fusion is done
    (the last tensors of a batch, 16 customers' worth). `submit(fn, *args)` runs fn(lane's
    [(m, data file)], *args) in every lane. A failed write raises in the submitting thread, at the
    next `submit` or `wait`."""

    def __init__(self, files: list, lanes: int) -> None:
        k = max(1, min(lanes, len(files)))
        self.lanes = [files[i::k] for i in range(k)]
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix=f"soup-export-writer-{i}") for i in range(k)]
        self.pending = deque()  # per weight: its futures, one per lane

    def submit(self, fn, *args) -> None:
        self.wait(left=PENDING - 1)
        self.pending.append([pool.submit(fn, lane, *args) for pool, lane in zip(self.pools, self.lanes)])

    def wait(self, left: int = 0) -> None:
        while len(self.pending) > left:
            for future in self.pending.popleft():
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
