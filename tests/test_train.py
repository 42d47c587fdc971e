"""Training on the debug corpus: checkpoints, exact resume, incompatible resume, safe loading."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from soup_train.checkpoint import load_soup, read_info, resolve_checkpoint
from soup_train.config import apply_overrides
from soup_train.errors import CheckpointError, ConfigError, ResumeError
from soup_train.presets import run_preset
from soup_train.runlog import read_log
from soup_train.train import fit, lr_at

RESUME_TOL = 0.0  # a resumed run reproduces the uninterrupted one bit for bit on CPU


def debug_cfg(data, *overrides):
    cfg = run_preset("debug")
    cfg = replace(cfg, data=replace(cfg.data, path=str(data)))
    return apply_overrides(cfg, list(overrides))


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def debug_run(debug_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "debug"
    result = fit(debug_cfg(debug_data, "train.steps=30", "train.keep_last=2"), out, progress=False)
    return out, result


def test_training_lowers_the_loss_and_writes_checkpoints(debug_run):
    out, result = debug_run
    losses = train_losses(out)
    assert len(losses) == 30 and result.step == 30
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_0000020", "step_0000030"]  # keep_last=2 of 10, 20, 30
    ckpt = out / "checkpoints" / "step_0000030"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "domains/centroids.safetensors",
                 "domains/embedder.json", "train_state/optimizer/.metadata", "train_state/state.json"):
        assert (ckpt / name).is_file(), name
    info = read_info(ckpt)
    assert info.step == 30 and info.domains == result.domains and len(info.domains) >= 3
    keys = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("shared.") for k in keys) and any(k.startswith("experts.") for k in keys)
    assert not list(out.rglob("*.tmp"))  # nothing half-written left behind
    evals = [r for r in read_log(out / "log.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30] and set(evals[-1]["domains"]) == set(info.domains)


def test_loaded_checkpoint_reproduces_the_trained_soup(debug_run, debug_data):
    out, result = debug_run
    soup, info = load_soup(out)
    from soup_train.data.shards import DomainShards
    from soup_train.evaluate import evaluate_domains

    shards = DomainShards.open(debug_data, info.view, "test")
    t = info.run.train
    table = evaluate_domains(soup, shards, np.asarray(info.natural), t.eval_batches * t.batch_size,
                             t.batch_size, info.run.data.seq_len, torch.device("cpu"))
    for name, row in result.evaluation.items():
        assert abs(table[name]["own"] - row["own"]) <= 1e-5
        assert abs(table[name]["natural"] - row["natural"]) <= 1e-5


@pytest.mark.parametrize("extra", [(), ("train.grad_accum=2", "meta.h_per_micro_batch=true")])
def test_resume_reproduces_the_uninterrupted_loss_curve(debug_data, tmp_path, extra):
    overrides = ("train.steps=8", "train.ckpt_every=4", "train.log_every=1", *extra)
    whole = tmp_path / "whole"
    fit(debug_cfg(debug_data, *overrides), whole, progress=False)
    cut = tmp_path / "cut"
    first = fit(debug_cfg(debug_data, *overrides), cut, stop_after=6, progress=False)
    assert first.step == 6 and max(train_losses(cut)) == 6
    second = fit(debug_cfg(debug_data, *overrides), cut, progress=False)  # resumes at step 4
    assert second.step == 8 and len(second.losses) == 4
    a, b = train_losses(whole), train_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) for s in a) <= RESUME_TOL
    pa = load_file(str(whole / "checkpoints" / "step_0000008" / "model.safetensors"))
    pb = load_file(str(cut / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= RESUME_TOL


def test_resume_with_an_incompatible_config_fails_clearly(debug_data, tmp_path):
    fit(debug_cfg(debug_data, "train.steps=2", "train.ckpt_every=2"), tmp_path, progress=False)
    with pytest.raises(ResumeError, match=r"soup.n_experts: checkpoint 4, now 8"):
        fit(debug_cfg(debug_data, "train.steps=4", "soup.n_experts=8"), tmp_path, progress=False)
    # fields that may change on resume do not block it
    assert fit(debug_cfg(debug_data, "train.steps=3", "train.log_every=2"), tmp_path, progress=False).step == 3


def test_corrupt_or_missing_checkpoints_raise_named_errors(debug_run, tmp_path):
    out, _ = debug_run
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_soup(tmp_path)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out / "checkpoints" / "step_0000030", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_soup(broken)
    (broken / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_soup(broken)


def test_vocab_mismatch_and_bad_seq_len_are_config_errors(debug_data, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size=999"):
        fit(debug_cfg(debug_data, "model.vocab_size=999"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="exceeds the prepared windows"):
        fit(debug_cfg(debug_data, "data.seq_len=4096"), tmp_path, progress=False)


def test_learning_rate_schedule_warms_up_then_decays():
    t = run_preset("debug").train
    lrs = [lr_at(s, t) for s in range(t.steps)]
    assert lrs[0] == pytest.approx(t.lr / t.warmup_steps)
    assert lrs[t.warmup_steps - 1] == pytest.approx(t.lr)
    assert all(a >= b for a, b in zip(lrs[t.warmup_steps:], lrs[t.warmup_steps + 1:]))
    assert lr_at(t.steps, t) == pytest.approx(t.lr * t.min_lr_ratio)


def test_run_config_json_travels_with_the_run(debug_run):
    out, _ = debug_run
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["model"]["vocab_size"] > 0 and saved["run"]["data"]["seq_len"] > 0


@pytest.mark.parametrize("per_micro", [False, True])
def test_h_per_micro_batch_draws_one_h_per_micro_batch(debug_data, tmp_path, monkeypatch, per_micro):
    import soup_train.train as train_mod

    seen = []
    original = train_mod.optimizer_step

    def recording(model, optim, batches, h, *args, **kwargs):
        seen.append([x.clone() for x in h])
        return original(model, optim, batches, h, *args, **kwargs)

    monkeypatch.setattr(train_mod, "optimizer_step", recording)
    cfg = debug_cfg(debug_data, "train.steps=3", "train.grad_accum=3", f"meta.h_per_micro_batch={str(per_micro).lower()}",
                    "train.ckpt_every=3")
    fit(cfg, tmp_path, progress=False)
    from soup_train.data.sampler import _H_STREAM, MetaDistribution, _rng

    meta, rng = MetaDistribution(cfg.meta, np.asarray(read_info(resolve_checkpoint(tmp_path)).natural)), _rng(cfg.train.seed, _H_STREAM, 0)
    draws = [meta.sample(rng) for _ in range(9)]  # this rank's h stream
    expected = [draws[3 * i:3 * i + 3] if per_micro else [draws[i]] * 3 for i in range(3)]
    assert len(seen) == 3
    for got, want in zip(seen, expected):
        assert len(got) == 3 and all(np.allclose(g.numpy(), w, atol=1e-7) for g, w in zip(got, want))


def test_weight_decay_groups_are_the_same_single_under_ddp_and_under_fsdp():
    """Decay is judged by the soup's own names: DDP's `module.` prefix must not move the experts'
    norm banks into the decayed group (one gloo process in a group of one)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from soup_train.config import ModelConfig, SoupConfig
    from soup_train.model.soup import SoupModel
    from soup_train.train import param_groups

    def groups(model, names) -> list[set[str]]:
        by_id = {id(p): n for n, p in names}
        return [{by_id[id(p)] for p in g["params"]} for g in param_groups(model, 0.1)]

    def soup():
        torch.manual_seed(0)
        return SoupModel(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64),
                         SoupConfig(n_experts=2), 3)

    single = soup()
    want = groups(single, single.named_parameters())
    assert any(n.startswith("experts.") and "norm" in n for n in want[1])  # norm banks: not decayed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = soup()
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        assert groups(ddp, inner.named_parameters()) == want
        fsdp = fully_shard(soup())
        assert groups(fsdp, fsdp.named_parameters()) == want
    finally:
        dist.destroy_process_group()


