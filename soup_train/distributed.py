"""Process groups and data parallelism, applied from outside the model.

Design choices:
- `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is single-process and no
  process group is created. Backend: nccl on CUDA, gloo on CPU, picked automatically.
- `parallel=ddp` (default) wraps the soup in DistributedDataParallel: every rank holds S, the
  bank and the coefficient MLP, gradients are averaged. `parallel=fsdp` applies FSDP2's
  `fully_shard` per part of the dense model: one unit for each bank slice (the embedding's, each
  decoder layer's, the final norm's, an untied head's), whose forward instantiates that part's
  Theta, resharded after forward and gathered again in backward; the root unit holds the rest,
  the shared tensors S (one dense model: 1/(n+1) of the soup) and the coefficient MLP. A rank
  holds its shard of the soup, of its gradients and of AdamW's moments, S whole, and one slice
  of the bank whole at a time (two while the next one's gather overlaps). Parameters are
  all-gathered and gradients reduced in fp32 (`MixedPrecisionPolicy`): Theta is instantiated
  from the fp32 bank, as export fuses it, and autocast casts it for the matrix products.
  The soup is built on the meta device and each rank draws only its own rows
  (`materialise`); DDP and a single process build it whole, to the same values.
- One h per rank per step (see `soup_train.data.sampler`): ranks train different specialists
  in the same step and DDP/FSDP average their gradients.
- Gradient accumulation suspends DDP's gradient sync on all but the last micro-batch; FSDP2
  reduce-scatters each micro-batch's gradients (its memory bound depends on it).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from soup_train.errors import ConfigError, DistributedError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistEnv:
    """Pick the device and, under torchrun, initialise the process group."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local, dev, backend)


def teardown(env: DistEnv) -> None:
    """Destroy the process group. Call it after the last reference to the wrapped model is gone:
    DDP's reducer holds the group, and if it outlives `destroy_process_group` the group is freed
    with the reducer, whose destructor joins gloo's worker threads with the GIL held while a worker
    may wait for the GIL to free its last collective's tensors (a hang at exit, seen about once in
    ten 2-process runs). `gc.collect()` first frees a model kept alive only by reference cycles;
    `process_group` also frees one held by a failing run's traceback."""
    if env.backend is not None and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """`setup` ... `teardown` around a run whose objects (trainer, wrapped model) live inside the
    block. If the block raises, the locals of the frames in its traceback are cleared before the
    teardown: the traceback would otherwise keep the wrapped model alive past the process group
    (see `teardown`), and an uncaught one lives until the interpreter exits. The printed traceback
    (files, lines, message) is unchanged."""
    env = setup(device)
    try:
        yield env
    except BaseException as exc:
        if env.backend is not None:
            _clear_traceback_locals(exc)
        raise
    finally:
        teardown(env)


def _clear_traceback_locals(exc: BaseException | None) -> None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def wrap(model: nn.Module, env: DistEnv, parallel: str) -> nn.Module:
    """Apply data parallelism to a model whose parameters hold their values; identity for a single
    process."""
    if env.backend is None:
        return model
    if parallel == "fsdp":
        return shard(model, env)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2 per unit (`units`), then the root over what is left."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh on the run's device: FSDP's default mesh is CUDA's whenever a GPU is visible, even
    # for train.device=cpu over gloo
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for unit in units(model):
        fully_shard(unit, mesh=mesh, mp_policy=fp32, reshard_after_forward=True)
    return fully_shard(model, mesh=mesh, mp_policy=fp32)


