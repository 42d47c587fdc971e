"""Benchmark: from one checkpoint and mix to a shippable int4 ONNX, three ways, in one run.

1. ours:    `soup_export.build.build` (resolve + graph + int4 + budget; parity off)
2. optimum: our resolve, then optimum-onnx's `main_export` (text-generation-with-past) of the HF
            directory and onnxruntime's MatMulNBitsQuantizer (int4, block 32, symmetric, level 4)
3. genai:   our resolve, then onnxruntime-genai's model builder (int4, cpu)
plus a batch of 16 mixes vs 16 single builds (and the same batch with `--copy-shared`, whose
customers' shared files are copies rather than hard links), and fusion throughput (bank bytes read, fused and
int4-quantized per second, as a shipping-only export does it) vs a numpy copy of the same bytes
(both through a fresh memory map, as a build reads the bank, and both through one whose pages are
already mapped). The bounds lines say what the bank pass alone allows: its time, and the ratios a
build or batch that did nothing else would reach; the per-customer line, the CPU time of the file
work that a batch and every single build do per customer (hashing, writing), in one extra metered
run. Every path runs in its own fresh process and is timed after one warm-up there, so import and
start-up costs are excluded from every side of those comparisons; in a full run, the commands line
then times one `soup-export batch` against 16 `soup-export build` processes, start-up included, as
a script would run them. The model is trained for one step (timing does not depend on the weights).
Last line: `speedup_vs_optimum: <ratio>`.

    python tools/bench_export.py           # d256 x 8 layers, vocab ~8k, 32 experts (10M instantiated, 1.3 GB bank)
    python tools/bench_export.py --quick   # d128 x 2 layers, 16 experts, under a minute
    python tools/bench_export.py --experts 8

The batch advantage grows with the number of experts n: a single build reads the whole bank
((n + 1) x the model) for one customer, a batch reads it once for all and fuses all customers by
one matrix product per block; the per-customer work left (int4 encoding, writing, hashing) is the
same on both sides. The paper's banks have n = 128. Conversely, the single-build comparisons include our own resolve in the other paths,
whose fusion grows with n; `--experts` shows both regimes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
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


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_checkpoint(root: Path, quick: bool, experts: int) -> Path:
    from soup_train.config import DataConfig, ModelConfig, RunConfig, SoupConfig, TrainConfig
    from soup_train.data.prepare import prepare
    from soup_train.presets import prepare_preset
    from soup_train.train import fit

    data = root / "data"
    prepare(replace(prepare_preset("debug"), vocab_size=2048 if quick else 8192, seq_len=64), data, root / "cache")
    model = (ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352) if quick else
             ModelConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704))
    cfg = RunConfig(model=model, soup=SoupConfig(n_experts=experts), data=DataConfig(path=str(data)),
                    train=TrainConfig(steps=1, batch_size=2, warmup_steps=0, eval_every=0, eval_batches=1))
    fit(cfg, root / "run", progress=False)
    return root / "run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model; under a minute")
    parser.add_argument("--experts", type=int, default=0, help="experts in the bank (default: 32, --quick 16)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: time one job in this process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.job:
        print(json.dumps(run_job(args.job, args.root, args.repeat)))
        return
    rounds, repeat = (1, 1) if args.quick else (3, 3)
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        make_checkpoint(root, args.quick, args.experts or (16 if args.quick else 32))
        report(root, rounds, repeat, commands=not args.quick)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def job_in_subprocess(job: str, root: Path, repeat: int) -> dict:
    """Each job runs in a fresh process (warm-up, then timed), so no library's threads or caches leak."""
    out = subprocess.run([sys.executable, __file__, "--job", job, "--root", str(root), "--repeat", str(repeat)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"job {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


JOBS = ("ours", "optimum", "genai", "batch", "singles", "copied")  # copied: the batch with --copy-shared


def report(root: Path, rounds: int, repeat: int, commands: bool = False) -> None:
    """Every job once per round, back to back, so each ratio compares runs made minutes apart at most;
    a ratio is the median over rounds of its per-round value, a time the median of its rounds. With
    `commands`, the batch and the singles once more as soup-export commands (start-up included)."""
    runs = {name: [] for name in (*JOBS, "fusion")}
    create_before = file_creation_ms(root / "probe-before")
    for _ in range(rounds):
        for name in JOBS:
            runs[name].append(job_in_subprocess(name, root, repeat))  # median of `repeat` in the process (singles: 1)
    runs["fusion"].append(job_in_subprocess("fusion", root, 3))
    cli = commands_or_error(root) if commands else None
    create_after = file_creation_ms(root / "probe-after")
    sec = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items() if name != "fusion"}

    def ratio(slow: str, fast: str) -> float:
        return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(runs[slow], runs[fast]))

    print(f"checkpoint: {runs['ours'][0]['info']}; {rounds} round(s), every path in its own process after a warm-up; "
          "ratios are medians of per-round ratios")
    print("| path | seconds | ours faster by |")
    print("|---|---:|---:|")
    names = {"ours": "ours (build, int4)", "optimum": "resolve + optimum export + ORT int4",
             "genai": "resolve + onnxruntime-genai builder int4"}
    for key, label in names.items():
        print(f"| {label} | {sec[key]:.3f} | {ratio(key, 'ours'):.1f}x |")
    print(f"| batch of 16 mixes | {sec['batch']:.3f} | |")
    print(f"| 16 single builds | {sec['singles']:.3f} | batch {ratio('singles', 'batch'):.1f}x faster |")
    print(f"| batch of 16 mixes, --copy-shared | {sec['copied']:.3f} | {ratio('singles', 'copied'):.1f}x faster than singles |")
    f = runs["fusion"][0]
    how = "fused and int4-quantized by the compiled kernel" if f["kernel"] else "fused by torch (no compiled kernel)"
    print(f"fusion: {f['fuse_gbps']:.2f} GB/s of bank read and {how}, vs numpy copy {f['copy_gbps']:.2f} GB/s, both "
          f"through a fresh memory map ({100 * f['fuse_gbps'] / f['copy_gbps']:.0f}% of memcpy); with the pages already "
          f"mapped {f['fuse_mapped_gbps']:.2f} vs {f['copy_mapped_gbps']:.2f} GB/s "
          f"({100 * f['fuse_mapped_gbps'] / f['copy_mapped_gbps']:.0f}%)")
    print_bounds(runs, sec, ratio)
    print_per_customer(runs["batch"])
    if isinstance(cli, str):
        print(f"as commands: {cli}")
    elif cli:
        print(f"as commands, each in its own process (imports and start-up included): 16 `soup-export build` "
              f"{cli['singles']:.2f} s ({cli['singles'] / 16:.2f} s each), one `soup-export batch` of the 16 mixes "
              f"{cli['batch']:.2f} s: {cli['singles'] / cli['batch']:.1f}x")
    print(f"file system: creating a small file took {create_before:.3f} ms before the jobs, {create_after:.3f} ms after "
          "(each specialist is 11 files; on an ext4 without a journal, for a few minutes after many files were deleted, "
          "creating one takes several times longer, and the batch's ratio falls with it)")
    print(f"speedup_vs_genai: {ratio('genai', 'ours'):.2f}")
    print(f"batch_over_singles: {ratio('singles', 'batch'):.2f}")
    print(f"speedup_vs_optimum: {ratio('optimum', 'ours'):.2f}")


