"""`soup-export check`: the parity stages, alone, on an existing export directory."""
from __future__ import annotations

import tempfile
from pathlib import Path

from soup_export.build import ExportSpec, run_parity
from soup_export.errors import ExportInputError
from soup_export.mix import Mix
from soup_export.onnx_dir import read_tier
from soup_export.resolve import Bank, read_spec


def check_export(export_dir: Path, ckpt: Path | None, data: Path | None, eval_texts: tuple[Path, ...],
                 verify_checkpoint: bool = False) -> dict:
    hf, onnx_dir = Path(export_dir) / "hf", Path(export_dir) / "onnx"
    if not (hf / "config.json").is_file():
        raise ExportInputError(f"{export_dir} has no hf/ directory (built with --no-hf?); parity needs the resolved "
                               "model: rebuild without --no-hf")
    tier = read_tier(onnx_dir)
    spec = read_spec(hf)
    weights = spec["mix"]["weights"]
    mix = Mix(tuple(weights), tuple(weights.values()), spec["mix"]["given"], spec["mix"]["normalised"],
              spec["mix"]["source"], spec["mix"]["name"])
    bank = Bank.open(ckpt, verify_checkpoint) if ckpt else None
    if bank is not None and bank.sha256 != spec["checkpoint"]["model_sha256"]:
        raise ExportInputError(f"{ckpt} is not the checkpoint this export was built from (SHA-256 differs)")
    export_spec = ExportSpec(data=str(data) if data else None, eval_texts=tuple(str(t) for t in eval_texts))
    with tempfile.TemporaryDirectory(dir=Path(export_dir).parent, prefix=".check-") as scratch:
        return {"tier": tier, **run_parity(bank, mix, hf, onnx_dir, tier, export_spec, {}, Path(scratch) / "fp32")}
