"""`soup-export`: thin click commands over the export stages (parse, call one function, render).

    build    every stage for one customer          batch    many customers in one pass
    resolve  mix -> HF Llama directory             graph    HF directory -> fp32 ONNX
    quantize HF or fp32 ONNX -> a tier             check    parity stages on an export
    estimate texts -> domain weights               inspect  summarise a manifest
    compare  specialists vs the generic model on their customers' held-out text
    batch-check  whether every customer of a (sharded) batch was written
    mixture  a SmallTalk run's routers and experts, under one budget
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from soup_export import stopping
from soup_train.errors import user_error
from soup_train.logs import setup_logging

_path = click.Path(path_type=Path)


def mix_options(f):
    f = click.option("--from-texts", "from_texts", multiple=True, type=_path,
                     help="Estimate the mix from these texts (files or directories; Algorithm 3).")(f)
    f = click.option("--mix-file", type=_path, help="JSON/YAML file of {domain: weight}.")(f)
    f = click.option("--mix", "mix_text", help="Domain weights, e.g. austen=0.7,python-code=0.3.")(f)
    return click.option("--name", default="specialist", show_default=True, help="Customer name recorded in the manifest.")(f)


def engine_option(f):
    return click.option("--engine", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
                        help="Executor of the bank pass: fast (compiled int4 kernel, writer threads, direct I/O) or "
                             "reference (plain torch, the specification; slower). An export records it in its manifest.")(f)


def export_options(f):
    f = engine_option(f)
    f = click.option("--verify-checkpoint", is_flag=True,
                     help="Hash the checkpoint's weights (a full read) and compare with the SHA-256 recorded "
                          "when they were written.")(f)
    f = click.option("--ort-format", is_flag=True, help="Also write model.ort for onnxruntime mobile.")(f)
    f = click.option("--force", is_flag=True, help="Replace --out if it exists.")(f)
    f = click.option("--no-hf", is_flag=True, help="Do not keep the resolved HF directory.")(f)
    f = click.option("--data", type=_path, help="Data directory for held-out text (default: the checkpoint's).")(f)
    f = click.option("--eval-texts", multiple=True, type=_path, help="The customer's own texts for parity (c).")(f)
    f = click.option("--no-parity", is_flag=True, help="Skip the parity stages.")(f)
    f = click.option("--max-size", help="Budget for model.onnx + data, e.g. 12MB or 8MiB.")(f)
    f = click.option("--qparam", multiple=True, metavar="KEY=VALUE", help="Quantizer parameter, e.g. block_size=64.")(f)
    return click.option("--quant", default="auto", show_default=True,
                        help="auto (highest precision that fits), fp32, fp16, int8, mixed or int4.")(f)


def _spec(quant, qparam, max_size, no_parity, eval_texts, data, no_hf, ort_format=False, verify_checkpoint=False,
          engine="fast"):
    """The ExportSpec of a command's flags; its engine settings read from the environment here, once."""
    from soup_export.budget import parse_size
    from soup_export.build import ExportSpec
    from soup_export.engine import EngineSettings
    from soup_export.errors import QuantError
    from soup_export.quantize import make_plan

    params = []
    for item in qparam:
        key, sep, value = item.partition("=")
        if not sep:
            raise QuantError(f"--qparam {item!r} is not KEY=VALUE (e.g. --qparam block_size=64)")
        params.append((key.strip(), value.strip()))
    if quant != "auto":
        make_plan(quant, dict(params))  # validate the name and parameters now
    elif params:
        raise QuantError("--qparam needs an explicit --quant (auto compares tiers at their defaults)")
    return ExportSpec(quant=quant, quant_params=tuple(params), max_size=parse_size(max_size) if max_size else None,
                      parity=not no_parity, keep_hf=not no_hf, data=str(data) if data else None,
                      eval_texts=tuple(str(t) for t in eval_texts), ort_format=ort_format,
                      verify_checkpoint=verify_checkpoint, engine=EngineSettings.from_env(engine))