def commands_or_error(root: Path) -> dict | str:
    """The commands job's times, or what went wrong (printed as its line: the other figures stand)."""
    try:
        return job_in_subprocess("commands", root, 1)
    except SystemExit as exc:
        return f"not timed ({str(exc).strip().splitlines()[-1]})"


def file_creation_ms(probe: Path, files: int = 64) -> float:
    """The median time to create and write one 1 KB file under `probe` (kept until the benchmark's end:
    deleting them would slow the jobs' own file creation)."""
    probe.mkdir()
    names = iter(range(files))
    return 1e3 * timed(lambda: (probe / f"f{next(names)}.json").write_bytes(bytes(1024)), files)


def print_bounds(runs: dict, sec: dict, ratio) -> None:
    """What one fusion pass over the bank allows: every build reads all of it once, and so does the
    resolve that the genai path starts with; a batch reads it once and fuses every mix by matrix products."""
    f = runs["fusion"][0]
    resolve_s = statistics.median(r["resolve"] for r in runs["genai"])
    builder_s = statistics.median(r["builder"] for r in runs["genai"])
    print(f"bank pass (read + fuse, as a shipping-only int4 export), 1 mix: {f['pass_1']:.3f} s through a fresh memory "
          f"map, {f['pass_1_mapped']:.3f} s through one whose pages are already mapped (map set-up, page faults and "
          f"teardown: {f['pass_1'] - f['pass_1_mapped']:.3f} s); 16 mixes: {f['pass_16']:.3f} s, with "
          f"{f['pass_16_faults']} minor page faults (a bank whose cached pages map in small pieces faults more: "
          "on the AMD EPYC measured, about 900 against 16,000 faults made the pass 0.06 against 0.13 s)")
    print(f"genai path {sec['genai']:.3f} s (our resolve {resolve_s:.3f} s + builder {builder_s:.3f} s): a build that did "
          f"nothing but one bank pass would be {sec['genai'] / f['pass_1']:.1f}x faster than it "
          f"(ours: {ratio('genai', 'ours'):.1f}x)")
    print(f"batch: a batch that did nothing but its bank pass would be {sec['singles'] / f['pass_16']:.1f}x faster than "
          f"16 singles (ours: {ratio('singles', 'batch'):.1f}x); beyond its bank pass the batch spends "
          f"{sec['batch'] - f['pass_16']:.3f} s, {1e3 * (sec['batch'] - f['pass_16']) / 16:.1f} ms per customer (files, "
          f"hashes, the tensors the kernel does not cover)")
    product = statistics.median(g["seconds"] / o["seconds"] * s["seconds"] / b["seconds"]
                                for g, o, s, b in zip(runs["genai"], runs["ours"], runs["singles"], runs["batch"]))
    print(f"both targets at once: vs genai x batch over singles = {product:.1f} (3x and 5x need 15). A single build's "
          f"speed moves the two ratios in opposite directions and leaves their product about 16 x genai path / batch "
          f"= {16 * sec['genai'] / sec['batch']:.1f}: only a faster batch (or a slower genai path) raises it")


