"""One dense LM trained on a fixed set of windows: a SmallTalk expert job or the dense baseline.

The step is the soup trainer's (`soup_train.train.optimizer_step` with no h): AdamW, warm-up +
cosine, clipping, bf16 autocast on CUDA. Under torchrun the job is data parallel over its own
ranks only: every expert is launched as a separate job with its own process group, so no
collective ever spans two experts. Rows are drawn uniformly with replacement from the job's
windows by a PCG64 stream per (job key, rank) whose state is checkpointed, so a killed job
resumes exactly where it stopped and no other job is touched.

Output, in the job directory: `checkpoints/step_N/` (resumable), `log.jsonl`, and when the job
ends `model.safetensors` (the trained model, HF Llama names) and `job.json` (what it trained on).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from soup_train import checkpoint as ckpt_io
from soup_train.config import ModelConfig, TrainConfig, save_json, to_dict
from soup_train.distributed import DistEnv, any_rank, barrier, gather_objects, mean_over_ranks, process_group, wrap
from soup_train.errors import DistributedError, ResumeError
from soup_train.model.llama import Llama
from soup_train.runlog import RunLog
from soup_train.sharded import load_step, save_step, write_full_weights
from soup_train.smalltalk.run import FORMAT as RUN_FORMAT
from soup_train.smalltalk.run import Pool
from soup_train.train import _Preemption, autocast_for, lr_at, make_optimizer, optimizer_step

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    out: Path
    step: int
    losses: list[float] = field(default_factory=list)
    world_size: int = 1


@dataclass(frozen=True)
class Job:
    """What a job trains: a model config on `rows` of a pool, with a training config."""

    name: str
    model: ModelConfig
    train: TrainConfig
    rows: np.ndarray
    key: tuple[int, ...]  # seeds the init and the row stream (e.g. (seed, expert index))
    seq_len: int

    def identity(self) -> dict:
        """The fields a resumed job must share with the one that wrote the checkpoint."""
        train = {k: v for k, v in to_dict(self.train).items() if k not in _RESUMABLE_TRAIN}
        return {"name": self.name, "model": to_dict(self.model), "train": train, "rows": int(len(self.rows)),
                "rows_checksum": int(np.asarray(self.rows, dtype=np.int64).sum() % (1 << 61)),
                "key": list(self.key), "seq_len": self.seq_len}


_RESUMABLE_TRAIN = {"steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last",
                    "tensorboard", "threads", "device"}


def _rng(key: tuple[int, ...], rank: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([*key, 1000 + rank])))


def run_job(job: Job, pool: Pool, out: Path, *, stop_after: int | None = None, progress: bool = True) -> JobResult:
    """Train (or resume, or find finished) one job in `out`."""
    with process_group(job.train.device) as env:
        return _Runner(job, pool, out, env).run(stop_after, progress)


class _Runner:
    def __init__(self, job: Job, pool: Pool, out: Path, env: DistEnv) -> None:
        self.job, self.pool, self.out, self.env = job, pool, out, env
        t = job.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(int(np.random.SeedSequence(list(job.key)).generate_state(1)[0]))
        self.model = wrap(Llama(job.model).to(env.device), env, t.parallel)
        self.optim = make_optimizer(self.model, t)
        self.autocast = autocast_for(t, env.device)
        self.rng = _rng(job.key, env.rank)
        self.step = 0

    def batch(self) -> torch.Tensor:
        rows = self.job.rows[self.rng.integers(0, len(self.job.rows), size=self.job.train.batch_size)]
        return torch.from_numpy(self.pool.take(rows)).to(self.env.device)

    def resume(self) -> int | None:
        found = ckpt_io.latest_checkpoint(self.out)
        if found is None:
            return None
        state = load_step(found, self.model, self.optim)
        if state.get("job") != self.job.identity():
            raise ResumeError(f"{found} was written by another job configuration; delete {self.out} "
                              "to start this job again, or run it with its original settings")
        if len(state["samplers"]) != self.env.world_size:
            raise ResumeError(f"{found} was written by {len(state['samplers'])} process(es), this job has "
                              f"{self.env.world_size}; resume with the same torchrun --nproc_per_node")
        self.rng.bit_generator.state = state["samplers"][self.env.rank]
        self.step = int(state["step"])
        log.info("%s: resumed at step %d", self.job.name, self.step)
        return self.step

    def save(self) -> None:
        samplers = gather_objects(self.rng.bit_generator.state, self.env)
        save_step(self.out, self.step, self.model, self.optim, {"samplers": samplers, "job": self.job.identity()},
                  self.job.train.keep_last, self.env)

    def run(self, stop_after: int | None, progress: bool) -> JobResult:
        t = self.job.train
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        result = JobResult(self.out, self.step, world_size=self.env.world_size)
        runlog = RunLog(self.out / "log.jsonl", self.env.is_main, resumed, t.tensorboard)
        preempt = _Preemption()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (progress and self.env.is_main),
                   desc=self.job.name, unit="step", dynamic_ncols=True)
        tokens = t.batch_size * t.grad_accum * self.job.seq_len * self.env.world_size
        clock = time.perf_counter()
        try:
            while self.step < t.steps:
                batches = (self.batch() for _ in range(t.grad_accum))
                loss, norm = optimizer_step(self.model, self.optim, batches, None, t, self.step,
                                            self.job.seq_len, self.autocast)
                self.step += 1
                loss = mean_over_ranks(loss, self.env)
                result.losses.append(loss)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    rate = tokens * t.log_every / max(time.perf_counter() - clock, 1e-9)
                    runlog.write({"kind": "train", "step": self.step, "loss": loss, "grad_norm": norm,
                                  "lr": lr_at(self.step - 1, t), "tokens": self.step * tokens, "tokens_per_s": rate})
                    bar.set_postfix(loss=f"{loss:.3f}")
                    clock = time.perf_counter()
                stopping = any_rank(preempt.requested, self.env) or (stop_after is not None and self.step >= stop_after)
                if self.step % t.ckpt_every == 0 or self.step == t.steps or stopping:
                    self.save()
                if stopping:
                    log.warning("%s: stopping at step %d", self.job.name, self.step)
                    break
        finally:
            bar.close()
            runlog.close()
            preempt.restore()
        if self.step >= t.steps:  # every rank: an FSDP expert's parameters are gathered one at a time
            if hasattr(self.model, "reshard"):
                self.model.reshard()
            failed = None
            try:
                write_full_weights(self.out / "model.safetensors", self.model, self.env, {"format": RUN_FORMAT})
            except Exception as exc:  # noqa: BLE001 - agreed: every rank stops with an error
                failed = exc
            if any_rank(failed is not None, self.env):
                if failed is not None:
                    raise failed
                raise DistributedError(f"{self.job.name}: rank 0 failed to write the expert's weights (its error "
                                       "is in its log); rerun the job: it resumes from its last checkpoint")
            if self.env.is_main:
                save_json(self.out / "job.json", {**self.job.identity(), "steps_done": self.step,
                                                  "world_size": self.env.world_size, "tokens": self.step * tokens})
        barrier(self.env)
        result.step = self.step
        return result
