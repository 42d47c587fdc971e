"""Run under torchrun by test_distributed.py: train, then dump this rank's parameters."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

from soup_train.config import apply_overrides
from soup_train.distributed import setup, teardown, unwrap
from soup_train.presets import run_preset
from soup_train.train import Trainer, resolve_config


def main(data: str, out: str, stop_after: str, *overrides: str) -> None:
    cfg = run_preset("debug")
    cfg = apply_overrides(replace(cfg, data=replace(cfg.data, path=data)), list(overrides))
    env = setup("cpu")
    try:
        trainer = Trainer(resolve_config(cfg), Path(out), env, progress=False)
        trainer.run(int(stop_after) if stop_after != "none" else None)
        params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
                  for k, v in unwrap(trainer.model).named_parameters()}  # FSDP2: gather DTensors
        save_file(params, str(Path(out) / f"params_rank{env.rank}.safetensors"))
    finally:
        teardown(env)


if __name__ == "__main__":
    main(*sys.argv[1:])