def _load_mix(ckpt: Path, name: str, mix_text: str | None, mix_file: Path | None, from_texts: tuple[Path, ...]):
    from soup_export.errors import MixError
    from soup_export.mix import errors_in, mix_from_mapping, mix_from_texts, parse_mix, read_mix_file, validate
    from soup_export.bank import Bank

    given = [x for x in (mix_text, mix_file, from_texts) if x]
    if len(given) != 1:
        raise MixError("give exactly one of --mix DOMAIN=W,..., --mix-file FILE or --from-texts PATH")
    bank = Bank.open(ckpt)
    domains = bank.info.domains
    if mix_text:
        return validate(parse_mix(mix_text), domains, "weights", name)
    if mix_file:
        data = read_mix_file(mix_file)
        with errors_in(str(mix_file)):
            return mix_from_mapping(data, domains, f"file:{mix_file.name}", name)
    return mix_from_texts(bank.path, list(from_texts), domains, bank.info.view, name)


def parity_line(p: dict) -> str:
    """The parity stages' figures in one line: (a) and (b) max |d logits|, (c) dPPL, KL, top-1, (d)."""
    parts = []
    if "a_soup_vs_dense" in p:
        parts.append(f"(a) {p['a_soup_vs_dense']['max_abs_logit_diff']:.2g}")
    b = p["b_torch_vs_onnx"]
    parts.append(f"(b) {max(b['prefill_max_abs_diff'], b['decode_max_abs_diff']):.2g}")
    if "c_quantized_vs_fp32" in p:
        c = p["c_quantized_vs_fp32"]
        parts.append(f"(c) dPPL {100 * c['dppl']:+.2f}% KL {c['mean_kl']:.4f} top-1 {c['top1_agreement']:.3f}")
    parts.append(f"(d) greedy {p['d_greedy']['tokens']} tokens identical")
    return "  ".join(parts)


def choice_lines(report: dict) -> list[str]:
    """A manifest's `mix_choice` as summary lines (JSON only: `inspect` imports no torch): each
    candidate's held-out perplexity, the chosen one, its gain over the generic model, the cost, and
    the warning if any."""
    if "skipped" in report:
        return [f"  mix choice: {report['skipped']}"]
    g, cost = report["gain_over_generic"], report["cost"]
    scores = ", ".join(f"{k} {v['held_out_ppl']:.2f}" for k, v in report["candidates"].items())
    se = f" ± {100 * g['ppl_se']:.2f}%" if g["ppl_se"] is not None else " (one window: no standard error)"
    held = report["held_out_windows"]
    lines = [f"  mix choice (held-out ppl, {held} window{'s' if held != 1 else ''} of the customer's text): {scores} "
             f"-> {report['chosen']}; gain over generic {100 * g['ppl']:+.2f}%{se} ({cost['bank_passes']} passes "
             f"over the bank, {cost['seconds']:.1f} s" + (f" for {cost['customers']} customers)" if cost["customers"] > 1 else ")")]
    if report.get("warning"):
        lines.append(f"  warning: {report['warning']}")
    if held < FEW_HELD_OUT:
        lines.append(f"  note: the choice rests on {held} held-out window{'s' if held != 1 else ''}; a few thousand "
                     "tokens of the customer's text make it reliable")
    return lines


FEW_HELD_OUT = 4  # held-out windows below which the summary says the choice is uncertain


