"""Launch every expert job: locally one after another or several at once, or as torchrun commands.

Each expert is its own process (its own torchrun on a cluster, hence its own process group and
rendezvous): experts never communicate, a failed or killed expert is rerun alone and resumes
from its checkpoint, and finished experts are skipped.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from soup_train.errors import SoupError
from soup_train.smalltalk.run import SmallTalkRun


def pending(run: SmallTalkRun) -> list[int]:
    return run.missing_experts()


def expert_argv(run: SmallTalkRun, e: int, *, nproc: int = 0, nnodes: int = 1) -> list[str]:
    """The command of one expert job: plain Python, or torchrun with a rendezvous of its own."""
    job = ["-m", "soup_train.cli", "smalltalk", "expert", str(run.path), "--index", str(e)]
    if nproc <= 0:
        return [sys.executable, *job]
    rdzv = ["--standalone"] if nnodes == 1 else [
        f"--nnodes={nnodes}", "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT",
        f"--rdzv-id=soup-expert-{e:02d}"]
    return ["torchrun", *rdzv, f"--nproc-per-node={nproc}", *job]


def torchrun_script(run: SmallTalkRun, nproc: int, nnodes: int = 1) -> str:
    """One torchrun command per pending expert, for a cluster scheduler (one job each)."""
    lines = [f"# {len(pending(run))} independent expert jobs of {run.path}; submit each as its own job"]
    for e in pending(run):
        lines.append(" ".join(a if a.startswith("--rdzv-endpoint") else shlex.quote(a)
                              for a in expert_argv(run, e, nproc=nproc, nnodes=nnodes)))
    return "\n".join(lines)


def launch_local(run: SmallTalkRun, parallel: int = 1, threads: int = 0, echo=print) -> list[int]:
    """Run the pending experts as child processes, `parallel` at a time; returns the trained indices.

    Each child gets `threads` torch threads (default: the CPU count divided by `parallel`) and, on a
    machine with GPUs, one of them (`CUDA_VISIBLE_DEVICES`, the least busy of the visible ones), so
    that parallel jobs do not all land on GPU 0. A failed job stops the launch after the running ones
    finish; rerunning resumes it.
    """
    todo = pending(run)
    threads = threads or max(1, (os.cpu_count() or 1) // max(parallel, 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a child is never part of the launcher's process group
    gpus = visible_gpus()
    running: dict[int, subprocess.Popen] = {}
    on_gpu: dict[int, str] = {}
    done, failed = [], []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < parallel and not failed:
            e = queue.pop(0)
            argv = expert_argv(run, e) + ["--threads", str(threads), "--quiet"]
            job_env = env
            if gpus:  # the visible GPU with the fewest running jobs
                on_gpu[e] = min(gpus, key=lambda g: (sum(x == g for x in on_gpu.values()), gpus.index(g)))
                job_env = {**env, "CUDA_VISIBLE_DEVICES": on_gpu[e]}
            echo(f"expert {e}: started ({' '.join(argv[1:])})" + (f" on GPU {on_gpu[e]}" if gpus else ""))
            running[e] = subprocess.Popen(argv, env=job_env)
        if failed:
            queue.clear()
        for e, proc in list(running.items()):
            if proc.poll() is not None:
                del running[e]
                on_gpu.pop(e, None)
                (done if proc.returncode == 0 else failed).append(e)
                echo(f"expert {e}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'}")
        time.sleep(0.2)
    if failed:
        raise SoupError(f"expert job(s) {', '.join(map(str, failed))} failed; fix the cause and rerun "
                        f"`soup-train smalltalk launch {run.path}` (finished experts are skipped, the rest resume)")
    return done


def visible_gpus() -> list[str]:
    """The GPUs this process may give its jobs: `CUDA_VISIBLE_DEVICES`'s entries if it is set, else
    every CUDA device torch sees (none on a machine without them)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