def print_per_customer(batches: list) -> None:
    """The batch's per-customer file work (CPU time of a metered run, median over rounds): single builds pay it too."""
    from soup_export.meter import PARTS

    med = lambda key: statistics.median(r["per_customer"][key] for r in batches)  # noqa: E731
    parts = {k: statistics.median(r["per_customer"]["ms"][k] for r in batches) for k in PARTS}
    print("batch, per customer, CPU time of an extra metered run: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items())
          + f"; {sum(parts.values()):.1f} ms in all, which each single build pays as well (SHA-256 runs at "
          f"{med('sha256_gbps'):.2f} GB/s on this CPU; the data-file writes ran at {med('write_gbps'):.2f} GB/s of CPU "
          f"time, {'with O_DIRECT' if batches[0]['per_customer'].get('direct') else 'into the page cache'})")


def run_job(job: str, root: Path, repeat: int) -> dict:
    from soup_export.build import ExportSpec, batch, build
    from soup_export.mix import validate
    from soup_export.bank import Bank
    from soup_export.resolve import resolve_batch

    ckpt = root / "run"
    bank = Bank.open(ckpt)
    domains = bank.info.domains
    mix = validate({domains[0]: 0.6, domains[1]: 0.4}, domains)
    spec = ExportSpec(quant="int4", parity=False, keep_hf=False)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=f"{job}-"))
    counter = iter(range(10**6))
    fresh = lambda name: scratch / f"{name}-{next(counter)}"  # noqa: E731

    def resolved() -> Path:
        out = fresh("hf")
        resolve_batch(ckpt, [mix], [out])
        return out

    def ours():
        build(ckpt, mix, fresh("ours"), spec)

    def optimum_path():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        from optimum.exporters.onnx import main_export

        hf, out = resolved(), fresh("optimum")
        with contextlib.redirect_stdout(io.StringIO()):
            main_export(str(hf), out, task="text-generation-with-past", do_validation=False, local_files_only=True)
        q = MatMulNBitsQuantizer(str(out / "model.onnx"), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(out / "model_int4.onnx"), use_external_data_format=True)

    split = {"resolve": [], "builder": []}  # the genai path's two halves, per timed call

    def genai_path():
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        t0 = time.perf_counter()
        hf, out = resolved(), fresh("genai")
        t1 = time.perf_counter()
        argv = (str(hf), str(hf), str(out), "int4", "cpu", str(root / "genai-cache"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            create_model(*argv, **parse_extra_options(*argv, []))
        split["resolve"].append(t1 - t0)
        split["builder"].append(time.perf_counter() - t1)

    mixes = [validate({domains[i % len(domains)]: 1.0, domains[(i + 1) % len(domains)]: (i % 5) / 4}, domains,
                      name=f"c{i:02d}") for i in range(16)]
    if job == "fusion":
        return fusion_job(bank, [bank.alpha(mix.h)], [bank.alpha(m.h) for m in mixes], max(repeat, 3))
    if job == "commands":
        return commands_job(ckpt, mixes, scratch)
    fn = {"ours": ours, "optimum": optimum_path, "genai": genai_path,
          "batch": lambda: batch(ckpt, mixes, fresh("batch"), spec, progress=False),
          "copied": lambda: batch(ckpt, mixes, fresh("copied"), spec, progress=False, link_shared=False),
          "singles": lambda: [build(ckpt, m, fresh("single"), spec) for m in mixes]}[job]
    fn()  # warm-up: imports, first-call caches
    for part in split.values():
        part.clear()
    seconds = timed(fn, repeat if job != "singles" else 1)
    extra = {"per_customer": per_customer_cpu(fn, len(mixes))} if job == "batch" else {}
    m = bank.info.run.model
    size = sum(f.stat().st_size for f in scratch.glob("ours-0/onnx/model.onnx*"))
    info = (f"{m.d_model}d x {m.n_layers} layers, vocab {m.vocab_size}, {bank.info.run.soup.n_experts} experts, "
            f"bank {bank.weights.stat().st_size / 1e6:.1f} MB; int4 specialist {size / 1e6:.2f} MB")
    return {"seconds": seconds, "info": info, **extra, **{k: statistics.median(v) for k, v in split.items() if v}}


def commands_job(ckpt: Path, mixes: list, scratch: Path) -> dict:
    """The wall time of one `soup-export batch` of the mixes and of one `soup-export build` per mix,
    each command a process of its own, as a user's script would run them (one warm-up batch first:
    the compiled kernel and the user caches exist, as they do after a user's first export)."""
    exe = Path(sys.executable).with_name("soup-export")
    common = ["--quant", "int4", "--no-parity", "--no-hf"]
    spec = scratch / "mixes.json"
    spec.write_text(json.dumps({"customers": {m.name: dict(zip(m.domains, m.weights)) for m in mixes}}))

    def command(*argv: str) -> float:
        start = time.perf_counter()
        out = subprocess.run([str(exe), *argv, *common], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"soup-export {argv[0]} exited with {out.returncode}: {out.stderr.strip()[-2000:]}")
        return time.perf_counter() - start

    batch = lambda: command("batch", str(ckpt), str(spec), "--out", str(scratch / f"batch-{time.monotonic_ns()}"))  # noqa: E731
    batch()  # warm-up
    seconds = batch()
    singles = sum(command("build", str(ckpt), "--mix", ",".join(f"{d}={w!r}" for d, w in zip(m.domains, m.weights)),
                          "--name", m.name, "--out", str(scratch / f"single-{m.name}")) for m in mixes)
    return {"batch": seconds, "singles": singles}


def per_customer_cpu(run, customers: int) -> dict:
    """One more (untimed) run of `run` with the CPU time of the per-customer file work metered
    through the engine's public hooks (`soup_export.meter`), in whichever thread it runs:
    {"ms": {part: ms per customer}, "write_gbps": the data-file bytes written per second of their
    writes' CPU time, "sha256_gbps": SHA-256's own speed on this CPU}."""
    import hashlib

    from soup_export.meter import PARTS, metering
    from soup_export.engine.settings import EngineSettings

    with metering() as meter:
        run()
    data = bytes(64 << 20)
    sha_gbps = len(data) / timed(lambda: hashlib.sha256(data).digest(), 3) / 1e9
    writes = meter.seconds["data-file writes"]
    return {"ms": {part: 1e3 * meter.seconds[part] / customers for part in PARTS}, "sha256_gbps": sha_gbps,
            "write_gbps": meter.bytes["data-file writes"] / writes / 1e9 if writes else 0.0,
            "direct": EngineSettings.from_env().direct_io}


def minor_faults(fn) -> int:
    """The minor page faults of one call of `fn` (where the system counts them; else 0)."""
    try:
        import resource
    except ImportError:
        return 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def fusion_job(bank, one: list, many: list, repeat: int) -> dict:
    """Bank passes (fusion only, nothing written): one mix and a batch's mixes through a fresh
    memory map each time (what every build pays), one mix through a map whose pages are already
    mapped (the same read without the page-table work), and a numpy copy of the file's bytes. A
    pass computes what a shipping-only int4 export stores: the compiled kernel's fused int4 for the
    matrices it covers (when it is built), torch's fusion for the rest."""
    import numpy as np

    from soup_export.engine import native
    from soup_export.engine.fast import fused_weights
    from soup_export.graph import compile_graph
    from soup_export.layout import Arch
    from soup_export.quantize import make_plan
    from soup_train.safetensors_map import MappedSafetensors

    _, g = compile_graph(Arch.from_hf(bank.info.run.model.to_hf()), make_plan("int4", {}))

    def bank_pass(alphas: list, mapped=None) -> None:  # the export's own pass, nothing encoded beyond it or written
        for _ in fused_weights(bank, g, alphas, exact=False, mapped=mapped):
            pass

    nbytes = bank.weights.stat().st_size
    buf = np.empty(nbytes, np.uint8)
    data = np.memmap(bank.weights, np.uint8, "r")  # the kind of map MappedSafetensors makes
    np.copyto(buf, data)  # warm-up: the pages of buf and data
    passes = {"pass_1": lambda: bank_pass(one), "pass_16": lambda: bank_pass(many)}
    out = {"kernel": native.kernel() is not None}
    for name, fn in passes.items():
        fn()  # warm-up: first-call costs
        out[name] = timed(fn, repeat)
    out["pass_16_faults"] = minor_faults(passes["pass_16"])
    mapped = MappedSafetensors(bank.weights)
    bank_pass(one, mapped)  # maps the pages once, untimed
    out["pass_1_mapped"] = timed(lambda: bank_pass(one, mapped), repeat)
    t_copy = timed(lambda: np.copyto(buf, np.memmap(bank.weights, np.uint8, "r")), repeat)  # a fresh map, like a pass
    t_copy_mapped = timed(lambda: np.copyto(buf, data), repeat)
    return {**out, "fuse_gbps": nbytes / out["pass_1"] / 1e9, "copy_gbps": nbytes / t_copy / 1e9,
            "fuse_mapped_gbps": nbytes / out["pass_1_mapped"] / 1e9, "copy_mapped_gbps": nbytes / t_copy_mapped / 1e9}


if __name__ == "__main__":
    main()
