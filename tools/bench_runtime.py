"""Benchmark: the device runtime on one trained specialist, fp32 / int8 / int4, against
transformers (fp32 `generate` with the KV cache, same weights) and onnxruntime-genai (on its own
builder's int4 output of the same HF directory).

For each engine, in its own process (so peak RSS is its own): prefill latency of a P-token
prompt (median), decode tokens/s over N greedy tokens after the prefill, and peak RSS. Also the
soup-run --engine genai path on our int4 artifact, and soup-run int4 on one onnxruntime thread.
Last line: `int4_decode_over_torch: <ratio>`.

    python tools/bench_runtime.py              # d256 x 8 layers, vocab ~8k (about 10M), 128 new tokens
    python tools/bench_runtime.py --quick      # d128 x 2 layers, under a minute
    python tools/bench_runtime.py --size 110m  # the paper-110m preset's model (synthetic weights), 512-token prompt

`--size 110m` writes a synthetic soup of the preset's shapes (`soup_train.synthetic`, one expert:
the runtime sees only the fused model) instead of training one, and prints peak RSS against the
bound the README states: the model's bytes + its KV cache + 300 MB.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT_TOKENS = 64


def prepare(root: Path, size: str) -> None:
    """A briefly trained soup (a synthetic one at 110m), one mix exported at fp32 / int8 / int4, and
    genai's own int4 build."""
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_export.bank import Bank
    from soup_train.config import DataConfig, ModelConfig, RunConfig, SoupConfig, TrainConfig
    from soup_train.data.prepare import prepare as prepare_data
    from soup_train.presets import prepare_preset
    from soup_train.train import fit

    quick = size == "quick"
    data = root / "data"
    prepare_data(replace(prepare_preset("debug"), vocab_size=2048 if quick else 8192, seq_len=128), data, root / "cache")
    if size == "110m":
        from soup_train.presets import run_preset
        from soup_train.synthetic import write_synthetic_checkpoint

        run = run_preset("paper-110m")
        run = replace(run, soup=replace(run.soup, n_experts=1), data=replace(run.data, domains="sources", path=""))
        write_synthetic_checkpoint(root / "run", run, data)
    else:
        model = (ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=512) if quick else
                 ModelConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=512))
        cfg = RunConfig(model=model, soup=SoupConfig(n_experts=4), data=DataConfig(path=str(data)),
                        train=TrainConfig(steps=20 if quick else 60, batch_size=8, warmup_steps=5, eval_every=0,
                                          eval_batches=1, log_every=10, ckpt_every=1000))
        fit(cfg, root / "run", progress=False)
    bank = Bank.open(root / "run")
    mix = validate({bank.info.domains[0]: 0.7, bank.info.domains[1]: 0.3}, bank.info.domains)
    for tier in ("fp32", "int8", "int4"):
        build(root / "run", mix, root / tier, ExportSpec(quant=tier, parity=False, keep_hf=tier == "fp32"))
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    argv = (str(root / "fp32" / "hf"), str(root / "fp32" / "hf"), str(root / "genai-int4"), "int4", "cpu", str(root / "c"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        create_model(*argv, **parse_extra_options(*argv, []))


def prompt_ids(root: Path, tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "fp32" / "onnx" / "tokenizer.json"))
    text = (root / "data" / "corpus" / "test" / "licences.jsonl").read_text()
    ids = tok.encode(json.loads(text.splitlines()[0])["text"]).ids
    return (ids * (tokens // max(len(ids), 1) + 1))[:tokens]


def kv_cache_bytes(root: Path, tokens: int) -> int:
    """fp32 keys and values of every layer for `tokens` positions of one sequence."""
    config = json.loads((root / "fp32" / "hf" / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * 4 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * tokens


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's peak inherited at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_soup_run(directory: Path, ids: list[int], new: int, engine: str) -> dict:
    import numpy as np

    from soup_run.generate import GenerationConfig
    from soup_run.genai_engine import GenaiSpecialist
    from soup_run.model import Specialist

    ort = engine.startswith("ort")
    model = Specialist(directory, threads=int(engine[3:] or 0)) if ort else GenaiSpecialist(directory)
    cfg = GenerationConfig(max_new_tokens=new, stop_at_eos=False)
    prefill = []
    if ort:
        x = np.asarray([ids])
        for _ in range(7):
            t = time.perf_counter()
            model.step(x, np.ones_like(x), np.arange(len(ids))[None], model.empty_past(1))
            prefill.append(time.perf_counter() - t)
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in model.stream([ids], cfg)]
        if not ort:
            prefill.append(stamps[0] - start)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"prefill_ms": 1000 * statistics.median(prefill), "decode_tok_s": statistics.median(rates)}


def measure_torch(hf_dir: Path, ids: list[int], new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    prefill, rates = [], []
    with torch.no_grad():
        for _ in range(7):
            t = time.perf_counter()
            model(x, use_cache=True)
            prefill.append(time.perf_counter() - t)
        p = statistics.median(prefill)
        for _ in range(3):
            t = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            rates.append((new - 1) / (time.perf_counter() - t - p))
    return {"prefill_ms": 1000 * p, "decode_tok_s": statistics.median(rates)}


def measure_genai_builder(directory: Path, ids: list[int], new: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    prefill, rates = [], []
    for _ in range(3):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        count = 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
        rates.append(count / (time.perf_counter() - t))
    return {"prefill_ms": 1000 * statistics.median(prefill), "decode_tok_s": statistics.median(rates)}


def run_job(job: str, root: Path, new: int, prompt: int) -> dict:
    ids = prompt_ids(root, prompt)
    if job.startswith("soup-run"):
        _, tier, engine = job.split(":")
        result = measure_soup_run(root / tier, ids, new, engine)
    elif job == "torch":
        result = measure_torch(root / "fp32" / "hf", ids, new)
    else:
        result = measure_genai_builder(root / "genai-int4", ids, new)
    return {**result, "peak_rss_mb": peak_rss_mb()}


# soup-run int4 and the genai builder run back to back in every round (the machine's speed drifts between rounds).
JOBS = {"soup-run:fp32:ort": "soup-run fp32", "soup-run:int8:ort": "soup-run int8",
        "soup-run:int4:ort": "soup-run int4", "genai-builder": "onnxruntime-genai, its builder's int4",
        "soup-run:int4:ort1": "soup-run int4, --threads 1", "soup-run:int4:genai": "soup-run int4, --engine genai",
        "torch": "transformers fp32 generate (KV cache)"}


def paired_ratio(runs: dict[str, list[dict]], a: str, b: str) -> float:
    """Median over rounds of a's decode rate over b's, each pair measured in the same round."""
    return statistics.median(x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs[a], runs[b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model; under a minute (--size quick)")
    parser.add_argument("--size", choices=["quick", "small", "110m"], default="small",
                        help="small: d256 x 8 layers (default); 110m: the paper-110m preset's model")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--new", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, default=PROMPT_TOKENS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.job:
        print(json.dumps(run_job(args.job, args.root, args.new, args.prompt)))
        return
    scale = "quick" if args.quick else args.size
    new = 32 if scale == "quick" else 128
    prompt = 512 if scale == "110m" else PROMPT_TOKENS
    root = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    try:
        prepare(root, scale)
        runs: dict[str, list[dict]] = {job: [] for job in JOBS}
        for _ in range({"quick": 2, "small": 5, "110m": 3}[scale]):  # round-robin: a shared machine's drifts hit every engine
            for job in JOBS:
                proc = subprocess.run([sys.executable, __file__, "--job", job, "--root", str(root), "--new", str(new),
                                       "--prompt", str(prompt)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{job} failed:\n{proc.stderr[-3000:]}")
                runs[job].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results = {job: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for job, rs in runs.items()}
        size = {t: sum(f.stat().st_size for f in (root / t / "onnx").glob("model.onnx*")) for t in ("fp32", "int8", "int4")}
        print(f"prompt {prompt} tokens, {new} new tokens, batch 1, greedy; each engine in its own process, "
              f"medians over {len(next(iter(runs.values())))} round-robin rounds")
        print("| engine | model MB | prefill ms | decode tok/s | peak RSS MB |")
        print("|---|---:|---:|---:|---:|")
        for job, label in JOBS.items():
            r = results[job]
            mb = f"{size[job.split(':')[1]] / 1e6:.2f}" if job.startswith("soup-run") else ""
            print(f"| {label} | {mb} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.0f} | {r['peak_rss_mb']:.0f} |")
        per_round = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs["soup-run:int4:ort"], runs["genai-builder"])]
        print("ratios: median over rounds of the two engines' decode rates in the same round "
              f"(soup-run int4 / genai builder per round: {', '.join(f'{r:.2f}' for r in per_round)})")
        bound = size["int4"] + kv_cache_bytes(root, prompt + new) + (300 << 20)
        rss = results["soup-run:int4:ort"]["peak_rss_mb"] * (1 << 20)
        print(f"soup-run int4 peak RSS {rss / 1e6:.0f} MB; bound (model {size['int4'] / 1e6:.0f} MB + KV cache "
              f"{kv_cache_bytes(root, prompt + new) / 1e6:.0f} MB + 300 MB) {bound / 1e6:.0f} MB: "
              f"{'within' if rss <= bound else 'OVER'}")
        print(f"ort_int4_over_genai_builder_int4: {paired_ratio(runs, 'soup-run:int4:ort', 'genai-builder'):.2f}")
        print(f"int4_decode_over_torch: {paired_ratio(runs, 'soup-run:int4:ort', 'torch'):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
