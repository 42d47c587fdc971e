"""Checkpoints: one directory per step, written atomically, the export's files loaded without unpickling.

Layout of `RUN/checkpoints/step_0000100/`:
    config.json              run config, domain names and view, natural frequencies, step
    model.safetensors        S (`shared.*`), experts (`experts.*`), coefficient MLP (`coef.*`): what export reads
    checksums.json           model.safetensors' SHA-256 and size, computed while it was written
    tokenizer.json, domains/ the data's tokenizer, embedder and centroids (Algorithm 3)
    train_state/state.json   step, param groups, every rank's sampler state
    train_state/optimizer/   AdamW's moments, one shard per rank (`sharded`: torch.distributed.checkpoint)
`RUN/checkpoints/latest` names the newest one. The last `keep_last` are kept. Training saves and
resumes through `sharded` (no rank gathers the model or the optimizer); this module owns the
directory, its export files and their checksums, and still reads the first layout, whose full
optimizer state sits in train_state/optimizer.safetensors (`restore_step`).

Resuming requires the same world size and accumulation (each rank's sampler streams are part of
the state) and the same config except the fields in `config.RESUME_MUTABLE`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from soup_train.config import RESUME_MUTABLE, RunConfig, flat_items, from_dict, to_dict
from soup_train.data.domains import copy_domain_files
from soup_train.distributed import unwrap
from soup_train.errors import CheckpointError, ConfigError, ResumeError
from soup_train.model.soup import SoupModel, meta_soup
from soup_train.staging import staged
from soup_train.stream import SafetensorsWriter

FORMAT = "soup-checkpoint-v1"
WEIGHTS, TOKENIZER = "model.safetensors", "tokenizer.json"  # a checkpoint's weights (what export reads) and tokenizer


def _full_state_dicts():
    """torch.distributed.checkpoint's state-dict API and the options every call here uses, imported
    on first use: it took 1.1 s of every export command's start-up, and only training needs it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    return get_state_dict, set_state_dict, StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class CheckpointInfo:
    """The JSON sidecar of a checkpoint (`config.json`)."""

    run: RunConfig
    domains: list[str]
    view: str
    natural: list[float]
    step: int

    def to_dict(self) -> dict:
        return {"format": FORMAT, "run": to_dict(self.run), "domains": self.domains, "view": self.view,
                "natural": self.natural, "step": self.step}


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def soup_tensor_names(model: nn.Module) -> list[str]:
    """Canonical tensor names of the soup (tied weights listed once)."""
    return [name for name, _ in unwrap(model).named_parameters()]


def collect_state(model: nn.Module, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts (collective under DDP/FSDP: call on every rank).

    With cpu_offload only rank 0 receives the tensors; other ranks get empty dicts.
    """
    get_state_dict, _, options = _full_state_dicts()
    model_sd, optim_sd = get_state_dict(model, optim, options=options)
    names = soup_tensor_names(model)
    return {k: model_sd[k].contiguous() for k in names if k in model_sd}, optim_sd


def soup_side_files(info: CheckpointInfo, data_dir: Path):
    """`side_files(tmp)` of a soup checkpoint: its config.json, the data's tokenizer and domain map."""
    def side_files(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        copy_domain_files(data_dir, tmp)

    return side_files


def write_checkpoint(run_dir: Path, info: CheckpointInfo, model_sd: dict, optim_sd: dict,
                     samplers: list[dict], data_dir: Path, keep_last: int) -> Path:
    """Write one soup checkpoint of the first layout atomically (one process holding the full state;
    training saves with `sharded.save_step`); prune to the last `keep_last`."""
    return write_step(run_dir, info.step, model_sd, optim_sd, {"samplers": samplers}, keep_last,
                      soup_side_files(info, data_dir))


def write_step(run_dir: Path, step: int, model_sd: dict, optim_sd: dict, state: dict, keep_last: int,
               side_files=None) -> Path:
    """Any model's resumable checkpoint `run_dir/checkpoints/step_N`, atomically; prunes old ones.

    `state` (JSON) joins the step and the optimizer's param groups in train_state/state.json;
    `side_files(tmp)` may add files before the directory is renamed into place.
    """
    final = step_dir(run_dir, step)
    with staged(final) as tmp:  # a failed save (a full disk, a kill) leaves the previous `latest` and no staging
        (tmp / "train_state").mkdir()
        if side_files is not None:
            side_files(tmp)
        write_weights(tmp / WEIGHTS, model_sd, {"format": FORMAT})
        tensors = {f"{p}::{name}": t.contiguous() for p, st in optim_sd["state"].items()
                   for name, t in st.items() if isinstance(t, torch.Tensor)}
        write_tensors(tmp / "train_state" / "optimizer.safetensors", tensors)
        record = {**state, "step": step, "param_groups": optim_sd["param_groups"]}
        (tmp / "train_state" / "state.json").write_text(json.dumps(record) + "\n")
    write_latest(run_dir, final.name)
    _prune(run_dir, keep_last)
    return final


CHECKSUMS = "checksums.json"  # {file name: {"sha256": hex digest, "bytes": size}}, beside the files


def write_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """A safetensors file written tensor by tensor (never a second copy of the state in memory) and
    hashed on the way; its SHA-256 and size are recorded in CHECKSUMS beside it, so that export
    never reads a bank once more only to hash it. Returns the digest."""
    digest = stream_tensors(path, _specs(tensors), tensors.items(), metadata, hashed=True)
    record_checksum(path, digest)
    return digest


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (its errors are OSErrors: a full disk is one line)."""
    stream_tensors(path, _specs(tensors), tensors.items())


def stream_tensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors,
                   metadata: dict[str, str] | None = None, hashed: bool = False) -> str | None:
    """The (name, tensor) pairs of `tensors`, made one at a time in the order of `specs`, as the
    safetensors file `path` (written to a temporary name, renamed when complete); its SHA-256 if
    `hashed`."""
    writer = SafetensorsWriter(path, specs, metadata, hashed=hashed)
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


def record_checksum(path: Path, digest: str) -> None:
    """Add `path`'s digest, size and modification time to the CHECKSUMS file of its directory (written
    to a temporary name and renamed)."""
    table = _checksums(path.parent)
    stat = path.stat()
    table[path.name] = {"sha256": digest, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    tmp = path.parent / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    tmp.replace(path.parent / CHECKSUMS)


def recorded_checksum(path: Path) -> dict | None:
    """What CHECKSUMS recorded for `path` when it was written ({sha256, bytes, mtime_ns}), or None (a
    checkpoint written before checksums were recorded). Whether the file is still as recorded is the
    caller's to judge, by its size and modification time."""
    entry = _checksums(path.parent).get(path.name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
        return None
    return entry


def _checksums(directory: Path) -> dict:
    try:
        table = json.loads((directory / CHECKSUMS).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / CHECKSUMS} is unreadable ({exc}); the checkpoint is corrupt: "
                              "copy it again, or delete that file to hash the weights instead") from None
    return table if isinstance(table, dict) else {}


def write_latest(run_dir: Path, name: str) -> None:
    latest = run_dir / "checkpoints" / "latest"
    tmp = latest.with_name(".latest.tmp")
    tmp.write_text(name + "\n")
    tmp.replace(latest)


def _prune(run_dir: Path, keep_last: int) -> None:
    """Keep the last `keep_last` checkpoints up to `latest` (one newer than `latest`, left by a kill
    between a save's rename and its `latest`, is neither counted nor deleted)."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.name <= latest)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = run_dir / "checkpoints" / latest.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{latest} names {path.name}, which does not exist; "
                              "delete the 'latest' file or restore the checkpoint")
    return path


def read_info(ckpt: Path) -> CheckpointInfo:
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a soup checkpoint (no config.json); pass a "
                              "directory like RUN/checkpoints/step_0000100 or a run directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    try:
        run = from_dict(RunConfig, data["run"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc.message}") from None
    missing = [k for k in ("domains", "view", "natural", "step") if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the checkpoint is corrupt or from another tool")
    return CheckpointInfo(run, data["domains"], data["view"], data["natural"], data["step"])


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from either itself or a run directory (its latest checkpoint)."""
    if (path / "config.json").is_file() and (path / WEIGHTS).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"no checkpoint at {path}; pass RUN or RUN/checkpoints/step_NNNNNNN")
    return found


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the checkpoint is missing or corrupt") from None


