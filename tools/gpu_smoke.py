"""Smoke run of training on every GPU torchrun is given: FSDP2, bf16, save, resume, export.

A scaled-down `paper-110m`: the preset's per-layer shapes (d_model 768, d_ff 2048, 12 heads) with
`--layers` layers and `--experts` experts, on the debug corpus (prepared here, offline). Its
tokenizer has 512 tokens and its windows 32: the embedding's bank and the activations, which
dominate the preset's memory at 32,000 tokens and 1,024 positions, are far smaller here, so the
comparison with the estimate checks the layers' slices and the sharded state. In order:

1. `soup-train fit` under torchrun, FSDP2, bf16 autocast on CUDA, for half the steps (a checkpoint);
2. the same command with all the steps: it resumes from that checkpoint;
3. step time, tokens/s and the peak memory per GPU (`max_memory_allocated`, the run log's
   `peak_memory_gib`) beside the dry run's estimate for the same shapes (`soup_train.sizing.memory`);
4. `soup-export build` of one specialist with every parity stage.

Without a GPU the same runs on `--cpu-procs` gloo processes in fp32 (the test suite runs it with
`--small`: d_model 128); the CUDA-only parts (bf16, `max_memory_allocated`) say they were skipped.

    bash tools/gpu_smoke.sh                    # every visible GPU, 2 layers, 8 experts, 20 steps
    bash tools/gpu_smoke.sh --layers 4 --experts 32
    bash tools/gpu_smoke.sh --small --steps 4  # CPU, two gloo processes: what the tests run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict | None = None) -> str:
    """Run a command, its output printed; a failure ends the smoke run with its output's tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(args) -> list[str]:
    """`--set` arguments of the scaled-down preset."""
    sets = [f"model.n_layers={args.layers}", f"soup.n_experts={args.experts}", "model.vocab_size=0",
            "data.seq_len=0", "data.domains=sources", "train.eval_every=0", "train.log_every=1",
            f"train.batch_size={args.batch_size}", "train.parallel=fsdp", "train.warmup_steps=2"]
    if args.small:
        sets += ["model.n_kv_heads=4", "model.n_heads=4", "model.d_model=128", "model.d_ff=512"]
    return sets


def fit(args, data: Path, out: Path, steps: int, nproc: int, device: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(BIN / "soup-train"), "fit", "--preset", "paper-110m", "--data", str(data),
           "--out", str(out), "--no-progress", *sum((["--set", s] for s in overrides(args)), []),
           "--set", f"train.steps={steps}", "--set", f"train.ckpt_every={max(1, steps)}",
           "--set", f"train.device={device}"]
    run(cmd, {"OMP_NUM_THREADS": "1"} if device == "cpu" else None)


def estimate(run_dir: Path, nproc: int, device: str) -> float:
    """The dry run's bytes per GPU under FSDP2 for the run's own resolved config."""
    from soup_train.config import RunConfig, from_dict
    from soup_train.sizing import memory, soup_counts

    record = json.loads((run_dir / "config.json").read_text())
    cfg = from_dict(RunConfig, record["run"])
    cfg = replace(cfg, train=replace(cfg.train, precision="auto"))
    return memory(cfg, soup_counts(cfg, len(record["domains"])), nproc, device)["fsdp_total"]


def report(run_dir: Path, nproc: int, device: str, resumed_at: int) -> None:
    from soup_train.runlog import read_log

    records = [r for r in read_log(run_dir / "log.jsonl") if r["kind"] == "train"]
    if [r["step"] for r in records] != list(range(1, records[-1]["step"] + 1)):
        sys.exit(f"FAILED: the resumed run's log has steps {[r['step'] for r in records]}")
    later = [r for r in records if r["step"] > resumed_at + 1] or records  # the first step after a start compiles
    rate = sum(r["tokens_per_s"] for r in later) / len(later)
    tokens = records[-1]["tokens"] / records[-1]["step"]
    peak = max(r["peak_memory_gib"] for r in records)
    print(f"trained {records[-1]['step']} steps on {nproc} {device} rank(s), resumed at step {resumed_at}: "
          f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}")
    print(f"step time {tokens / rate:.3f} s, {rate:,.0f} tokens/s")
    what = "max_memory_allocated" if device == "cuda" else "resident high-water mark (no CUDA: max_memory_allocated skipped)"
    print(f"peak memory per rank {peak:.2f} GiB ({what}); dry-run estimate {estimate(run_dir, nproc, device) / 2**30:.2f} GiB")
    if device != "cuda":
        print("skipped (no CUDA): bf16 autocast on GPU, NCCL, max_memory_allocated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpu-procs", type=int, default=2, help="gloo processes when there is no GPU")
    parser.add_argument("--small", action="store_true", help="d_model 128 instead of the preset's 768 (CPU tests)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default: a temporary directory, removed")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    device, nproc = ("cuda", gpus) if gpus else ("cpu", args.cpu_procs)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soup-smoke-"))
    try:
        data = work / "data"
        if not (data / "data.json").is_file():
            run([str(BIN / "soup-train"), "prepare", "--preset", "debug", "--out", str(data)])
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        half = args.steps // 2
        fit(args, data, run_dir, half, nproc, device)
        fit(args, data, run_dir, args.steps, nproc, device)
        report(run_dir, nproc, device, half)
        domain = json.loads((run_dir / "config.json").read_text())["domains"][0]
        out = run([str(BIN / "soup-export"), "build", str(run_dir), "--mix", f"{domain}=1", "--quant", "int8",
                   "--out", str(work / "export"), "--force"])
        print(next((line for line in out.splitlines() if "parity" in line), out.strip().splitlines()[-1]))
        print("gpu smoke: ok")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
