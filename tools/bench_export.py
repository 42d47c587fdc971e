"""Benchmark: from one checkpoint and mix to a shippable int4 ONNX, three ways, in one run.

1. ours:    `soup_export.build.build` (resolve + graph + int4 + budget; parity off)
2. optimum: our resolve, then optimum-onnx's `main_export` (text-generation-with-past) of the HF
            directory and onnxruntime's MatMulNBitsQuantizer (int4, block 32, symmetric, level 4)
3. genai:   our resolve, then onnxruntime-genai's model builder (int4, cpu)
plus a batch of 16 mixes vs 16 single builds, and fusion throughput (bank bytes read and fused
per second) vs a numpy copy of the same bytes. All paths run in this process after one warm-up,
so import and start-up costs are excluded from every side. The model is trained for one step
(timing does not depend on the weights). Last line: `speedup_vs_optimum: <ratio>`.

    python tools/bench_export.py           # d256 x 8 layers, vocab ~8k, 32 experts (10M instantiated, 1.3 GB bank)
    python tools/bench_export.py --quick   # d128 x 2 layers, 16 experts, under a minute

The batch advantage grows with the number of experts n: a single build reads the whole bank
((n + 1) x the model) for one customer, a batch reads it once for all; the per-customer work
left (fusion output, quantization, writing) is the same on both sides. The paper's banks have
n = 128; at n = 8 this machine measured batch/singles of about 2x.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_checkpoint(root: Path, quick: bool) -> Path:
    from soup_train.config import DataConfig, ModelConfig, RunConfig, SoupConfig, TrainConfig
    from soup_train.data.prepare import prepare
    from soup_train.presets import prepare_preset
    from soup_train.train import fit

    data = root / "data"
    prepare(replace(prepare_preset("debug"), vocab_size=2048 if quick else 8192, seq_len=64), data, root / "cache")
    model = (ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352) if quick else
             ModelConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704))
    cfg = RunConfig(model=model, soup=SoupConfig(n_experts=16 if quick else 32), data=DataConfig(path=str(data)),
                    train=TrainConfig(steps=1, batch_size=2, warmup_steps=0, eval_every=0, eval_batches=1))
    fit(cfg, root / "run", progress=False)
    return root / "run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model; under a minute")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    repeat = 1 if args.quick else 3
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        run(root, args.quick, repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, quick: bool, repeat: int) -> None:
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime_genai.models.builder import create_model, parse_extra_options
    from optimum.exporters.onnx import main_export

    from soup_export.build import ExportSpec, batch, build
    from soup_export.mix import validate
    from soup_export.resolve import Bank, resolve_batch

    ckpt = make_checkpoint(root, quick)
    bank = Bank.open(ckpt)
    domains = bank.info.domains
    mix = validate({domains[0]: 0.6, domains[1]: 0.4}, domains)
    spec = ExportSpec(quant="int4", parity=False, keep_hf=False)
    counter = iter(range(10**6))
    fresh = lambda name: root / f"{name}-{next(counter)}"  # noqa: E731

    def ours():
        build(ckpt, mix, fresh("ours"), spec)

    def resolved() -> Path:
        out = fresh("hf")
        resolve_batch(ckpt, [mix], [out])
        return out

    def optimum_path():
        hf, out = resolved(), fresh("optimum")
        with contextlib.redirect_stdout(io.StringIO()):
            main_export(str(hf), out, task="text-generation-with-past", do_validation=False, local_files_only=True)
        q = MatMulNBitsQuantizer(str(out / "model.onnx"), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(out / "model_int4.onnx"), use_external_data_format=True)

    def genai_path():
        hf, out = resolved(), fresh("genai")
        argv = (str(hf), str(hf), str(out), "int4", "cpu", str(root / "genai-cache"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            create_model(*argv, **parse_extra_options(*argv, []))

    paths = {"ours (build, int4)": ours, "resolve + optimum export + ORT int4": optimum_path,
             "resolve + onnxruntime-genai builder int4": genai_path}
    for fn in paths.values():  # warm-up: imports, first-call caches
        fn()
    times = {name: timed(fn, repeat) for name, fn in paths.items()}

    mixes = [validate({domains[i % len(domains)]: 1.0, domains[(i + 1) % len(domains)]: (i % 5) / 4}, domains,
                      name=f"c{i:02d}") for i in range(16)]
    t_batch = timed(lambda: batch(ckpt, mixes, fresh("batch"), spec, progress=False), repeat)
    t_singles = timed(lambda: [build(ckpt, m, fresh("single"), spec) for m in mixes], 1)

    weights = bank.weights
    nbytes = weights.stat().st_size
    alpha = [bank.alpha(mix.h)]
    t_fuse = timed(lambda: [None for _ in bank.fused(alpha)], repeat)
    buf = np.empty(nbytes, np.uint8)
    t_copy = timed(lambda: np.copyto(buf, np.memmap(weights, np.uint8, "r")), max(repeat, 3))

    size = sum(f.stat().st_size for f in (root / "ours-0").rglob("model.onnx*"))
    print(f"checkpoint: {bank.info.run.model.d_model}d x {bank.info.run.model.n_layers} layers, vocab "
          f"{bank.info.run.model.vocab_size}, {bank.info.run.soup.n_experts} experts, bank {nbytes / 1e6:.1f} MB; "
          f"int4 specialist {size / 1e6:.2f} MB; median of {repeat}")
    print("| path | seconds | ours faster by |")
    print("|---|---:|---:|")
    base = times["ours (build, int4)"]
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {t / base:.1f}x |")
    print(f"| batch of 16 mixes | {t_batch:.3f} | |")
    print(f"| 16 single builds | {t_singles:.3f} | batch {t_singles / t_batch:.1f}x faster |")
    print(f"fusion: {nbytes / t_fuse / 1e9:.2f} GB/s of bank read+fused vs numpy copy {nbytes / t_copy / 1e9:.2f} GB/s "
          f"({100 * t_copy / t_fuse:.0f}% of memcpy)")
    print(f"speedup_vs_genai: {times['resolve + onnxruntime-genai builder int4'] / base:.2f}")
    print(f"batch_over_singles: {t_singles / t_batch:.2f}")
    print(f"speedup_vs_optimum: {times['resolve + optimum export + ORT int4'] / base:.2f}")


if __name__ == "__main__":
    main()