def _summary(m: dict) -> str:
    from soup_export.files import human
    from soup_export.layout import MIX_CHOICE

    size = m["size"]
    lines = [f"{m['mix']['name']}: tier {m['tier']}, {human(size['actual'])} (predicted {human(size['predicted'])}"
             + (f", budget {human(size['budget'])}, headroom {human(size['headroom'])})" if size["budget"] else ")"),
             "  mix: " + ", ".join(f"{d}={w:.3f}" for d, w in m["mix"]["weights"].items() if w > 0)
             + (" (normalised)" if m["mix"]["normalised"] else "")]
    if MIX_CHOICE in m:
        lines += choice_lines(m[MIX_CHOICE])
    if not m["parity"].get("skipped"):
        lines.append("  parity: " + parity_line(m["parity"]))
    if "ort_format" in m:
        o = m["ort_format"]
        usable = ", ".join(f"{k} {v}" for k, v in o["usability"].items() if k != "may_use_mobile_accelerators")
        lines.append(f"  ort format: model.ort {human(o['bytes'])}"
                     + ("" if o["within_budget"] else " (over the budget)") + f"; mobile EPs: {usable}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Compile Soup-of-Experts checkpoints into quantized ONNX specialists.

    \b
    Example:
      soup-export build runs/demo --mix austen=0.7,python-code=0.3 --out out/acme --max-size 1MB
    """
    setup_logging(verbose)


def strategy_option(f):
    return click.option("--mix-strategy", "strategy", type=click.Choice(["best", "estimate", "search"]), default=None,
                        help="With texts: which mix ships, scored on a held-out part of them. best (default): the "
                             "lowest held-out loss among the estimate, the natural mix (the generic model), the "
                             "uniform mix and the mix search; estimate: Algorithm 3's histogram; search: the mix "
                             "search. Explicit weights always ship as given.")(f)


@main.command()
@click.argument("ckpt", type=_path)
@mix_options
@click.option("--out", required=True, type=_path, help="Export directory to create.")
@export_options
@strategy_option
@click.option("--optimize-mix", "optimize_texts", multiple=True, type=_path,
              help="Same as --from-texts PATH --mix-strategy search (kept for older scripts).")
def build(ckpt, name, mix_text, mix_file, from_texts, out, quant, qparam, max_size, no_parity, eval_texts, data,
          no_hf, force, ort_format, verify_checkpoint, engine, strategy, optimize_texts):
    """Every stage: mix, resolve, graph, quantize, budget, parity, manifest.

    With --from-texts, the mix that ships is chosen on a held-out part of the texts (see
    --mix-strategy); with --mix and --eval-texts, the given mix is compared with the generic model.

    \b
    Example:
      soup-export build runs/demo --mix austen=0.7,python-code=0.3 --out out/acme
      soup-export build runs/demo --from-texts mail/ --out out/globex --max-size 600KB
      soup-export build runs/demo --from-texts mail/ --mix-strategy search --out out/globex-tuned
    """
    from soup_export.bank import Bank
    from soup_export.build import build as run_build
    from soup_export.build import preflight
    from soup_export.choose_mix import choose_for_mixes
    from soup_export.output import check_output_path

    spec = _spec(quant, qparam, max_size, no_parity, eval_texts, data, no_hf, ort_format, verify_checkpoint, engine)
    from_texts, cfg = _choice(mix_text, mix_file, from_texts, optimize_texts, strategy)
    check_output_path(out, force)  # before the mix choice, the slow part
    mix = _load_mix(ckpt, name, mix_text, mix_file, from_texts)
    bank = Bank.open(ckpt, spec.verify_checkpoint)
    if from_texts or spec.eval_texts:
        preflight(bank, [mix], spec)  # what the export will need, before the choice's passes over the bank
    mixes, extras = choose_for_mixes(bank, [mix], {mix.name: tuple(from_texts)} if from_texts else {},
                                     spec.eval_texts, cfg)
    click.echo(_summary(run_build(bank, mixes[0], out, spec, force, extras[0])))
    click.echo(f"wrote {out}")


def _choice(mix_text, mix_file, from_texts, optimize_texts, strategy):
    """(--from-texts, the MixChoiceConfig) of build's flags; --optimize-mix is --from-texts with the search."""
    from soup_export.choose_mix import MixChoiceConfig
    from soup_export.errors import MixError

    if optimize_texts:
        if mix_text or mix_file or from_texts or strategy not in (None, "search"):
            raise MixError("--optimize-mix is --from-texts PATH --mix-strategy search: give it alone (explicit "
                           "weights ship as given)")
        from_texts, strategy = optimize_texts, "search"
    if strategy is not None and not from_texts:
        raise MixError("--mix-strategy chooses among mixes estimated from --from-texts; explicit weights ship as "
                       "given (add --eval-texts to compare them with the generic model)")
    return from_texts, MixChoiceConfig(strategy=strategy or "best")


@main.command()
@click.argument("ckpt", type=_path)
@click.argument("mixes", type=_path)
@click.option("--out", required=True, type=_path, help="Batch directory to create (one sub-directory per customer).")
@click.option("--mixes-per-pass", default=32, show_default=True, type=click.IntRange(min=1),
              help="Customers fused per pass over the bank; memory holds one fused tensor per customer of a pass.")
@click.option("--link-shared/--copy-shared", default=True, show_default=True,
              help="Write the files that are the same for every customer (graph, tokenizer, configs) once and "
                   "hard-link them into each customer's directory, or write a copy per customer. Copies are "
                   "independent files: a tar of the whole batch can then extract one customer alone, and a file "
                   "edited in place changes for its customer only.")
@click.option("--shard", metavar="I/N", help="Export only part I of N of the customers (0 <= I < N; positions I, "
              "I+N, ... of the file): N machines, each with its own --out, export the whole file.")
@export_options
@strategy_option
def batch(ckpt, mixes, out, mixes_per_pass, link_shared, shard, quant, qparam, max_size, no_parity, eval_texts, data,
          no_hf, force, ort_format, verify_checkpoint, engine, strategy):
    """Many customers in one pass over the bank.

    MIXES (YAML or JSON) maps each customer NAME to {domain: weight, ...}, {mix: {...}} or
    {texts: [PATH, ...]} (paths relative to the file), under `customers:` or at the top level.
    Customers with texts get the mix chosen on a held-out part of them (--mix-strategy), all
    together: one pass over the bank per candidate and per search step for the whole batch.

    \b
    Example:
      soup-export batch runs/demo examples/customers.yaml --out out/batch --quant int4
    """
    from soup_export.bank import Bank
    from soup_export.batchfile import Shard, batch_texts, read_batch
    from soup_export.build import batch as run_batch
    from soup_export.build import preflight
    from soup_export.choose_mix import MixChoiceConfig, choose_for_mixes
    from soup_export.output import check_output_path

    spec = _spec(quant, qparam, max_size, no_parity, eval_texts, data, no_hf, ort_format, verify_checkpoint, engine)
    part = Shard.parse(shard) if shard else Shard()
    check_output_path(out, force)  # before the customers' texts are read
    chosen = read_batch(ckpt, mixes, part)
    if not chosen:
        click.echo(f"shard {shard} of {mixes} has no customers (fewer customers than shards)")
    bank, texts = Bank.open(ckpt, spec.verify_checkpoint), batch_texts(mixes, part)
    if texts or spec.eval_texts:
        preflight(bank, chosen, spec)  # what the export will need, before the choice's passes over the bank
    chosen, extras = choose_for_mixes(bank, chosen, texts, spec.eval_texts,
                                      MixChoiceConfig(strategy=strategy or "best"))
    manifests = run_batch(bank, chosen, out, spec, force, per_pass=mixes_per_pass, link_shared=link_shared,
                          shard=part.record(mixes) if shard else None, extras=extras)
    for m in manifests:
        click.echo(_summary(m))
    click.echo(f"wrote {out} ({len(manifests)} specialists" + (f", shard {shard})" if shard else ")"))


@main.command("batch-check")
@click.argument("mixes", type=_path)
@click.argument("dirs", nargs=-1, required=True, type=_path)
def batch_check(mixes, dirs):
    """Whether every customer of MIXES was written, across the batch directories DIRS (every shard's
    --out): exits 1 and names the missing ones if any is not.

    \b
    Example:
      soup-export batch-check customers.yaml exports/batch/shard-*
    """
    from soup_export.batchfile import batch_status

    written, missing, unexpected = batch_status(mixes, list(dirs))
    click.echo(f"{len(written)} of {len(written) + len(missing)} customers written in {len(dirs)} directories"
               + (f"; {len(unexpected)} not in {mixes}: {', '.join(unexpected[:10])}" if unexpected else ""))
    if missing:
        raise click.ClickException(f"{len(missing)} missing: {', '.join(missing[:20])}"
                                   + (" ..." if len(missing) > 20 else "") + "; run their shards again")


@main.command()
@click.argument("ckpt", type=_path)
@mix_options
@click.option("--out", required=True, type=_path, help="HF Llama directory to create.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def resolve(ckpt, name, mix_text, mix_file, from_texts, out, dtype, force):
    """Fuse Theta(h) into a standard Hugging Face Llama directory.

    \b
    Example:
      soup-export resolve runs/demo --mix bible=1 --out out/bible-hf
    """
    from soup_export.output import staged_output
    from soup_export.resolve import resolve_batch

    mix = _load_mix(ckpt, name, mix_text, mix_file, from_texts)
    with staged_output(out, force) as tmp:
        resolve_batch(ckpt, [mix], [tmp], dtype)
    click.echo(f"wrote {out} (mix {mix.describe()})")


@main.command()
@click.argument("hf_dir", type=_path)
@click.option("--out", required=True, type=_path, help="ONNX directory to create.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@engine_option
def graph(hf_dir, out, force, engine):
    """Build the fp32 ONNX decoder (KV cache, genai_config.json) from a resolved HF directory.

    \b
    Example:
      soup-export graph out/bible-hf --out out/bible-onnx
    """
    _write_tier(hf_dir, out, "fp32", (), None, force, engine)


@main.command()
@click.argument("src", type=_path)
@click.option("--quant", required=True, help="auto, fp32, fp16, int8, mixed or int4.")
@click.option("--qparam", multiple=True, metavar="KEY=VALUE", help="Quantizer parameter, e.g. block_size=64.")
@click.option("--max-size", help="Budget for model.onnx + data, e.g. 12MB.")
@click.option("--out", required=True, type=_path, help="ONNX directory to create.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@engine_option
def quantize(src, quant, qparam, max_size, out, force, engine):
    """Write a quantized ONNX directory from a resolved HF directory or an fp32 ONNX directory.

    \b
    Example:
      soup-export quantize out/bible-onnx --quant int4 --out out/bible-int4
      soup-export quantize out/bible-hf --quant auto --max-size 800KB --out out/bible-small
    """
    _write_tier(src, out, quant, qparam, max_size, force, engine)


def _write_tier(src: Path, out: Path, quant: str, qparam, max_size, force: bool, engine: str) -> None:
    from soup_export import budget
    from soup_export.compile import write_tier
    from soup_export.files import human
    from soup_export.layout import read_arch
    from soup_export.output import staged_output

    spec = _spec(quant, qparam, max_size, True, (), None, False, engine=engine)
    arch, _ = read_arch(src)
    tier, preds = budget.choose_tier(arch, quant, spec.max_size, dict(spec.quant_params) or None)
    with staged_output(out, force) as tmp:
        write_tier(src, tmp, tier, dict(spec.quant_params) if quant != "auto" else None, spec.engine, arch)
        size = budget.verify(tmp, preds[tier].total, spec.max_size)
    click.echo(f"wrote {out}: tier {tier}, {human(size['actual'])}"
               + (f", headroom {human(size['headroom'])}" if spec.max_size else ""))


@main.command()
@click.argument("export_dir", type=_path)
@click.option("--ckpt", type=_path, help="Checkpoint for stage (a) (default: skip it).")
@click.option("--data", type=_path, help="Data directory for held-out text.")
@click.option("--eval-texts", multiple=True, type=_path, help="The customer's own texts for stage (c).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option("--verify-checkpoint", is_flag=True,
              help="Hash the checkpoint's weights and compare with the SHA-256 recorded when they were written.")
def check(export_dir, ckpt, data, eval_texts, as_json, verify_checkpoint):
    """Run the parity stages on an export directory (its hf/ and onnx/) and print their figures
    (every stage is a hard error: a failure exits non-zero with its numbers).

    \b
    Example:
      soup-export check out/acme --ckpt runs/demo
      soup-export check out/acme --ckpt runs/demo --json > report.json
    """
    from soup_export.check import check_export

    report = check_export(export_dir, ckpt, data, eval_texts, verify_checkpoint)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{export_dir}: tier {report['tier']}, {report['files_verified']} files match the manifest, "
               "every parity stage passed")
    click.echo("  parity: " + parity_line(report))


@main.command()
@click.argument("ckpt", type=_path)
@click.argument("texts", nargs=-1, required=True, type=_path)
@click.option("--json", "as_json", is_flag=True, help="Print the weights as JSON.")
def estimate(ckpt, texts, as_json):
    """Estimate a customer's domain weights from their texts (the checkpoint's centroids).

    \b
    Example:
      soup-export estimate runs/demo customer_texts/
    """
    mix = _load_mix(ckpt, "estimate", None, None, texts)
    if as_json:
        click.echo(json.dumps(dict(zip(mix.domains, [round(w, 6) for w in mix.weights]))))
        return
    for d, w in sorted(zip(mix.domains, mix.weights), key=lambda x: -x[1]):
        click.echo(f"{d:<16} {w:.4f} {'#' * round(40 * w)}")


@main.command()
@click.argument("exports", nargs=-1, required=True, type=_path)
@click.option("--ckpt", required=True, type=_path, help="The checkpoint the exports were built from.")
@click.option("--data", required=True, type=_path, help="Data directory (its test split is held out).")
@click.option("--windows", default=32, show_default=True, type=click.IntRange(min=1), help="Held-out windows per customer.")
def compare(exports, ckpt, data, windows):
    """Table of specialists vs the generic (natural-mix) model on each customer's held-out text.

    \b
    Example:
      soup-export compare out/acme out/globex --ckpt runs/demo --data data/default
    """
    from soup_export.compare import compare as run_compare
    from soup_export.compare import format_rows

    click.echo(format_rows(run_compare(list(exports), ckpt, data, windows)))


@main.command()
@click.argument("run", type=_path)
@click.option("--out", required=True, type=_path, help="Mixture directory to create.")
@click.option("--quant", default="auto", show_default=True,
              help="One tier for every model: auto (highest precision whose total fits), fp32, fp16, int8, mixed or int4.")
@click.option("--qparam", multiple=True, metavar="KEY=VALUE", help="Quantizer parameter, e.g. block_size=64.")
@click.option("--max-size", help="Budget for the whole mixture (all routers and experts), e.g. 2MB.")
@click.option("--no-parity", is_flag=True, help="Skip the parity stages.")
@click.option("--no-hf", is_flag=True, help="Do not keep the HF directories of the models.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@engine_option
def mixture(run, out, quant, qparam, max_size, no_parity, no_hf, force, engine):
    """Export a SmallTalk run: every router and expert as ONNX, one tier, one budget for the whole mixture.

    \b
    Example:
      soup-export mixture runs/st --out exports/st --max-size 4MB
      soup-run generate exports/st --prompt "In the beginning"   # routes, then generates
    """
    from soup_export.mixture import export_mixture, summary

    spec = _spec(quant, qparam, max_size, no_parity, (), None, no_hf, engine=engine)
    click.echo(summary(export_mixture(run, out, spec, force)))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("export_dir", type=_path)
def inspect(export_dir):
    """Summarise an export directory: mix, tier, sizes, parity; for a batch, or any directory of
    exports, each of them.

    \b
    Example:
      soup-export inspect out/acme
      soup-export inspect out/batch
    """
    from soup_export.layout import BATCH_FILE, MANIFEST, read_manifest

    subs = sorted(p for p in export_dir.iterdir()  # not staging directories (.NAME.tmp, .NAME.old)
                  if not p.name.startswith(".") and (p / MANIFEST).is_file()) if export_dir.is_dir() else []
    if subs and ((export_dir / BATCH_FILE).is_file() or not (export_dir / MANIFEST).is_file()):
        for sub in subs:
            click.echo(_describe(read_manifest(sub), detail=False))
        return
    click.echo(_describe(read_manifest(export_dir), detail=True))


def _describe(m: dict, detail: bool) -> str:
    """A manifest's summary: a specialist's (with its checkpoint and files if `detail`), a SmallTalk
    mixture's or member's."""
    if m.get("kind", "").startswith("smalltalk-"):
        from soup_export.mixture import summary

        return (summary(m) if "models" in m else
                f"{m['kind']} {m['index']} of {m['source']['run']}: tier {m['tier']}, {m['size']['actual']} bytes")
    lines = [_summary(m)]
    if detail:
        lines.append(f"  checkpoint: {m['checkpoint']['name']} step {m['checkpoint']['step']} "
                     f"sha256 {m['checkpoint']['model_sha256'][:16]}...")
        lines.append(f"  files: {len(m['files'])}, versions: onnxruntime {m['versions']['onnxruntime']}, "
                     f"torch {m['versions']['torch']}")
    return "\n".join(lines)


def run() -> None:
    """The `soup-export` command: `main`, with SIGTERM (a scheduler's or `kill`'s request to stop)
    raised as SystemExit (see `stopping`), so that an export's staged output is removed and a
    replaced one kept, as on any other failure (by default the process would die at once and leave
    `.NAME.tmp` beside the target). A command that a stop's lost exception let finish exits 143 too."""
    try:
        with stopping.sigterm_stops():
            try:
                main()
            except SystemExit as exc:
                if not isinstance(exc, stopping.Stopped):
                    stopping.check()  # main's own exit, with a stop asked for (its exception lost): Stopped
                raise
    except stopping.Stopped:
        click.echo("soup-export: stopped by signal SIGTERM; nothing half-written was left (an output being "
                   "replaced is kept unless the new one was already in place)", err=True)
        raise
    except (OSError, UnicodeDecodeError) as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):  # -v: the whole traceback
            raise
        click.echo(f"soup-export: {user_error(exc)}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    logging.getLogger(__name__)
    run()
