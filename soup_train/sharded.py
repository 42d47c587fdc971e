"""Resumable state at the preset's scale: no rank ever holds the whole model or optimizer.

Layout of `RUN/checkpoints/step_0000100/` (the export files as in `checkpoint`, plus):
    train_state/state.json       step, param groups, every rank's sampler state, "optimizer": "sharded"
    train_state/optimizer/       the optimizer's moments, one file per rank (torch.distributed.checkpoint)

Saving is collective (every rank calls `save_step`):
- the weights for export go to `model.safetensors` one tensor at a time, written by rank 0: a
  parameter sharded by rows (FSDP2) arrives one rank's rows at a time, so the writing rank holds its
  shard plus one rank's rows of one tensor, never a whole tensor;
- the optimizer's moments are written by every rank as its own shard, through
  torch.distributed.checkpoint (DCP), which no rank gathers; the param groups go to state.json;
- the directory is staged (`.step_N.tmp`) and renamed by rank 0 only once every rank has written
  its part; a failure on any rank (a full disk) is agreed by all, removes the staging directory,
  keeps the previous `latest`, and raises on every rank.
Resuming (`load_step`) reads each rank's part: the weights through a shared read-only map of
`model.safetensors` (each rank keeps its shard; the pages are page cache, not a copy per rank),
the moments from the DCP shards (resharded by DCP if the sharding changed). A checkpoint of the
first layout (`train_state/optimizer.safetensors`, full state) is still read, by `restore_step`.
DCP records its metadata with pickle: only a run's own train_state is read this way (export never
reads train_state).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from soup_train.checkpoint import FORMAT, WEIGHTS, _prune, record_checksum, restore_step, step_dir, write_latest
from soup_train.distributed import DistEnv, any_rank, local_rows, row_chunks, unwrap, wait_for_all
from soup_train.errors import CheckpointError
from soup_train.stream import SafetensorsWriter

OPTIMIZER_DIR = "optimizer"
MIN_WAIT = 600.0  # seconds a rank waits for the others at a save, at least
WAIT_BYTES_PER_SECOND = 20e6  # ... and more for a larger state: a slow shared file system's write speed


def save_seconds(model: nn.Module) -> float:
    """How long a rank waits for the others at a save: the time a slow file system takes to write
    the weights and their two moments (rank 0 writes the weights alone, and prunes old checkpoints)."""
    nbytes = sum(p.numel() * p.element_size() for p in unwrap(model).parameters())
    return MIN_WAIT + 3 * nbytes / WAIT_BYTES_PER_SECOND
LAYOUT = "sharded"


def save_step(run_dir: Path, step: int, model: nn.Module, optim: torch.optim.Optimizer, state: dict,
              keep_last: int, env: DistEnv, side_files=None) -> Path | None:
    """`run_dir/checkpoints/step_N` from every rank's part (collective: every rank calls it); returns
    the directory on rank 0, None elsewhere. `state` (JSON) joins the step in state.json;
    `side_files(tmp)` (rank 0) adds files before the directory is renamed into place."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    seconds = save_seconds(model)
    failed: BaseException | None = None
    if hasattr(model, "reshard"):  # FSDP2 keeps a root unit unsharded after a no-grad forward (evaluation)
        model.reshard()
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "train_state").mkdir(parents=True)
            if side_files is not None:
                side_files(tmp)
    except Exception as exc:  # noqa: BLE001 - agreed below, raised on every rank
        failed = exc
    if not any_rank(failed is not None, env):
        wait_for_all(env, seconds, f"the start of the save of step {step}")  # the staging directory exists
        try:
            write_full_weights(tmp / WEIGHTS, model, env)
        except Exception as exc:  # noqa: BLE001 - agreed below, raised on every rank
            failed = exc
        if not any_rank(failed is not None, env):  # every rank enters DCP's collectives, or none
            try:
                groups = save_optimizer(tmp / "train_state" / OPTIMIZER_DIR, model, optim)
                if env.is_main:
                    record = {**state, "step": step, "param_groups": groups, "optimizer": LAYOUT}
                    (tmp / "train_state" / "state.json").write_text(json.dumps(record) + "\n")
            except Exception as exc:  # noqa: BLE001 - agreed below, raised on every rank
                failed = exc
    if any_rank(failed is not None, env):
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        wait_for_all(env, seconds, f"a failed save of step {step}")
        if failed is not None:
            raise failed
        raise CheckpointError(f"another rank failed to save step {step} (its error is in its log); "
                              f"the previous checkpoint is kept")
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_latest(run_dir, final.name)
        _prune(run_dir, keep_last)
    wait_for_all(env, seconds, f"the end of the save of step {step}")  # rank 0 renamed it and pruned old ones
    return final if env.is_main else None


