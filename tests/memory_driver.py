"""Run under torchrun by test_memory.py: one FSDP2 training step of a scaled soup, its peak memory
per rank from torch's FSDP memory tracker beside the dry run's estimate, in memory_rank{R}.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

from soup_train.config import DataConfig, ModelConfig, RunConfig, SoupConfig, TrainConfig
from soup_train.distributed import materialise, process_group
from soup_train.model.soup import meta_soup
from soup_train.sizing import memory, soup_counts
from soup_train.train import make_optimizer, optimizer_step

K = 8  # domains
CFG = RunConfig(model=ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512,
                                  max_seq_len=64),
                soup=SoupConfig(n_experts=64), data=DataConfig(seq_len=64),
                train=TrainConfig(batch_size=4, parallel="fsdp", precision="fp32"))


def main(out: str, units: str = "slices") -> None:
    if units == "root-only":  # the negative control: the whole soup one FSDP2 unit (the layout before)
        from soup_train import distributed

        distributed.units = lambda model: []
    with process_group("cpu") as env:
        soup = meta_soup(CFG.model, CFG.soup, K)
        model = materialise(soup, env, "fsdp", lambda m, place: m.initialise(0, place))
        optim = make_optimizer(model, CFG.train)
        batch = torch.randint(0, CFG.model.vocab_size, (CFG.train.batch_size, CFG.data.seq_len + 1),
                              generator=torch.Generator().manual_seed(env.rank))
        h = torch.full((K,), 1 / K)
        step = lambda i: optimizer_step(model, optim, [batch], h, CFG.train, i, CFG.data.seq_len)  # noqa: E731
        step(0)  # the optimizer's moments exist from the first step on
        tracker = FSDPMemTracker(model, optim)
        tracker.track_inputs((batch,))
        with tracker:
            step(1)
        peak = tracker.get_tracker_snapshot("peak")
        counts = soup_counts(CFG, K)
        estimate = memory(CFG, counts, env.world_size, device="cpu")
        record = {"peak": max(v["Total"] for v in peak.values()), "estimate": estimate["fsdp_total"],
                  "parts": {k: v for k, v in estimate["fsdp"].items()},
                  "unsharded": 16 * counts["total"],
                  "tracked": {str(k): v for k, v in next(iter(peak.values())).items()}}
        (Path(out) / f"memory_{units}_rank{env.rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
