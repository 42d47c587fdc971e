"""tools/gpu_smoke.sh, the GPU smoke run, in its CPU form: two gloo processes train a small soup
with FSDP2, stop with a checkpoint, resume, report speed and memory, and export a specialist whose
every parity stage passes; the CUDA-only parts say they were skipped."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_smoke_run_trains_resumes_and_exports_on_cpu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_smoke.sh"), "--small", "--steps", "4",
                           "--workdir", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = proc.stdout
    assert "trained 4 steps on 2 cpu rank(s), resumed at step 2" in out
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()  # the first run's, resumed from
    assert "parity: (a) 0 " in out and "greedy 32 tokens identical" in out and out.endswith("gpu smoke: ok\n")
    if not torch.cuda.is_available():
        assert "skipped (no CUDA): bf16 autocast on GPU, NCCL, max_memory_allocated" in out