def test_fsdp_builds_its_mesh_on_the_runs_device_even_where_a_gpu_is_visible(monkeypatch):
    import torch.distributed as dist

    from soup_train.config import ModelConfig, SoupConfig
    from soup_train.distributed import DistEnv, wrap
    from soup_train.model.soup import SoupModel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # a GPU host, device=cpu
        env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
        model = wrap(SoupModel(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64),
                               SoupConfig(n_experts=2), 3), env, "fsdp")
        meshes = {p.device_mesh.device_type for p in model.parameters()}
        assert meshes == {"cpu"}
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_the_first_layout_still_resumes_exactly(debug_data, tmp_path, monkeypatch):
    """A run saved by the first layout (the full optimizer state in train_state/optimizer.safetensors,
    written by one process) resumes under the sharded layout and continues the same loss curve."""
    from soup_train import checkpoint as ckpt_io
    from soup_train.train import Trainer

    overrides = ("train.steps=6", "train.ckpt_every=3", "train.log_every=1", "train.eval_every=0")
    whole = tmp_path / "whole"
    fit(debug_cfg(debug_data, *overrides), whole, progress=False)

    def first_layout_save(self):
        model_sd, optim_sd = ckpt_io.collect_state(self.model, self.optim)
        info = ckpt_io.CheckpointInfo(self.cfg, self.train_shards.names, self.cfg.data.domains,
                                      [float(x) for x in self.natural], self.step)
        return ckpt_io.write_checkpoint(self.out, info, model_sd, optim_sd, [self.sampler.state_dict()],
                                        self.data_dir, self.cfg.train.keep_last)

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", first_layout_save)
        fit(debug_cfg(debug_data, *overrides), cut, stop_after=3, progress=False)
    assert (cut / "checkpoints" / "step_0000003" / "train_state" / "optimizer.safetensors").is_file()
    fit(debug_cfg(debug_data, *overrides), cut, progress=False)  # resumes at step 3 from the first layout
    a, b = train_losses(whole), train_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) <= RESUME_TOL
    assert (cut / "checkpoints" / "step_0000006" / "train_state" / "optimizer" / ".metadata").is_file()