def units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as units of their own: a soup's bank slices (`SoupModel.slices`), a
    dense model's decoder layers (SmallTalk's experts)."""
    if hasattr(model, "slices"):
        return list(model.slices())
    return list(getattr(getattr(model, "model", None), "layers", []))


def materialise(model: nn.Module, env: DistEnv, parallel: str,
                init: Callable[[nn.Module, Callable | None], None]) -> nn.Module:
    """A model built on the meta device, on `env.device` with its initial values, wrapped for
    `parallel`. `init(model, place)` fills it (see `soup_train.model.init.init_soup`; `place` None:
    every parameter whole); under FSDP2 the model is sharded first and each rank draws only its own
    rows of each parameter (`local_rows`)."""
    sharded = env.backend is not None and parallel == "fsdp"
    wrapped = shard(model, env) if sharded else model
    model.to_empty(device=env.device)
    init(model, local_rows if sharded else None)
    return wrapped if sharded else wrap(model, env, parallel)


def row_chunks(rows: int, world: int) -> list[int]:
    """How many of `rows` rows each of `world` ranks holds under FSDP2's dim-0 sharding: `torch.chunk`'s
    cut (ceil(rows / world) each, the last ones shorter or empty)."""
    per_rank = -(-rows // world) if rows else 0
    return [max(0, min(per_rank, rows - r * per_rank)) for r in range(world)]


def local_rows(p: nn.Parameter) -> tuple[torch.Tensor, int]:
    """This rank's rows of a parameter and the index of the first (`row_chunks`); a parameter that is
    not sharded: all of it."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p.data, 0
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise DistributedError(f"a parameter of shape {tuple(p.shape)} is sharded as {p.placements}; "
                               "only FSDP2's dim-0 sharding is supported")
    chunks = row_chunks(p.shape[0], p.device_mesh.size())
    return p.to_local(), sum(chunks[:p.device_mesh.get_local_rank()])


@contextlib.contextmanager
def gathered(module: nn.Module):
    """A module's own FSDP2 unit whole for the block (gathered, then resharded after); any other module
    as it is. The root unit gathers only its own parameters: units below it stay sharded."""
    if not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Suspend DDP's gradient all-reduce for a non-final micro-batch (DDP decides at forward time).
    FSDP2 reduce-scatters every micro-batch's gradients on purpose: suspended, every bank slice would
    keep its whole gradient until the last micro-batch (the soup's size, per GPU)."""
    if not enabled and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def mean_over_ranks(value: float, env: DistEnv) -> float:
    if env.backend is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item() / env.world_size


def peak_memory(env: DistEnv) -> float:
    """The most memory any rank has held so far, in bytes: CUDA's `max_memory_allocated` (tensors), or
    on the CPU the process's resident high-water mark (everything it touched)."""
    if env.device.type == "cuda":
        mine = float(torch.cuda.max_memory_allocated(env.device))
    else:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        mine = float(status["VmHWM"].split()[0]) * 1024 if "VmHWM" in status else 0.0
    if env.backend is None:
        return mine
    t = torch.tensor([mine], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether `flag` is set on any rank, the same answer on every rank (a stop asked of one rank
    is agreed by all before any of them enters a save's collectives)."""
    if env.backend is None:
        return flag
    t = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def raise_together(error: BaseException | None, env: DistEnv, what: str) -> None:
    """Raise on every rank when any rank's `error` is set (one small all-reduce when none is): that
    rank raises its own error, the others a `DistributedError` that names the rank, `what` it failed
    and its message. A rank that failed alone would otherwise leave the others waiting in the next
    collective until a timeout."""
    if env.backend is None:
        if error is not None:
            raise error
        return
    if not any_rank(error is not None, env):
        return
    messages = gather_objects(None if error is None else f"{type(error).__name__}: {error}", env)
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise DistributedError(f"rank {rank} failed {what}: {message}")


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's object, on every rank (small JSON-like objects only)."""
    if env.backend is None:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.backend is not None:
        dist.barrier()


def wait_for_all(env: DistEnv, seconds: float, what: str) -> None:
    """Every rank waits here for the others, at most `seconds` (sized by the caller for the work some
    rank does alone, e.g. writing a checkpoint), on a gloo group of its own with that timeout: a rank
    that does not arrive in time fails the others with a message, rather than a hang or the default
    group's timeout (NCCL's 10 minutes, inside the next step's collective)."""
    if env.backend is None:
        return
    try:
        dist.barrier(group=_wait_group(round(seconds)))
    except RuntimeError as exc:
        raise DistributedError(f"rank {env.rank} waited {round(seconds)} s for the other ranks at {what} and they did not "
                           f"arrive ({' '.join(str(exc).split())[:200]}); a rank failed or the file system is slower "
                           "than assumed") from None


@functools.lru_cache(maxsize=4)
def _wait_group(seconds: int):
    """A gloo group over every rank whose operations time out after `seconds` (made by every rank)."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
