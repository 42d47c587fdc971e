"""Two gloo processes on CPU under torchrun: in sync, checkpoint/resume, and equal to one process.

Tolerance of the 2-process vs 1-process comparison: DDP averages the two ranks' gradients with
an all-reduce ((g0 + g1) / 2) while one process accumulates g0 / 2 + g1 / 2. The rounding differs
in the last bits, and AdamW divides by sqrt(v): on parameters whose gradient is close to zero
(coefficient-MLP biases early on) a last-bit difference moves the update by a visible fraction of
lr. After 5 steps at lr 3e-3 we measured 3.3e-5; the bound is 1e-4 (lr / 30). A negative control
(the same run with another seed) must differ by far more, so the test can fail.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from procs import run_command
from safetensors.torch import load_file

from soup_train.runlog import read_log

DRIVER = Path(__file__).with_name("dist_driver.py")
FIXED = "meta.fixed_h=1,1,1"  # the debug corpus has 3 domains
SAME_PARAMS_TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, data: Path, out: Path, *overrides: str, stop_after: str = "none") -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(DRIVER),
           str(data), str(out), stop_after, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_command(cmd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def params(path: Path) -> dict:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if r["kind"] == "train"}


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_resume_exactly(debug_data, tmp_path):
    common = ("train.steps=6", "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    launch(2, debug_data, whole, *common)
    assert max_diff(params(whole / "params_rank0.safetensors"), params(whole / "params_rank1.safetensors")) == 0.0
    launch(2, debug_data, cut, *common, stop_after="3")  # checkpoint at step 2, killed after 3
    launch(2, debug_data, cut, *common)  # resumes at step 2
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    assert max_diff(params(whole / "params_rank0.safetensors"), params(cut / "params_rank1.safetensors")) <= 1e-6
    state = (cut / "checkpoints" / "step_0000006" / "train_state" / "state.json").read_text()
    assert state.count('"slots"') == 2  # both ranks' sampler states are saved


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(debug_data, tmp_path):
    common = ("train.steps=5", "train.log_every=1", "train.eval_every=0", "train.batch_size=4", FIXED)
    launch(2, debug_data, tmp_path / "ddp", *common, "train.grad_accum=1")
    launch(1, debug_data, tmp_path / "single", *common, "train.grad_accum=2")
    ddp, single = params(tmp_path / "ddp" / "params_rank0.safetensors"), params(tmp_path / "single" / "params_rank0.safetensors")
    assert max_diff(ddp, single) <= SAME_PARAMS_TOL
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5
    launch(1, debug_data, tmp_path / "control", *common, "train.grad_accum=2", "train.seed=1")
    control = params(tmp_path / "control" / "params_rank0.safetensors")
    assert max_diff(ddp, control) > 30 * SAME_PARAMS_TOL


@pytest.mark.slow
def test_resume_under_a_different_world_size_is_refused(debug_data, tmp_path):
    launch(2, debug_data, tmp_path / "run", "train.steps=2", "train.ckpt_every=2", "train.eval_every=0")
    cmd = [sys.executable, str(DRIVER), str(debug_data), str(tmp_path / "run"), "none", "train.steps=4",
           "train.ckpt_every=2", "train.eval_every=0"]
    proc = run_command(cmd)
    assert proc.returncode != 0 and "written by 2 process(es), this run has 1" in proc.stderr


@pytest.mark.slow
def test_a_stop_asked_of_one_rank_is_agreed_by_every_rank(debug_data, tmp_path):
    """SIGTERM reaches rank 1 alone after step 3: both ranks stop at step 3 and save it together (each
    rank deciding alone would leave rank 1 in the save's collectives and rank 0 in step 4's: a hang)."""
    run = tmp_path / "run"
    launch(2, debug_data, run, "train.steps=8", "train.ckpt_every=100", "train.eval_every=0", "train.log_every=1",
           stop_after="sigterm-rank1@3")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert max(losses(run)) == 3 and max_diff(params(run / "params_rank0.safetensors"),
                                              params(run / "params_rank1.safetensors")) == 0.0


# a soup of about 240 MB (fp32) and twice that in AdamW moments, over two FSDP2 ranks
BIG = ("model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=1024",
       "soup.n_experts=12")
SAVE_MARGIN = 96 << 20  # bytes: the writer's buffers, DCP's bookkeeping, allocator slack


@pytest.mark.slow
def test_a_save_holds_rank_0_to_its_shard_and_one_tensor(debug_data, tmp_path):
    """While two FSDP2 ranks save, rank 0's resident memory grows by at most one rank's shard of the
    largest tensor and a fixed margin: the weights reach rank 0 one rank's rows at a time, the
    optimizer's moments are written by each rank from its own shard (gathering the full state on rank 0 grew it by the whole soup and
    its moments: 445 MB more on rank 0, measured here)."""
    run = tmp_path / "run"
    launch(2, debug_data, run, "train.steps=1", "train.ckpt_every=100", "train.eval_every=0", "train.log_every=1",
           "train.parallel=fsdp", "train.batch_size=2", *BIG, stop_after="measure-save")
    import json

    m = json.loads((run / "save_memory_rank0.json").read_text())
    growth = m["peak"] - m["before"]
    assert m["soup"] > 200e6 and m["shard"] > m["soup"]  # a shard of the soup and of its 2 moments
    assert growth <= m["largest"] / 2 + SAVE_MARGIN, (growth, m)
    assert m["full_gathers"] == 0  # each rank's rows reach rank 0 in turn: no tensor is gathered whole
    assert (run / "checkpoints" / "step_0000001" / "train_state" / "optimizer" / ".metadata").is_file()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_save_failing_on_rank_0_alone_fails_every_rank_without_a_hang(debug_data, tmp_path, parallel):
    """Rank 0's disk fills up as it closes the weights file: every rank agrees and stops with an error
    (rank 0's own, the others naming the failed save) instead of waiting in the optimizer's collectives;
    no staging directory is left."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(DRIVER), str(debug_data), str(run), "rank0-disk-full",
           "train.steps=2", "train.ckpt_every=2", "train.eval_every=0", f"train.parallel={parallel}"]
    proc = run_command(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr and "another rank failed to save step 2" in proc.stderr
    assert "Timeout" not in proc.stderr and not list((run / "checkpoints").glob(".*"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_data_error_on_one_rank_stops_every_rank_with_its_message(debug_data, tmp_path, parallel):
    """Rank 1 cannot read its batch of step 3: rank 1 raises its own error and rank 0 stops at the same
    step naming rank 1 and the error, instead of waiting in the step's collectives until a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(DRIVER), str(debug_data), str(tmp_path / "run"), "bad-data-rank1@3",
           "train.steps=5", "train.ckpt_every=10", "train.eval_every=0", f"train.parallel={parallel}"]
    proc = run_command(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert ("rank 1 failed reading its batch of step 3: OSError: [Errno 5] Input/output error: "
            "'data/train/code.bin'") in proc.stderr, proc.stderr[-3000:]
    assert "Timeout" not in proc.stderr and "timed out" not in proc.stderr


def test_ranks_wait_for_a_save_with_a_timeout_sized_for_it(debug_data, tmp_path):
    """The ranks that do not write wait for the writer at a barrier with a timeout sized for the
    checkpoint (here cut to 2 s while rank 0 takes 8 s to commit): rank 1 fails with a message rather
    than hang or wait inside the next step's collective."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(DRIVER), str(debug_data), str(tmp_path / "run"), "slow-writer",
           "train.steps=2", "train.ckpt_every=2", "train.eval_every=0"]
    proc = run_command(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "rank 1 waited 2 s for the other ranks at the end of the save of step 2" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes(debug_data, tmp_path):
    common = ("train.steps=4", "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0")
    launch(2, debug_data, tmp_path / "ddp", *common)
    launch(2, debug_data, tmp_path / "fsdp", *common, "train.parallel=fsdp", stop_after="3")
    launch(2, debug_data, tmp_path / "fsdp", *common, "train.parallel=fsdp")  # resumes at step 2
    ddp, fsdp = params(tmp_path / "ddp" / "params_rank0.safetensors"), params(tmp_path / "fsdp" / "params_rank0.safetensors")
    assert max_diff(ddp, fsdp) <= SAME_PARAMS_TOL
    assert max_diff(fsdp, params(tmp_path / "fsdp" / "params_rank1.safetensors")) == 0.0


def test_a_failing_run_frees_its_model_before_the_process_group(monkeypatch):
    """A run that raises must not keep its wrapped model alive (through its traceback) until after
    the process group is destroyed: that order hangs gloo at exit (see `teardown`)."""
    import gc
    import weakref

    import torch

    from soup_train import distributed as D

    models = []

    class Runner:
        def __init__(self):
            self.model = torch.nn.Linear(2, 2)
            models.append(weakref.ref(self.model))

        def run(self):
            raise RuntimeError("boom")

    alive_at_teardown = []
    monkeypatch.setattr(D, "setup", lambda device: D.DistEnv(0, 2, 0, torch.device("cpu"), "gloo"))
    monkeypatch.setattr(D, "teardown", lambda env: (gc.collect(), alive_at_teardown.append(models[0]() is not None)))
    with pytest.raises(RuntimeError, match="boom") as info:
        with D.process_group("cpu"):
            Runner().run()
    assert alive_at_teardown == [False]
    assert "Runner" not in str(info.value) and info.traceback[-1].name == "run"  # the traceback still says where
