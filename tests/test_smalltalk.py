"""SmallTalk LM training: balanced assignment, routing, EM, independent and resumable expert jobs."""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from procs import run_command
from safetensors.torch import load_file

from soup_train.cli import main
from soup_train.config import apply_overrides
from soup_train.smalltalk.config import smalltalk_preset
from soup_train.smalltalk.routing import balanced_assign, capacity, prefix_scores, purity, route
from soup_train.smalltalk.run import SmallTalkRun


def new_run(data: Path, out: Path, *overrides: str) -> SmallTalkRun:
    cfg = smalltalk_preset("debug")
    cfg = apply_overrides(replace(cfg, data=replace(cfg.data, path=str(data))), list(overrides))
    return SmallTalkRun.create(out, cfg)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- assignment and routing
@pytest.mark.parametrize("seed", range(5))
def test_balanced_assignment_respects_capacity_and_serves_the_most_confident_first(seed):
    rng = np.random.default_rng(seed)
    n, e = 103, 4
    scores = rng.normal(size=(n, e)) + np.array([1.5, 0.0, -0.5, 0.2])  # router 0 is everyone's favourite
    cap = capacity(n, e)
    got = balanced_assign(scores, cap)
    assert cap == 26 and np.bincount(got, minlength=e).max() <= cap and len(got) == n
    confidence = scores.max(1)
    for i in range(n):
        best = scores[i].argmax()
        if got[i] != best:
            # sent elsewhere only because its favourite filled up with more confident sequences
            holders = np.flatnonzero(got == best)
            assert len(holders) == cap and confidence[holders].min() >= confidence[i]
            # and the router it got is its best among those with room when its turn came
            better = [r for r in range(e) if scores[i, r] > scores[i, got[i]]]
            for r in better:
                assert np.sum(got == r) == cap and confidence[got == r].min() >= confidence[i]


def test_balanced_assignment_orders_by_confidence_not_by_position():
    scores = np.array([[-3.0, -9.0], [-1.0, -9.0], [-2.0, -2.5]])  # all prefer router 0, capacity 2
    assert balanced_assign(scores, 2).tolist() == [1, 0, 0]  # the least confident (row 0) moves
    assert balanced_assign(scores, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assign(scores, 1)


def test_inference_routing_is_the_plain_argmax_without_balancing():
    scores = np.array([[-1.0, -2.0], [-1.5, -3.0], [-0.5, -4.0], [-3.0, -2.0]])
    assert route(scores).tolist() == [0, 0, 0, 1]
    labels = np.array([0, 0, 1, 1])
    assert purity(route(scores), labels, 2) == pytest.approx(3 / 4)


def test_prefix_scores_match_transformers_loglik(smalltalk_run):
    from transformers import LlamaConfig, LlamaForCausalLM

    run = SmallTalkRun.open(smalltalk_run)
    routers = run.load_routers()
    windows = run.pool("test").take(np.arange(0, 40, 3))
    got = prefix_scores(routers, windows, run.prefix_len, batch=4)
    m = run.prefix_len
    for e, router in enumerate(routers):
        hf = LlamaForCausalLM(LlamaConfig(**run.config.router.to_hf())).eval()
        hf.load_state_dict(router.state_dict())
        x = torch.as_tensor(windows[:, :m + 1])
        with torch.no_grad():
            logp = torch.log_softmax(hf(x[:, :-1]).logits, -1).gather(-1, x[:, 1:, None])[..., 0]
        assert np.abs(got[:, e] - logp.mean(1).numpy()).max() <= 1e-5
    short = prefix_scores(routers, windows[:, :4], m)  # shorter than the prefix: uses what there is
    assert short.shape == got.shape and not np.allclose(short, got)


# ----------------------------------------------------------------------------- EM
def test_em_rounds_are_balanced_saved_and_resume_exactly(debug_data, tmp_path):
    from soup_train.smalltalk.routers import train_routers

    whole = new_run(debug_data, tmp_path / "whole", "em.rounds=3")
    history = train_routers(whole, progress=False)
    assert len(history) == 3
    for r in range(4):
        a = np.load(whole.round_dir(r) / "assignment.npz")
        assert len(a["sequences"]) == 64 and np.bincount(a["routers"], minlength=2).tolist() == [32, 32]
        assert len(np.unique(a["sequences"])) == 64  # fresh sequences, no repeats within a round
    assert all(whole.router_file(e).is_file() for e in range(2))

    cut = new_run(debug_data, tmp_path / "cut", "em.rounds=3")
    train_routers(cut, progress=False, stop_after=1)
    assert not cut.router_file(0).is_file()
    train_routers(SmallTalkRun.open(cut.path), progress=False)
    for e in range(2):
        a, b = load_file(str(whole.router_file(e))), load_file(str(cut.router_file(e)))
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = new_run(debug_data, tmp_path / "other", "em.rounds=3", "router_train.seed=1")  # negative control
    train_routers(other, progress=False)
    a, b = load_file(str(whole.router_file(0))), load_file(str(other.router_file(0)))
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_budget_assignment_is_balanced_over_the_whole_pool(smalltalk_run):
    import json

    run = SmallTalkRun.open(smalltalk_run)
    parts = [np.load(run.assign_file(e)) for e in range(run.experts)]
    pool = run.pool("train")
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(pool)))  # budget 0 = every window, once
    assert max(len(p) for p in parts) <= capacity(len(pool), run.experts)
    summary = json.loads((run.path / "assign" / "summary.json").read_text())
    assert summary["sequences"] == len(pool) and sum(sum(v) for v in summary["by_domain"].values()) == len(pool)


