"""Run under torchrun by test_distributed.py: train, then dump this rank's parameters."""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

from soup_train.config import apply_overrides
from soup_train.distributed import process_group, unwrap
from soup_train.presets import run_preset
from soup_train.train import Trainer, resolve_config


HANG_SECONDS = 300  # far above a run's few seconds, below the test's 600 s timeout


def main(data: str, out: str, stop_after: str, *overrides: str) -> None:
    # a rank stuck in a collective prints every thread's stack and exits, so the test fails with the
    # place of the hang in its stderr instead of timing out silently
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    cfg = run_preset("debug")
    cfg = apply_overrides(replace(cfg, data=replace(cfg.data, path=data)), list(overrides))
    with process_group("cpu") as env:
        train_and_dump(cfg, Path(out), stop_after, env)  # the trainer is gone before the group (see teardown)


def train_and_dump(cfg, out: Path, stop_after: str, env) -> None:
    trainer = Trainer(resolve_config(cfg), out, env, progress=False)
    if stop_after.startswith("sigterm-rank1@"):  # SIGTERM to rank 1 alone, after that step
        at, step = int(stop_after.split("@")[1]), trainer.train_step

        def step_then_signal():
            result = step()
            if env.rank == 1 and trainer.step == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        trainer.train_step = step_then_signal
        stop_after = "none"
    if stop_after == "rank0-disk-full":  # rank 0's weights file fails at its last flush (ENOSPC), rank 0 alone
        import errno

        from soup_train.stream import SafetensorsWriter

        close = SafetensorsWriter.close

        def full(self):
            if env.rank == 0 and self.path.name == "model.safetensors":
                raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
            return close(self)

        SafetensorsWriter.close = full
        stop_after = "none"
    if stop_after == "slow-writer":  # rank 0 takes 8 s to commit a save; the others wait 2 s at most
        import time

        from soup_train import sharded

        sharded.MIN_WAIT, sharded.WAIT_BYTES_PER_SECOND = 2.0, 1e18
        commit = sharded.write_latest
        sharded.write_latest = lambda *args: (env.rank == 0 and time.sleep(8)) or commit(*args)
        stop_after = "none"
    if stop_after.startswith("bad-data-rank1@"):  # rank 1 alone finds its shard unreadable at that step
        at, batch = int(stop_after.split("@")[1]), trainer.sampler.batch

        def unreadable(*args, **kwargs):
            if env.rank == 1 and trainer.step + 1 == at:
                raise OSError(5, "Input/output error", "data/train/code.bin")
            return batch(*args, **kwargs)

        trainer.sampler.batch = unreadable
        stop_after = "none"
    if stop_after == "measure-save":  # rank's peak memory while it saves, beside its shard and the largest tensor
        trainer.save = measured(trainer, trainer.save, out, env)
        stop_after = "none"
    trainer.run(int(stop_after) if stop_after != "none" else None)
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
              for k, v in unwrap(trainer.model).named_parameters()}  # FSDP2: gather DTensors
    save_file(params, str(out / f"params_rank{env.rank}.safetensors"))


def measured(trainer, save, out: Path, env):
    """`save`, with this process's resident memory before it and at its peak (the peak reset first:
    /proc/self/clear_refs) written to save_memory_rank{R}.json, with its shard's and the largest
    tensor's bytes."""
    import json

    import torch
    from torch.distributed.tensor import DTensor

    def status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    def local(t) -> int:
        return (t.to_local() if isinstance(t, DTensor) else t).nbytes

    def run():
        params = list(unwrap(trainer.model).named_parameters())
        shard = sum(local(p) for _, p in params) + sum(local(v) for st in trainer.optim.state.values()
                                                      for v in st.values() if isinstance(v, torch.Tensor))
        largest = max(p.numel() * p.element_size() for _, p in params)
        gathers, full_tensor = [], DTensor.full_tensor
        DTensor.full_tensor = lambda self, *a, **k: gathers.append(1) or full_tensor(self, *a, **k)
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        try:
            path = save()
        finally:
            DTensor.full_tensor = full_tensor
        record = {"before": before, "peak": status("VmHWM"), "shard": shard, "largest": largest,
                  "full_gathers": len(gathers),
                  "soup": sum(p.numel() * p.element_size() for _, p in params)}
        (out / f"save_memory_rank{env.rank}.json").write_text(json.dumps(record))
        return path

    return run


if __name__ == "__main__":
    main(*sys.argv[1:])
