"""The JavaScript runner beside soup-run on one int4 specialist, measured side by side in one run.

Prefill latency (one prompt) and greedy decode tokens/s with the KV cache, for soup-run (Python
onnxruntime), the JS runner in Node (onnxruntime-node) and in headless chromium (onnxruntime-web,
WebAssembly, threads on, the page of `soup-run serve`), all on the same files with the same thread
count. Each runner measures in a process of its own (an idle onnxruntime session's spinning threads
would otherwise slow the next runner), the three run in turn `--rounds` times, and each ratio is the
median over rounds of that round's ratio of medians (the shared machine's drifts hit a round's
runners alike).

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


def python_job(export: Path, task: Path) -> None:
    """In its own process: soup-run's Specialist.step, one prefill then n greedy decode steps, `reps` times
    after a warm-up; prints the runs as one JSON line."""
    from soup_run import Specialist

    t = json.loads(task.read_text())
    model, ids, n = Specialist(export, threads=t["threads"]), t["ids"], t["n"]

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
    print(json.dumps([once() for _ in range(t["reps"])]))


def job_runs(cmd: list[str], name: str) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_web: {name} failed: {proc.stderr.strip()[-500:]}")
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
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--python-job", type=Path, help=argparse.SUPPRESS)  # internal: one Python measurement
    args = ap.parse_args()
    if args.python_job:
        python_job(args.export, args.python_job)
        return
    if (args.export is None) == (args.size is None):
        ap.error("pass an int4 export directory or --size")
    with tempfile.TemporaryDirectory(prefix="bench-web-build-") as built:
        if args.size:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            args.export = build_int4(Path(built), args.size)
        measure(args)


def measure(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from soup_run.contract import Contract, model_dir_of

    model_dir = model_dir_of(args.export)
    context = Contract.read(model_dir).context
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT).ids[:args.prompt_tokens]
    n = min(args.decode, context - len(ids))
    tier = json.loads((model_dir / "export.json").read_text()).get("tier")
    size = sum((model_dir / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    print(f"model: {args.export} ({tier}, {size / 1e6:.2f} MB), prompt {len(ids)} tokens, decode {n} tokens, "
          f"threads {args.threads}, {args.rounds} rounds x {args.reps} reps")
    rounds: list[dict[str, list[dict]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        tmp = Path(tmp)
        task = tmp / "task.json"
        task.write_text(json.dumps({"ids": ids, "n": n, "reps": args.reps, "threads": args.threads}))
        server, url = serve(args.export, tmp)
        try:
            for _ in range(args.rounds):
                py = job_runs([sys.executable, __file__, str(args.export), "--python-job", str(task)], "soup-run")
                node = job_runs(["node", str(WEB / "tools" / "bench.mjs"), str(args.export), str(task)], "node")
                browser, info = browser_runs(f"{url}?threads={args.threads}", ids, n, args.reps, tmp)
                rounds.append({"python": py, "node": node, "browser": browser})
        finally:
            server.terminate()
            server.wait()
    print(f"browser: WebAssembly threads {info['threads']}, cross-origin isolated {info['isolated']}")
    for name in ("python", "node", "browser"):
        every = [r for rnd in rounds for r in rnd[name]]
        print(f"{name:8s} prefill_ms: {median(every, 'prefillMs'):8.2f}   "
              f"decode_tokens_per_s: {median(every, 'decodeTokensPerS'):8.1f}   (medians of all runs)")

    def ratio(name: str, key: str, faster_is_larger: bool) -> float:
        per_round = [median(r[name], key) / median(r["python"], key) for r in rounds]
        return statistics.median(per_round if faster_is_larger else [1 / x for x in per_round])

    for name in ("browser", "node"):
        print(f"{name}_over_python_prefill_speed: {ratio(name, 'prefillMs', False):.3f}")
    print(f"browser_over_python_decode: {ratio('browser', 'decodeTokensPerS', True):.3f}")
    print(f"node_over_python_decode: {ratio('node', 'decodeTokensPerS', True):.3f}")


if __name__ == "__main__":
    main()
