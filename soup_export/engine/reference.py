"""The reference executor: the bank pass in plain torch, the specification of every byte.

For each weight in the graph's storage order: read it (shared tensor and experts) once, fuse it
for each output by `soup_math.combine` (the soup's own definition), encode it by
`encode.encode_one`, and write each array at its offset with an ordinary positioned write. No
kernel, no threads, no direct I/O: slower, and easy to check. The manifest hashes the files.
"""
from __future__ import annotations

import numpy as np

from soup_export import stopping
from soup_export.engine.encode import encode_one
from soup_export.graph import rotary_table, weight_order
from soup_export.layout import DATA_FILE, HF_WEIGHTS, SPEC_FILE, write_files
from soup_train.model.soup_math import combine
from soup_train.stream import SafetensorsWriter, all_written


def run(source, job, outputs, settings, progress: bool = False):
    import torch

    from soup_export.engine import PassResult

    g = job.layout
    dense = [n for n in weight_order(g) if not n.startswith("@")]
    _write_small_files(job, outputs)
    specs = [(name, torch.float32, source.shapes[name]) for name in dense]
    hf = [SafetensorsWriter(o.hf / HF_WEIGHTS, specs, {"format": "pt"}) for o in outputs] if job.write_hf else []
    parts: dict[str, list] = {}
    for s, offset in zip(g.stored, g.offsets()):
        parts.setdefault(s.weight, []).append((s, offset))
    data = [open(o.onnx / DATA_FILE, "wb") for o in outputs]
    try:
        with all_written(hf):
            tensors = source.tensors(dense, progress)
            for name in weight_order(g):
                stopping.check()
                if name.startswith("@"):  # architecture-derived tables: the same for every output
                    arrays = [rotary_table(g.arch, name.split(".")[1])] * len(outputs)
                else:
                    got, shared, experts = next(tensors)
                    assert got == name, (got, name)
                    fused = [combine(shared, experts, o.alpha) for o in outputs]
                    for writer, tensor in zip(hf, fused):
                        writer.write(name, tensor)
                    arrays = [t.numpy() for t in fused]
                for fh, w in zip(data, arrays):
                    _write_weight(fh, parts[name], w)
            for fh in data:
                fh.truncate(g.data_size())
    finally:
        for fh in data:
            fh.close()
    return PassResult([{} for _ in outputs], {**settings.to_dict(), "kernel": False, "reads": None,
                                              "writes": "buffered"})


def _write_small_files(job, outputs) -> None:
    files = job.onnx_files()
    for o in outputs:
        dirs = {o.onnx: files, **({o.hf: job.side_files} if job.write_hf else {})}
        for d, content in dirs.items():
            d.mkdir(parents=True, exist_ok=True)
            write_files(d, {**content, **({SPEC_FILE: o.spec} if o.spec is not None else {})})


def _write_weight(fh, parts, w: np.ndarray) -> None:
    """A weight's stored arrays (encoded from fp32 `w`) at their offsets."""
    encoded: dict[tuple, dict[str, np.ndarray]] = {}
    for s, offset in parts:
        key = (s.how, s.rep)
        if key not in encoded:
            encoded[key] = encode_one(np.asarray(w, np.float32), s)
        arr = encoded[key][s.part]
        assert arr.shape == s.shape and arr.dtype == s.dtype, s.name
        fh.seek(offset)
        fh.write(np.ascontiguousarray(arr).tobytes())
