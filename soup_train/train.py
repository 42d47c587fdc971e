"""Algorithm 2: train a Soup-of-Experts.

Each optimizer step, on each rank: sample h ~ pi, alpha = w(h), instantiate Theta(h), draw
grad_accum micro-batches from mix(h), take the LM loss, backpropagate into S, E and w.
AdamW with linear warm-up and cosine decay, global-norm clipping, bf16 autocast on CUDA and fp32
on CPU, per-domain evaluation, JSONL/TensorBoard logs, atomic checkpoints and exact resume.

Footguns:
- Resuming is automatic when `--out` already holds checkpoints; the config must match except for
  `config.RESUME_MUTABLE` fields, and the world size must be the same.
- SIGTERM (cluster preemption) finishes the current step, writes a checkpoint and exits cleanly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from soup_train import checkpoint as ckpt_io
from soup_train.config import RunConfig, TrainConfig, save_json, to_dict
from soup_train.data.sampler import MetaDistribution, MixSampler
from soup_train.data.shards import DomainShards, read_index
from soup_train.distributed import (
    DistEnv, any_rank, gather_objects, grad_sync, materialise, mean_over_ranks, peak_memory, process_group,
    raise_together, unwrap,
)
from soup_train.errors import ConfigError
from soup_train.evaluate import evaluate_domains
from soup_train.model.llama import lm_loss
from soup_train.model.soup import meta_soup
from soup_train.runlog import RunLog

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    losses: list[float] = field(default_factory=list)  # per step of this process's run
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill the fields that depend on the data (vocab size, sequence length) and check them."""
    index = read_index(Path(cfg.data.path))
    vocab = index["vocab_size"]
    if cfg.model.vocab_size not in (0, vocab):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has {vocab} "
                          "tokens; drop the override (0 = take it from the data)")
    seq_len = cfg.data.seq_len or index["window"] - 1
    if seq_len > index["window"] - 1:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the prepared windows ({index['window'] - 1}); "
                          "re-run prepare with a larger seq_len")
    model = replace(cfg.model, vocab_size=vocab, max_seq_len=max(cfg.model.max_seq_len, seq_len))
    return replace(cfg, model=model, data=replace(cfg.data, seq_len=seq_len))


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to t.lr, then cosine decay to t.lr * t.min_lr_ratio."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dense matrices, their expert banks, MLP weights); not vectors or biases. Judged
    by the soup's own names (DDP's `module.` prefix removed), so every wrapping decays the same tensors."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        dense_ndim = p.ndim - 1 if name.startswith("experts.") and not name.endswith(("_u", "_v")) else p.ndim
        (decay if dense_ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    fused = t.parallel != "fsdp" or not torch.distributed.is_initialized()
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             eps=t.eps, fused=fused)