# ----------------------------------------------------------------------------- expert jobs
def assigned_run(debug_data: Path, out: Path, *overrides: str) -> SmallTalkRun:
    from soup_train.smalltalk.routers import assign_budget, train_routers

    run = new_run(debug_data, out, "em.rounds=1", *overrides)
    train_routers(run, progress=False)
    assign_budget(run)
    return run


def test_expert_jobs_are_independent_and_a_killed_one_resumes_alone(debug_data, tmp_path):
    from soup_train.smalltalk.experts import train_expert

    run = assigned_run(debug_data, tmp_path / "run")
    train_expert(run, 1, progress=False)
    expert1 = tree_digest(run.expert_dir(1))

    train_expert(run, 0, progress=False, stop_after=5)  # "killed" after step 5 (checkpoint written)
    assert not run.expert_file(0).is_file() and run.missing_experts() == [0]
    train_expert(run, 0, progress=False)  # resumes alone
    assert tree_digest(run.expert_dir(1)) == expert1  # the other expert is untouched

    fresh = assigned_run(debug_data, tmp_path / "fresh")  # expert 0 alone, uninterrupted, no expert 1
    (fresh.assign_file(1)).unlink()  # an expert job needs nothing of the others
    train_expert(fresh, 0, progress=False)
    a, b = load_file(str(run.expert_file(0))), load_file(str(fresh.expert_file(0)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(run.expert_file(1)))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # experts differ: different data and init


def test_parallel_launch_equals_one_job_at_a_time(debug_data, tmp_path):
    from soup_train.smalltalk.experts import train_expert
    from soup_train.smalltalk.launch import launch_local

    seq = assigned_run(debug_data, tmp_path / "seq")
    for e in range(2):
        train_expert(seq, e, progress=False)
    par = assigned_run(debug_data, tmp_path / "par")
    assert sorted(launch_local(par, parallel=2, threads=1, echo=lambda s: None)) == [0, 1]
    for e in range(2):
        a, b = load_file(str(seq.expert_file(e))), load_file(str(par.expert_file(e)))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert launch_local(par, parallel=2, echo=lambda s: None) == []  # finished experts are skipped


@pytest.mark.slow
def test_each_expert_is_its_own_torchrun_job_with_its_own_process_group(debug_data, tmp_path):
    import json

    from soup_train.smalltalk.launch import expert_argv

    run = assigned_run(debug_data, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for e in range(2):  # each expert data parallel over 2 ranks, as its own torchrun
        argv = expert_argv(run, e, nproc=2)
        assert argv[0] == "torchrun" and "--standalone" in argv  # a rendezvous of its own
        # One job after the other: two concurrent standalone torchruns each pick a free port for their
        # workers by binding and releasing it, and on a busy machine both can pick the same one.
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:], "--quiet"]
        proc = run_command(argv, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for e in range(2):
        job = json.loads((run.expert_dir(e) / "job.json").read_text())
        assert job["world_size"] == 2 and job["name"] == f"expert_{e:02d}"  # 2 ranks each, not 4


def test_an_expert_trained_with_fsdp_is_saved_whole(debug_data, tmp_path):
    """Under FSDP2 an expert's parameters are shards: every rank joins the gathers and rank 0 writes
    the whole model, which loads with its config's shapes (rank 0 alone had saved its shards, or hung)."""
    from soup_train.smalltalk.launch import expert_argv
    from soup_train.smalltalk.run import load_model

    run = assigned_run(debug_data, tmp_path / "run", "expert_train.parallel=fsdp")
    argv = expert_argv(run, 0, nproc=2)
    argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:], "--quiet"]
    proc = run_command(argv, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_model(run.config.expert, run.expert_file(0))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_job_refuses_to_resume_with_another_config(debug_data, tmp_path):
    from soup_train.errors import ResumeError
    from soup_train.smalltalk.experts import train_expert

    run = assigned_run(debug_data, tmp_path / "run")
    train_expert(run, 0, progress=False, stop_after=3)
    changed = replace(run, config=apply_overrides(run.config, ["expert_train.lr=1e-2"]))
    with pytest.raises(ResumeError, match="another job configuration"):
        train_expert(changed, 0, progress=False)


# ----------------------------------------------------------------------------- inference and CLI
def test_routed_evaluation_uses_the_argmax_expert_on_the_whole_sequence(smalltalk_run):
    from soup_train.smalltalk.mixture import Mixture, evaluate, sequence_nll, test_windows

    run = SmallTalkRun.open(smalltalk_run)
    mix = Mixture.load(run)
    windows, labels = test_windows(run, per_domain=10)
    report = evaluate(run, mix, windows, labels)
    chosen = route(prefix_scores(mix.routers, windows, run.prefix_len))
    nll = np.array([sequence_nll(mix.experts[c], windows[i:i + 1])[0] for i, c in enumerate(chosen)])
    assert report["ppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-6)
    assert report["shares"] == pytest.approx(np.bincount(chosen, minlength=2) / len(chosen))
    assert set(report["per_domain"]) == set(run.domains)


def test_cli_pipeline_and_errors(smalltalk_run, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["smalltalk", "eval", str(smalltalk_run), "--per-domain", "5", "--prefix-len", "4"])
    assert r.exit_code == 0 and "prefix    4: perplexity" in r.output, r.output
    (tmp_path / "t.txt").write_text("It is a truth universally acknowledged, that a single man")
    r = runner.invoke(main, ["smalltalk", "route", str(smalltalk_run), str(tmp_path / "t.txt")])
    assert r.exit_code == 0 and "t.txt: expert " in r.output, r.output
    r = runner.invoke(main, ["smalltalk", "launch", str(smalltalk_run), "--torchrun", "8"])
    assert r.exit_code == 0 and "0 independent expert jobs" in r.output  # all trained: nothing pending
    r = runner.invoke(main, ["smalltalk", "expert", str(smalltalk_run), "--index", "7"])
    assert r.exit_code != 0 and "out of range" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["smalltalk", "assign", str(tmp_path)])
    assert r.exit_code != 0 and "is not a SmallTalk run" in r.output
    r = runner.invoke(main, ["smalltalk", "routers", "--data", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "is not a data directory" in r.output


def test_torchrun_script_lists_one_job_per_pending_expert(debug_data, tmp_path):
    from soup_train.smalltalk.launch import torchrun_script

    run = assigned_run(debug_data, tmp_path / "run")
    lines = torchrun_script(run, nproc=8, nnodes=2).splitlines()[1:]
    assert len(lines) == 2 and all("--nproc-per-node=8" in line and "--nnodes=2" in line for line in lines)
    assert "--rdzv-id=soup-expert-00" in lines[0] and "--rdzv-id=soup-expert-01" in lines[1]


def test_local_expert_jobs_are_spread_over_the_visible_gpus(debug_data, tmp_path, monkeypatch):
    """Each local job gets one visible GPU (CUDA_VISIBLE_DEVICES), the least busy: two parallel jobs on
    two GPUs, one each; with more jobs than GPUs they share them in turn; without GPUs nothing is set."""
    import subprocess

    from soup_train.smalltalk import launch

    run = new_run(debug_data, tmp_path / "run", "em.rounds=1", "em.experts=3")
    envs = []

    class Done:  # a child that has finished at once
        returncode = 0

        def __init__(self, argv, env):
            envs.append(env.get("CUDA_VISIBLE_DEVICES"))

        def poll(self):
            return 0

    monkeypatch.setattr(launch, "pending", lambda run: [0, 1, 2])
    monkeypatch.setattr(subprocess, "Popen", Done)
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert launch.launch_local(run, parallel=2, threads=1, echo=lambda s: None) == [0, 1, 2]
    assert envs[:2] == ["4", "5"] and envs[2] in ("4", "5")
    envs.clear()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPUs
    launch.launch_local(run, parallel=2, threads=1, echo=lambda s: None)
    assert envs == [None, None, None]
