"""Benchmark: export at the scale users train, from a bank larger than this machine's memory.

Writes a checkpoint of the `paper-110m` preset's shapes (110M instantiated; `--experts` experts,
by default the fewest whose bank is larger than this machine's memory: 64 in fp32 on 24 GB, 28.6 GB)
tensor by tensor (`soup_train.synthetic`: never the whole bank in memory), after checking the disk
has room for it and the exports, then in order:

1. one sequential read of the bank (cold: the page cache dropped first),
2. a shipping-only int4 build, cold, then again warm (whatever of the bank the cache kept),
3. a batch of `--mixes` customers (shipping-only int4), cold,
4. the default build: every parity stage, HF weights kept, on the customer texts of `examples/`,
5. the same sequential read again (the disk's speed drifts: the ratios use the faster of the two).

Each export runs in its own process, timed after its imports; its peak anonymous memory (RssAnon,
sampled every 10 ms: the mapped bank is page cache, not counted) is printed against the bound the
README states. The page cache is dropped through /proc/sys/vm/drop_caches when this runs as root,
else with posix_fadvise(DONTNEED) on the bank. The bank is deleted at the end unless `--keep`.
Last line: `cold_build_over_read: <ratio>` (the target is at most 1.3).

    python tools/bench_scale.py                       # 64 experts fp32 on this machine, about 10 minutes
    python tools/bench_scale.py --experts 128 --dtype bf16
    python tools/bench_scale.py --experts 8 --no-parity-build   # a quick look (3.9 GB)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIXES_PER_PASS = 32  # soup_export.build's default: the batch bound counts one fused tensor per customer of a pass


def run_config(experts: int):
    from soup_train.presets import run_preset

    run = run_preset("paper-110m")
    # the debug data's domains (its tokenizer and domain map): the bank's size is the experts', not k's
    return replace(run, soup=replace(run.soup, n_experts=experts), data=replace(run.data, domains="sources", path=""))


def sizes(experts: int, dtype: str) -> dict:
    """Bytes of the bank, of the fp32 specialist and of its largest tensor, from the shapes alone."""
    from soup_train.model.soup import count_parameters, meta_soup

    run = run_config(experts)
    counts = count_parameters(run.model, run.soup, 3)
    largest = max(p.numel() for p in meta_soup(run.model, run.soup, 3).shared.parameters())
    return {"bank": counts["total"] * (2 if dtype == "bf16" else 4), "specialist": 4 * counts["instantiated"],
            "largest_tensor": 4 * largest}


def default_experts(dtype: str) -> int:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    experts = 8
    while sizes(experts, dtype)["bank"] <= memory:
        experts *= 2
    return experts


def drop_cache(path: Path) -> str:
    """Empty the page cache of `path` (the whole cache as root); returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def sequential_read(path: Path) -> float:
    """Seconds to read the file once front to back in 16 MB reads (what `dd bs=16M` does)."""
    buf = bytearray(16 << 20)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    return time.perf_counter() - start


def peak_anon(pid: int, stop: threading.Event, out: list) -> None:
    """Sample the process's RssAnon every 10 ms until `stop`; out[0] is the peak in bytes."""
    peak, status = 0, Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            break
        stop.wait(0.01)
    out.append(peak)


def run_job(root: Path, job: str, extra: list[str]) -> dict:
    """One export job in a fresh process: its own timing (after imports) and its peak RssAnon."""
    cmd = [sys.executable, __file__, "--job", job, "--root", str(root), *extra]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, result = threading.Event(), []
    sampler = threading.Thread(target=peak_anon, args=(child.pid, stop, result))
    sampler.start()
    out, err = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"bench_scale: the {job} job failed:\n{err.strip()[-2000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_anon": result[0] if result else 0}


def job(args) -> None:
    """In the child: import, then time one export."""
    import numpy as np

    from soup_export.build import ExportSpec, batch, build
    from soup_export.mix import validate
    from soup_export.bank import Bank

    root, ckpt = args.root, args.root / "run"
    domains = Bank.open(ckpt).info.domains
    rng = np.random.default_rng(0)
    mixes = [validate(dict(zip(domains, map(float, rng.dirichlet(np.ones(len(domains)))))), domains, name=f"c{i:02d}")
             for i in range(args.mixes)]
    shipping = ExportSpec(quant="int4", parity=False, keep_hf=False)
    start, report = time.perf_counter(), {}
    if args.job in ("cold", "warm"):
        build(ckpt, mixes[0], root / "out" / args.job, shipping, force=True)
    elif args.job == "batch":
        batch(ckpt, mixes, root / "out" / "batch", shipping, force=True, progress=False)
    elif args.job == "parity":
        texts = (str(REPO / "examples" / "customers" / "globex"),)
        manifest = build(ckpt, mixes[0], root / "out" / "parity", ExportSpec(quant="int4", eval_texts=texts), force=True)
        report["parity"] = manifest["parity"]
    print(json.dumps({"seconds": time.perf_counter() - start, **report}))


