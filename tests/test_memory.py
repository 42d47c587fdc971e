"""Peak memory of one FSDP2 training step per rank, measured by torch's FSDP memory tracker on two
gloo ranks, against the dry run's model (`soup_train.sizing.memory`).

The scaled soup: n = 64 experts of a 4-layer, d = 128 model (277 MiB of fp32 parameters). Unsharded,
its step needs 16 bytes per parameter (1,107 MiB). Measured here: 750 MiB per rank with one unit per
bank slice against an estimate of 835 MiB; 1,107 MiB with the whole soup one unit (the layout before),
which the test runs as its negative control."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from procs import run_command
from test_distributed import free_port

DRIVER = Path(__file__).with_name("memory_driver.py")
WITHIN = 0.20  # of the estimate
BELOW = 0.80  # of the unsharded step


def measure(tmp_path: Path, units: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(DRIVER), str(tmp_path), units]
    proc = run_command(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"memory_{units}_rank{r}.json").read_text()) for r in (0, 1)]


def holds(m: dict) -> bool:
    return abs(m["peak"] - m["estimate"]) <= WITHIN * m["estimate"] and m["peak"] < BELOW * m["unsharded"]


def test_one_fsdp_step_peaks_as_the_dry_run_says_and_far_below_the_unsharded_soup(tmp_path):
    for rank, m in enumerate(measure(tmp_path, "slices")):
        print(f"rank {rank}: peak {m['peak'] / 2**20:.1f} MiB, estimate {m['estimate'] / 2**20:.1f} MiB, "
              f"unsharded {m['unsharded'] / 2**20:.1f} MiB")
        assert holds(m), m
    # the whole soup as one unit (before): gathered whole through forward and backward
    assert not any(holds(m) for m in measure(tmp_path, "root-only"))
