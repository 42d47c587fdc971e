"""The JavaScript runner beside soup-run on one int4 specialist, measured side by side in one run.

Prefill latency (one prompt) and greedy decode tokens/s with the KV cache, for soup-run (Python
onnxruntime), the JS runner in Node (onnxruntime-node) and in headless chromium (onnxruntime-web,
WebAssembly, threads on, the page of `soup-run serve`), all on the same files with the same thread
count. The three run in turn, `--rounds` times, and each runner's median over all its repetitions
is reported.

    python tools/bench_web.py exports/demo/initech --threads 2      # an int4 export you have
    python tools/bench_web.py --size small                          # builds one: d256 x 8 layers, briefly trained
    python tools/bench_web.py --size 110m                           # the paper-110m preset's shapes, synthetic weights
Last line: `node_over_python_decode: <ratio>`. With `--size`, the export is built in a temporary
directory after checking that the disk has room, and removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "runtimes" / "web"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
        "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
        "this truth is so well fixed in the minds of the surrounding families")


def python_runs(model, ids: list[int], n: int, reps: int) -> list[dict]:
    """soup-run's Specialist.step: one prefill, then n greedy decode steps, `reps` times after a warm-up."""
    def once() -> dict:
        t0 = time.perf_counter()
        logits, past = model.step(np.asarray([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                                  model.empty_past(1))
        prefill = (time.perf_counter() - t0) * 1000
        token, mask = int(logits[0].argmax()), np.ones((1, len(ids)), np.int64)
        t1 = time.perf_counter()
        for k in range(n):
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits, past = model.step(np.asarray([[token]]), mask, np.asarray([[len(ids) + k]]), past)
            token = int(logits[0].argmax())
        return {"prefillMs": prefill, "decodeTokensPerS": n / (time.perf_counter() - t1)}

    once()
    return [once() for _ in range(reps)]


def node_runs(export: Path, task: Path) -> list[dict]:
    proc = subprocess.run(["node", str(WEB / "tools" / "bench.mjs"), str(export), str(task)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_web: node failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def browser_runs(url: str, ids: list[int], n: int, reps: int, tmp: Path) -> tuple[list[dict], dict]:
    bench = {"do": "bench", "model": "/models/bench/", "ids": ids, "n": n}
    tasks = [{"do": "threads"}, bench, *[bench] * reps]  # the first bench is the warm-up
    (tmp / "tasks.json").write_text(json.dumps(tasks))
    proc = subprocess.run(["node", str(WEB / "tools" / "browser.mjs"), url, str(tmp / "tasks.json")], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_web: chromium failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.splitlines()[-1])
    return out[2:], out[0]


def serve(export: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """soup-run serve on a directory holding the export as `bench` (a symlink), on a free port."""
    (tmp / "models").mkdir()
    (tmp / "models" / "bench").symlink_to(export.resolve())
    proc = subprocess.Popen([sys.executable, "-m", "soup_run.cli", "serve", str(tmp / "models"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        sys.exit(f"bench_web: soup-run serve did not start: {line}")
    return proc, line.rsplit(" on ", 1)[1].strip()


NEEDS = {"small": 2 << 30, "110m": 6 << 30}  # bytes free to build (the fp32 graph is written before int4)


def build_int4(root: Path, size: str) -> Path:
    """An int4 export of a briefly trained d256 x 8 soup (small) or of paper-110m's shapes (synthetic)."""
    import shutil
    from dataclasses import replace

    from soup_export.bank import Bank
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_train.data.prepare import prepare as prepare_data
    from soup_train.presets import prepare_preset, run_preset

    free = shutil.disk_usage(root).free
    if free < NEEDS[size]:
        sys.exit(f"bench_web: {root} has {free >> 20} MB free, --size {size} needs {NEEDS[size] >> 20} MB; free some space")
    data = root / "data"
    prepare_data(replace(prepare_preset("debug"), vocab_size=8192, seq_len=128), data, root / "cache")
    if size == "110m":
        from soup_train.synthetic import write_synthetic_checkpoint

        run = run_preset("paper-110m")
        run = replace(run, soup=replace(run.soup, n_experts=1), data=replace(run.data, domains="sources", path=""))
        write_synthetic_checkpoint(root / "run", run, data)
    else:
        from soup_train.config import DataConfig, ModelConfig, RunConfig, SoupConfig, TrainConfig
        from soup_train.train import fit

        model = ModelConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=512)
        fit(RunConfig(model=model, soup=SoupConfig(n_experts=4), data=DataConfig(path=str(data)),
                      train=TrainConfig(steps=60, batch_size=8, warmup_steps=5, eval_every=0, eval_batches=1, log_every=10,
                                        ckpt_every=1000)), root / "run", progress=False)
    domains = Bank.open(root / "run").info.domains
    build(root / "run", validate({domains[0]: 0.7, domains[1]: 0.3}, domains), root / "int4",
          ExportSpec(quant="int4", parity=False, keep_hf=False))
    shutil.rmtree(root / "run")
    return root / "int4"


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, nargs="?", help="an int4 export directory (or --size to build one)")
    ap.add_argument("--size", choices=sorted(NEEDS), help="build an int4 export of this size in a temporary directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if (args.export is None) == (args.size is None):
        ap.error("pass an int4 export directory or --size")
    with tempfile.TemporaryDirectory(prefix="bench-web-build-") as built:
        if args.size:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            args.export = build_int4(Path(built), args.size)
        measure(args)


def measure(args: argparse.Namespace) -> None:
    from soup_run import Specialist

    model = Specialist(args.export, threads=args.threads)
    ids = model.encode(TEXT)[:args.prompt_tokens]
    n = min(args.decode, model.contract.context - len(ids))
    tier = json.loads((model.dir / "export.json").read_text()).get("tier")
    size = sum((model.dir / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    print(f"model: {args.export} ({tier}, {size / 1e6:.2f} MB), prompt {len(ids)} tokens, decode {n} tokens, "
          f"threads {args.threads}, {args.rounds} rounds x {args.reps} reps")
    runs: dict[str, list[dict]] = {"python": [], "node": [], "browser": []}
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        tmp = Path(tmp)
        (tmp / "task.json").write_text(json.dumps({"ids": ids, "n": n, "reps": args.reps, "threads": args.threads}))
        server, url = serve(args.export, tmp)
        try:
            for _ in range(args.rounds):
                runs["python"] += python_runs(model, ids, n, args.reps)
                runs["node"] += node_runs(args.export, tmp / "task.json")
                browser, info = browser_runs(f"{url}?threads={args.threads}", ids, n, args.reps, tmp)
                runs["browser"] += browser
        finally:
            server.terminate()
            server.wait()
    print(f"browser: WebAssembly threads {info['threads']}, cross-origin isolated {info['isolated']}")
    for name, r in runs.items():
        print(f"{name:8s} prefill_ms: {median(r, 'prefillMs'):8.2f}   decode_tokens_per_s: {median(r, 'decodeTokensPerS'):8.1f}")
    py = runs["python"]
    for name in ("browser", "node"):
        print(f"{name}_over_python_prefill_speed: {median(py, 'prefillMs') / median(runs[name], 'prefillMs'):.3f}")
    print(f"browser_over_python_decode: {median(runs['browser'], 'decodeTokensPerS') / median(py, 'decodeTokensPerS'):.3f}")
    print(f"node_over_python_decode: {median(runs['node'], 'decodeTokensPerS') / median(py, 'decodeTokensPerS'):.3f}")


if __name__ == "__main__":
    main()