def write_full_weights(path: Path, model: nn.Module, env: DistEnv, metadata: dict | None = None) -> None:
    """Every parameter (tied ones once, canonical names) written by rank 0 to `path` (collective:
    every rank calls it), hashed, its SHA-256 recorded. A parameter sharded by rows (FSDP2) reaches
    rank 0 one rank's rows at a time (`_row_blocks`): rank 0 holds one shard of one tensor beyond its
    own, never the whole tensor. A write error on rank 0 does not stop the transfers (the other ranks
    are in them): it is raised once every tensor went by."""
    params = list(unwrap(model).named_parameters())
    writer = error = None
    if env.is_main:
        try:
            writer = SafetensorsWriter(path, [(n, p.dtype, tuple(p.shape)) for n, p in params],
                                       metadata or {"format": FORMAT}, hashed=True)
        except Exception as exc:  # noqa: BLE001 - raised after the last transfer
            error = exc
    with torch.no_grad():
        for name, p in params:
            blocks = _row_blocks(p, env)
            if writer is not None and error is None:
                try:
                    writer.write_pieces(name, blocks)
                except Exception as exc:  # noqa: BLE001 - raised after the last transfer
                    error = exc
            for _ in blocks:  # this rank's part of the transfers not yet made (all of them off rank 0)
                pass
    if not env.is_main:
        return
    if error is None:
        try:
            record_checksum(path, writer.close())
        except Exception as exc:  # noqa: BLE001 - a full disk often shows at the last flush
            error = exc
    if error is not None:
        if writer is not None:
            writer.abort()
        raise error


def _row_blocks(p, env: DistEnv):
    """The rows of parameter `p` in order, as consecutive CPU blocks on rank 0 (an iterator every rank
    drains in step): a dim-0 sharded DTensor one rank's chunk at a time, sent by its rank to rank 0
    (torch's chunking, as FSDP2 shards); any other DTensor whole (a gather); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        if env.is_main:
            yield p.detach().cpu()
        return
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        full = p.full_tensor()  # collective
        if env.is_main:
            yield full.cpu()
        return
    import torch.distributed as dist

    rows = row_chunks(p.shape[0], mesh.size())
    group, me = mesh.get_group(), mesh.get_local_rank()
    local = p.to_local()
    for r, n in enumerate(rows):
        if not n:
            continue
        if r == 0:
            if me == 0:
                yield local.detach().cpu()
            continue
        if me == r:
            dist.send(local.detach().contiguous(), group_dst=0, group=group)
        elif me == 0:
            block = torch.empty((n, *p.shape[1:]), dtype=local.dtype, device=local.device)
            dist.recv(block, group_src=r, group=group)
            yield block.cpu()


def save_optimizer(path: Path, model: nn.Module, optim: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's tensors, each rank its own shard, by DCP into the directory `path`; returns
    the param groups (JSON, for state.json)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optim)
    with _one_process_is_fine():
        dcp.save({"state": osd["state"]}, checkpoint_id=str(path))
    return json.loads(json.dumps(osd["param_groups"]))


def load_full_weights(path: Path, model: nn.Module) -> None:
    """Every parameter of a (wrapped) model from `path` in place: each rank copies its own shard out
    of a shared read-only map of the file (a sharded parameter reads only its rows' pages)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from soup_train.safetensors_map import MappedSafetensors

    mapped = MappedSafetensors(path)
    params = dict(unwrap(model).named_parameters())
    missing, extra = sorted(set(params) - set(mapped.header)), sorted(set(mapped.header) - set(params))
    if missing or extra:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            full = mapped[name]
            if tuple(full.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(full.shape)}, the model {tuple(p.shape)}")
            if isinstance(p, DTensor):
                p.to_local().copy_(_local_shard(full, p, distribute_tensor))
            else:
                p.copy_(full)


def _local_shard(full: torch.Tensor, p, distribute_tensor) -> torch.Tensor:
    """This rank's part of `full` for the sharded parameter `p`: FSDP2's dim-0 chunk, sliced on the
    host (only its rows are read from the map and copied to the device), or DTensor's own
    distribution for any other placement."""
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    if mesh.ndim == 1 and tuple(p.placements) == (Shard(0),):
        _, start = local_rows(p)
        return full[start:start + p.to_local().shape[0]]
    return distribute_tensor(full, mesh, p.placements, src_data_rank=None).to_local()


def load_step(ckpt: Path, model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Load a checkpoint's model and optimizer state into a (wrapped) model, each rank its part;
    returns its state.json. The first layout (full state in one file) is read by `restore_step`."""
    state = json.loads((ckpt / "train_state" / "state.json").read_text())
    if state.get("optimizer") != LAYOUT:
        return restore_step(ckpt, model, optim)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    load_full_weights(ckpt / WEIGHTS, model)
    osd = get_optimizer_state_dict(model, optim)
    target = {"state": osd["state"]}
    with _one_process_is_fine():
        dcp.load(target, checkpoint_id=str(ckpt / "train_state" / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optim, {"state": target["state"], "param_groups": state["param_groups"]})
    return state


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns that it assumes one process when there is no process group: that is the case meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