def autocast_for(t: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA (and on CPU only if asked), fp32 otherwise."""
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def optimizer_step(model: torch.nn.Module, optim: torch.optim.Optimizer, batches, h,
                   t: TrainConfig, step: int, seq_len: int, autocast=contextlib.nullcontext) -> tuple[float, float]:
    """Algorithm 2, one step: t.grad_accum micro-batches (B, >= seq_len + 1) at h, then AdamW.

    h: one (k,) tensor for every micro-batch, or a list with one per micro-batch. With h None the
    model is a dense LM (`model(x)`): the same step trains SmallTalk's models.

    Returns (loss averaged over micro-batches, gradient norm before clipping).
    """
    total = 0.0
    for micro, batch in enumerate(batches):
        x, y = batch[:, :seq_len], batch[:, 1:seq_len + 1]
        h_micro = h[micro] if isinstance(h, list) else h
        with grad_sync(model, micro == t.grad_accum - 1), autocast():
            loss = lm_loss(model(x) if h_micro is None else model(x, h_micro), y) / t.grad_accum
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
    for group in optim.param_groups:
        group["lr"] = lr_at(step, t)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return total, float(norm)


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self.previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def fit(cfg: RunConfig, out: Path, *, stop_after: int | None = None, progress: bool = True) -> FitResult:
    """Train (or resume) a run in directory `out`. `stop_after` simulates preemption after that step."""
    with process_group(cfg.train.device) as env:
        return Trainer(resolve_config(cfg), out, env, progress).run(stop_after)


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, env: DistEnv, progress: bool) -> None:
        self.cfg, self.out, self.env, self.progress = cfg, out, env, progress
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        self.data_dir = Path(cfg.data.path)
        self.train_shards = DomainShards.open(self.data_dir, cfg.data.domains, "train")
        self.test_shards = DomainShards.open(self.data_dir, cfg.data.domains, "test")
        self.natural = self.train_shards.natural()
        soup = meta_soup(cfg.model, cfg.soup, len(self.natural))
        self.model = materialise(soup, env, t.parallel, lambda m, place: m.initialise(t.seed, place))
        self.optim = make_optimizer(self.model, t)
        meta = MetaDistribution(cfg.meta, self.natural)
        self.sampler = MixSampler(self.train_shards, meta, t.seed, env.rank, t.grad_accum)
        self.autocast = autocast_for(t, env.device)
        self.step = 0

    # ----------------------------------------------------------------------------- resume / save
    def maybe_resume(self) -> int | None:
        found = ckpt_io.latest_checkpoint(self.out)
        if found is None:
            return None
        info = ckpt_io.read_info(found)
        ckpt_io.check_resumable(info.run, self.cfg, found)
        self.step, samplers = ckpt_io.restore_train_state(found, self.model, self.optim, self.env.world_size)
        self.sampler.load_state_dict(samplers[self.env.rank])
        log.info("resumed from %s at step %d", found, self.step)
        return self.step

    def save(self) -> Path | None:
        """A checkpoint of this step, every rank writing its part (`sharded.save_step`)."""
        from soup_train.sharded import save_step

        samplers = gather_objects(self.sampler.state_dict(), self.env)
        info = ckpt_io.CheckpointInfo(self.cfg, self.train_shards.names, self.cfg.data.domains,
                                      [float(x) for x in self.natural], self.step)
        return save_step(self.out, self.step, self.model, self.optim, {"samplers": samplers},
                         self.cfg.train.keep_last, self.env, ckpt_io.soup_side_files(info, self.data_dir))

    # ----------------------------------------------------------------------------- one step
    def train_step(self) -> tuple[float, float]:
        """One optimizer step at this rank's h; returns (mean loss over ranks, grad norm)."""
        t, device = self.cfg.train, self.env.device
        hs = ([self.sampler.next_h() for _ in range(t.grad_accum)] if self.cfg.meta.h_per_micro_batch
              else [self.sampler.next_h()] * t.grad_accum)
        batches, error = [], None
        try:
            batches = [torch.from_numpy(self.sampler.batch(m, h, t.batch_size)).to(device) for m, h in enumerate(hs)]
        except Exception as exc:  # noqa: BLE001 - agreed: every rank stops with the message
            error = exc
        raise_together(error, self.env, f"reading its batch of step {self.step + 1}")
        h_t = [torch.as_tensor(h, dtype=torch.float32, device=device) for h in hs]
        loss, norm = optimizer_step(self.model, self.optim, batches, h_t, t, self.step,
                                    self.cfg.data.seq_len, self.autocast)
        self.step += 1
        return mean_over_ranks(loss, self.env), norm

    def evaluate(self) -> dict[str, dict[str, float]]:
        t = self.cfg.train
        return evaluate_domains(self.model, self.test_shards, self.natural, t.eval_batches * t.batch_size,
                                t.batch_size, self.cfg.data.seq_len, self.env.device, self.autocast, self.env)

    # ----------------------------------------------------------------------------- loop
    def run(self, stop_after: int | None) -> FitResult:
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        t = self.cfg.train
        runlog = RunLog(self.out / "log.jsonl", self.env.is_main, resumed, t.tensorboard)
        if self.env.is_main:
            save_json(self.out / "config.json", {"run": to_dict(self.cfg), "domains": self.train_shards.names})
        result = FitResult(self.out, None, self.step, domains=list(self.train_shards.names))
        preempt = _Preemption()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and self.env.is_main),
                   desc="fit", unit="step", dynamic_ncols=True)
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.data.seq_len * self.env.world_size
        clock, since = time.perf_counter(), 0
        try:
            while self.step < t.steps:
                loss, norm = self.train_step()
                result.losses.append(loss)
                since += 1
                if self.step % t.log_every == 0 or self.step == t.steps:
                    rate = tokens_per_step * since / max(time.perf_counter() - clock, 1e-9)
                    runlog.write({"kind": "train", "step": self.step, "loss": loss, "grad_norm": norm,
                                  "lr": lr_at(self.step - 1, t), "tokens_per_s": rate,
                                  "tokens": self.step * tokens_per_step,
                                  "peak_memory_gib": peak_memory(self.env) / 2**30})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                    clock, since = time.perf_counter(), 0
                bar.update(1)
                last = self.step == t.steps
                if (t.eval_every and self.step % t.eval_every == 0) or last:
                    result.evaluation = self.evaluate()
                    runlog.write({"kind": "eval", "step": self.step, "domains": result.evaluation})
                requested = any_rank(preempt.requested, self.env)  # every rank stops at the same step
                stopping = requested or (stop_after is not None and self.step >= stop_after)
                if self.step % t.ckpt_every == 0 or last or requested:
                    result.checkpoint = self.save()
                clock = clock if since else time.perf_counter()  # tokens/s excludes eval and saving
                if stopping:
                    log.warning("stopping at step %d (%s)", self.step, "SIGTERM" if requested else "stop_after")
                    break
        finally:
            bar.close()
            runlog.close()
            preempt.restore()
        if not result.evaluation:  # nothing left to train (resumed at the end): still report
            result.evaluation = self.evaluate()
        result.step = self.step
        return result