def test_evaluation_instantiates_theta_once_per_h_and_splits_the_domains_over_ranks(debug_run, debug_data,
                                                                                    monkeypatch):
    """k domains cost k + 1 instantiations (the natural mix once), the losses are the soup forward's own,
    and rank r of a world of 2 evaluates domains r, r + 2, ...: together, the whole table."""
    from soup_train.data.shards import DomainShards
    from soup_train.distributed import DistEnv
    from soup_train.evaluate import evaluate_domains, loss_at, one_hot
    from soup_train.model.soup import SoupModel

    out, _ = debug_run
    soup, info = load_soup(out)
    shards = DomainShards.open(debug_data, info.view, "test")
    t, k = info.run.train, len(info.natural)
    args = (np.asarray(info.natural), t.eval_batches * t.batch_size, t.batch_size, info.run.data.seq_len,
            torch.device("cpu"))
    calls, real = [], SoupModel.dense_model
    monkeypatch.setattr(SoupModel, "dense_model", lambda self, h, *a: calls.append(h) or real(self, h, *a))
    table = evaluate_domains(soup, shards, *args)
    assert len(calls) == k + 1 and len(table) == k
    for i, name in enumerate(shards.names):  # the soup's own forward, instantiating per batch
        windows = shards.arrays[i][:t.eval_batches * t.batch_size]
        assert table[name]["own"] == loss_at(soup, windows, one_hot(k, i), *args[2:])
        assert table[name]["natural"] == loss_at(soup, windows, np.asarray(info.natural), *args[2:])
    parts = [evaluate_domains(soup, shards, *args, env=DistEnv(r, 2, r, torch.device("cpu"), None)) for r in (0, 1)]
    assert list(parts[0]) == shards.names[0::2] and list(parts[1]) == shards.names[1::2]
    assert {**parts[0], **parts[1]} == table