def load_soup(path: Path, device: str = "cpu") -> tuple[SoupModel, CheckpointInfo]:
    """The soup of a checkpoint (or a run's latest), ready for inference."""
    ckpt = resolve_checkpoint(path)
    info = read_info(ckpt)
    soup = meta_soup(info.run.model, info.run.soup, len(info.domains))  # no initial values: all are loaded
    soup.to_empty(device="cpu")
    soup.materialised()
    load_model_tensors(soup, read_tensors(ckpt / WEIGHTS), ckpt)
    return soup.to(device).eval(), info


def load_model_tensors(soup: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = soup_tensor_names(soup)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}/model.safetensors does not match its config.json: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    params = dict(unwrap(soup).named_parameters())
    with torch.no_grad():
        for name in expected:
            if params[name].shape != tensors[name].shape:
                raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                      f"config says {tuple(params[name].shape)}")
            params[name].copy_(tensors[name])


def check_resumable(saved: RunConfig, current: RunConfig, ckpt: Path) -> None:
    """Refuse to resume with a config that would change the run (clear message, all differences)."""
    old, new = flat_items(saved), flat_items(current)
    diffs = [f"{k}: checkpoint {old[k]!r}, now {new[k]!r}" for k in old
             if k not in RESUME_MUTABLE and old[k] != new.get(k)]
    if diffs:
        raise ResumeError(f"cannot resume from {ckpt} with a different config ({'; '.join(diffs)}); "
                          "use the original settings or start a new run with another --out")


def restore_train_state(ckpt: Path, model: nn.Module, optim: torch.optim.Optimizer,
                        world_size: int) -> tuple[int, list[dict]]:
    """Load a soup checkpoint's model + optimizer state (each rank its part); returns (step, sampler states)."""
    from soup_train.sharded import load_step

    state = json.loads((ckpt / "train_state" / "state.json").read_text())
    if len(state["samplers"]) != world_size:
        raise ResumeError(f"{ckpt} was written by {len(state['samplers'])} process(es), this run has "
                          f"{world_size}; resume with the same torchrun --nproc_per_node/--nnodes")
    state = load_step(ckpt, model, optim)
    return int(state["step"]), state["samplers"]


def restore_step(ckpt: Path, model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Load `write_step`'s model + optimizer state into a (wrapped) model; returns its state.json."""
    state = json.loads((ckpt / "train_state" / "state.json").read_text())
    model_sd = read_tensors(ckpt / WEIGHTS)
    for alias, name in tied_aliases(unwrap(model)).items():  # tied weights are stored once
        if name in model_sd:
            model_sd.setdefault(alias, model_sd[name])
    flat = read_tensors(ckpt / "train_state" / "optimizer.safetensors")
    optim_state: dict[str, dict] = {}
    for key, tensor in flat.items():
        param, name = key.split("::")
        optim_state.setdefault(param, {})[name] = tensor
    optim_sd = {"state": optim_state, "param_groups": state["param_groups"]}
    _, set_state_dict, options = _full_state_dicts()
    set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    return state


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: canonical name} for parameters that share another's tensor (tied embeddings)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != name}
