"""Expert jobs: each expert trains alone on the sequences the routers assigned it.

`soup-train smalltalk expert RUN --index e` runs `train_expert(run, e)`; it reads only the run's
config, its own assignment file and the data, and writes only RUN/experts/expert_EE. The dense
baseline of the reproduction is the same job on every budget sequence for E times the steps
(equal total training tokens).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from soup_train.errors import CheckpointError
from soup_train.smalltalk.job import Job, JobResult, run_job
from soup_train.smalltalk.run import SmallTalkRun


def expert_job(run: SmallTalkRun, e: int) -> Job:
    run.check_index(e)
    path = run.assign_file(e)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; assign the budget first with "
                              f"`soup-train smalltalk assign {run.path}`")
    rows = np.load(path, allow_pickle=False)
    if len(rows) == 0:
        raise CheckpointError(f"expert {e} was assigned no sequences; raise em.budget or lower em.experts")
    cfg = run.config
    return Job(f"expert_{e:02d}", cfg.expert, cfg.expert_train, rows, (cfg.expert_train.seed, 1, e), cfg.data.seq_len)


def train_expert(run: SmallTalkRun, e: int, *, stop_after: int | None = None, progress: bool = True) -> JobResult:
    return run_job(expert_job(run, e), run.pool("train"), run.expert_dir(e), stop_after=stop_after, progress=progress)


def dense_job(run: SmallTalkRun, steps: int | None = None) -> Job:
    """The dense baseline: the expert's architecture on all assigned sequences, E x the steps."""
    rows = np.sort(np.concatenate([np.load(run.assign_file(e), allow_pickle=False) for e in range(run.experts)]))
    cfg = run.config
    train = replace(cfg.expert_train, steps=steps or cfg.expert_train.steps * run.experts)
    return Job("dense", cfg.expert, train, rows, (cfg.expert_train.seed, 2), cfg.data.seq_len)


def train_dense(run: SmallTalkRun, out: Path, *, steps: int | None = None, progress: bool = True) -> JobResult:
    return run_job(dense_job(run, steps), run.pool("train"), out, progress=progress)
