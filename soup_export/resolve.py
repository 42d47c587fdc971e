"""Stage 2, resolve: Theta(h) = S + sum_j alpha_j E_j as a standard Hugging Face Llama directory.

alpha = coefficient MLP(h); then, tensor by tensor, the shared tensor and its expert bank are
read from the memory-mapped checkpoint (`bank.Bank`), fused in fp32 with `soup_math`'s one
definition, cast to the output dtype and streamed into `model.safetensors`. Peak memory is about
one tensor times (n + 1), never the model. `resolve_batch` is tensor-major: each bank tensor is
read once and written for every mix. Output: config.json, model.safetensors,
generation_config.json, tokenizer files, and soup_spec.json (mix, alpha, checkpoint hash), the
files `layout` names.
"""
from __future__ import annotations

from pathlib import Path

import torch

from soup_export.bank import Bank, checkpoint_ref
from soup_export.errors import ExportInputError
from soup_export.layout import HF_WEIGHTS, SPEC_FILE, hf_side_files, spec_bytes, write_files
from soup_export.mix import Mix
from soup_train.stream import SafetensorsWriter, all_written

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(ckpt: Path, mix: Mix, out: Path, dtype: str = "float32", progress: bool = False) -> Path:
    """Write the HF Llama directory of Theta(h) into `out` (which must not exist)."""
    return resolve_batch(ckpt, [mix], [out], dtype, progress)[0]


def resolve_batch(ckpt: Path, mixes: list[Mix], outs: list[Path], dtype: str = "float32",
                  progress: bool = False) -> list[Path]:
    """One pass over the bank for many mixes; `outs[m]` receives mix m's HF directory."""
    if dtype not in DTYPES:
        raise ExportInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    bank = Bank.open(ckpt)
    for mix in mixes:
        if list(mix.domains) != list(bank.info.domains):
            raise ExportInputError(f"mix {mix.name!r} is over domains {list(mix.domains)}, the checkpoint's are "
                                   f"{bank.info.domains}")
    alphas = [bank.alpha(m.h) for m in mixes]
    torch_dtype = DTYPES[dtype]
    specs = [(name, torch_dtype, shape) for name, shape in bank.shapes.items()]
    writers = []
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        writers.append(SafetensorsWriter(out / HF_WEIGHTS, specs, {"format": "pt"}))
    with all_written(writers):
        for name, tensors in bank.fused(alphas, progress):
            for writer, tensor in zip(writers, tensors):
                writer.write(name, tensor)
    side = hf_side_files(bank.info.run.model, bank.tokenizer, dtype)
    for out, mix, alpha in zip(outs, mixes, alphas):
        write_files(out, {**side, SPEC_FILE: spec_bytes(mix, alpha, checkpoint_ref(bank), dtype)})
    return outs