def prepare(root: Path, experts: int, dtype: str) -> Path:
    import torch

    from soup_train.data.prepare import prepare as prepare_data
    from soup_train.presets import prepare_preset
    from soup_train.synthetic import write_synthetic_checkpoint

    prepare_data(prepare_preset("debug"), root / "data", root / "cache")
    start = time.perf_counter()
    ckpt = write_synthetic_checkpoint(root / "run", run_config(experts), root / "data",
                                      torch.bfloat16 if dtype == "bf16" else torch.float32)
    weights = ckpt / "model.safetensors"
    print(f"bank: {weights.stat().st_size / 1e9:.1f} GB ({experts} experts, {dtype}), written and hashed in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, help="Experts in the bank (default: its bank exceeds this machine's memory).")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--mixes", type=int, default=32, help="Customers of the batch.")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="Where the bank is written.")
    parser.add_argument("--no-parity-build", action="store_true", help="Skip the default build (every parity stage).")
    parser.add_argument("--keep", action="store_true", help="Keep the bank and the exports.")
    parser.add_argument("--reuse", type=Path, help="A directory kept by --keep: its bank, not a new one.")
    parser.add_argument("--jobs", default="cold,warm,batch,parity", help="Which jobs, of cold,warm,batch,parity.")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return job(args)
    if args.reuse:  # the bank of an earlier --keep run
        root, args.keep = args.reuse, True
        info = json.loads((root / "run" / "checkpoints" / "step_0000001" / "config.json").read_text())
        experts = info["run"]["soup"]["n_experts"]
        weights = root / "run" / "checkpoints" / "step_0000001" / "model.safetensors"
        from soup_train.safetensors_map import safetensors_header

        args.dtype = "bf16" if safetensors_header(weights)[0]["shared.model.norm.weight"]["dtype"] == "BF16" else "fp32"
    else:
        experts = args.experts or default_experts(args.dtype)
    size = sizes(experts, args.dtype)
    need = size["bank"] + args.mixes * size["specialist"] // 6 + 3 * size["specialist"] + 2 * GIB
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free + (size["bank"] if args.reuse else 0)
    if free < need:
        raise SystemExit(f"bench_scale: {args.dir} has {free / 1e9:.1f} GB free, the bank and exports need "
                         f"{need / 1e9:.1f} GB; pass --dir on a larger disk or fewer --experts")
    root = root if args.reuse else Path(tempfile.mkdtemp(prefix="soup-bench-scale-", dir=args.dir))
    try:
        if not args.reuse:
            weights = prepare(root, experts, args.dtype)
        bank_gb = weights.stat().st_size / 1e9
        how = drop_cache(weights)
        first = sequential_read(weights)
        print(f"page cache dropped by {how}; one sequential read: {first:.1f} s ({bank_gb / first:.2f} GB/s)", flush=True)
        read = first
        extra = ["--mixes", str(args.mixes)]
        single_bound = 2 * size["specialist"] + GIB
        rows = []
        jobs = [("cold", True, single_bound), ("warm", False, single_bound),
                ("batch", True, GIB + min(args.mixes, MIXES_PER_PASS) * size["largest_tensor"]),
                *([] if args.no_parity_build else [("parity", True, single_bound)])]
        for name, cold, bound in [j for j in jobs if j[0] in args.jobs.split(",")]:
            if cold:
                drop_cache(weights)
            r = run_job(root, name, extra)
            rows.append((name, r, bound))
            print(f"{name:<7} {r['seconds']:7.1f} s  {r['seconds'] / read:5.2f}x read  peak anon "
                  f"{r['peak_anon'] / GIB:5.2f} GiB (bound {bound / GIB:.2f} GiB: "
                  f"{'within' if r['peak_anon'] <= bound else 'OVER'})", flush=True)
            if "parity" in r:
                from soup_export.cli import parity_line

                print(f"        parity: {parity_line(r['parity'])}", flush=True)
        drop_cache(weights)
        again = sequential_read(weights)
        read = min(first, again)  # the disk's speed drifts: the ratios below use the faster read (the stricter)
        print(f"the sequential read again, after the jobs: {again:.1f} s ({bank_gb / again:.2f} GB/s); "
              f"ratios over the faster one, {read:.1f} s", flush=True)
        times = {name: r["seconds"] for name, r, _ in rows}
        if "batch" in times:
            print(f"batch_of_{args.mixes}_over_read: {times['batch'] / read:.2f}")
        if "cold" in times:
            print(f"cold_build_over_read: {times['cold'] / read:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
