"""`soup-train`: thin click commands over the library (parse, call one function, render)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from dataclasses import replace

from soup_train.errors import user_error
from soup_train.logs import setup_logging
from soup_train.config import PrepareConfig, RunConfig, apply_overrides, load_config_file

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "soup" / "sources"
_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config field, e.g. --set train.lr=3e-4 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Pretrain Soup-of-Experts language models.

    \b
    Example:
      soup-train prepare --preset debug --out data/debug
      soup-train fit --preset debug --data data/debug --out runs/debug
    """
    setup_logging(verbose)


@main.command()
@click.option("--preset", default="debug", show_default=True, help="Data preset: debug or default.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Data directory to write.")
@click.option("--source", "sources", multiple=True, metavar="NAME=PATH",
              help="Extra domain from local text/jsonl/parquet files (glob) or NAME=hf:DATASET.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True,
              help="Where downloaded packages are cached.")
@click.option("--force", is_flag=True, help="Rebuild --out if it exists.")
@_set_option
def prepare(preset: str, out: Path, sources: tuple[str, ...], cache: Path, force: bool,
            overrides: tuple[str, ...]) -> None:
    """Build a data directory: corpus, tokenizer, domains and shards.

    \b
    Example:
      soup-train prepare --preset default --out data/default
      soup-train prepare --preset debug --out data/mine --source legal='contracts/*.txt'
    """
    from soup_train.data.prepare import prepare as run_prepare
    from soup_train.presets import prepare_preset

    cfg: PrepareConfig = apply_overrides(prepare_preset(preset), overrides)
    if sources:
        cfg = replace(cfg, sources=cfg.sources + sources)
    index = run_prepare(cfg, out, cache, force=force)
    for p in index["provenance"]:
        fetched = ", ".join(p.get("fetched") or []) or ("cached" if p.get("cached") else "nothing")
        click.echo(f"  {p['source']:<12} {p['provider']:<32} {p.get('documents', 0):>6} docs   fetched: {fetched}")
    views = index["views"]
    click.echo(f"wrote {out}: {len(views['sources']['names'])} source domains, "
               f"{len(views['clusters']['names'])} clusters, {sum(views['sources']['train']):,} train and "
               f"{sum(views['sources']['test']):,} test windows of {index['window']} tokens "
               f"({index['seconds']} s)")


@main.command()
@click.option("--preset", default="debug", show_default=True, help="Run preset: debug, demo, paper-110m.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A JSON/YAML RunConfig file.")
@click.option("--data", type=click.Path(path_type=Path), help="Data directory from `soup-train prepare`.")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (resumes if it has checkpoints).")
@_set_option
@click.option("--dry-run", is_flag=True, help="Print parameter counts, memory per GPU and tokens per step.")
@click.option("--world-size", type=int, default=None, help="With --dry-run: number of GPUs (default: $WORLD_SIZE or 1).")
@click.option("--domains", type=int, default=None, help="With --dry-run: number of domains k.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def fit(preset: str, config_file: Path | None, data: Path | None, out: Path | None,
        overrides: tuple[str, ...], dry_run: bool, world_size: int | None, domains: int | None,
        no_progress: bool) -> None:
    """Train a Soup-of-Experts (single process, or under torchrun).

    \b
    Example:
      soup-train fit --preset demo --data data/default --out runs/demo
      torchrun --nproc_per_node 8 -m soup_train.cli fit --preset paper-110m --data D --out R
      soup-train fit --preset paper-110m --dry-run --world-size 8
    """
    from soup_train.presets import DOMAINS_FOR_RUN, run_preset

    cfg: RunConfig = load_config_file(config_file) if config_file else run_preset(preset)
    if data is not None:
        cfg = replace(cfg, data=replace(cfg.data, path=str(data)))
    cfg = apply_overrides(cfg, overrides)
    if dry_run:
        return _dry_run(cfg, domains or DOMAINS_FOR_RUN.get(preset, 8), world_size)
    if not cfg.data.path or out is None:
        raise click.UsageError("fit needs --data DIR (from `soup-train prepare`) and --out RUN")
    from soup_train.evaluate import format_table
    from soup_train.train import fit as run_fit

    result = run_fit(cfg, out, progress=not no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"step {result.step}: checkpoint {result.checkpoint}")
        if result.evaluation:
            click.echo(format_table(result.evaluation))


def _dry_run(cfg: RunConfig, n_domains: int, world_size: int | None) -> None:
    from soup_train.sizing import describe, plan

    if cfg.model.vocab_size == 0:
        raise click.UsageError("--dry-run needs model.vocab_size (e.g. --set model.vocab_size=4096)")
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    for line in describe(plan(cfg, n_domains, world)):
        click.echo(line)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--view", type=click.Choice(["sources", "clusters"]), default="sources", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the weights as JSON.")
def estimate(data: Path, texts: tuple[Path, ...], view: str, as_json: bool) -> None:
    """Estimate domain weights of texts (Algorithm 3: nearest-centroid histogram).

    DATA is a data directory or a checkpoint; TEXTS are files or directories of .txt files.

    \b
    Example:
      soup-train estimate data/default my_texts/*.txt
    """
    from soup_train.data.domains import DomainMap
    from soup_train.textfiles import read_texts

    weights = DomainMap.load(data)
    h = weights.histogram(read_texts(texts), view)
    names = weights.view_names(view)
    if as_json:
        click.echo(json.dumps(dict(zip(names, [round(float(x), 6) for x in h]))))
        return
    for name, w in sorted(zip(names, h), key=lambda x: -x[1]):
        click.echo(f"{name:<16} {w:.4f} {'#' * round(40 * w)}")


@main.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Data directory (default: the run's).")
@click.option("--batches", type=int, default=8, show_default=True, help="Batches per domain.")
def eval_cmd(run: Path, data: Path | None, batches: int) -> None:
    """Per-domain held-out loss of a checkpoint at each domain's h vs the natural mix.

    \b
    Example:
      soup-train eval runs/demo
    """
    import numpy as np
    import torch

    from soup_train.checkpoint import load_soup
    from soup_train.data.shards import DomainShards
    from soup_train.evaluate import evaluate_domains, format_table

    soup, info = load_soup(run)
    shards = DomainShards.open(data or Path(info.run.data.path), info.view, "test")
    bs = info.run.train.batch_size
    table = evaluate_domains(soup, shards, np.asarray(info.natural), batches * bs, bs,
                             info.run.data.seq_len, torch.device("cpu"))
    click.echo(format_table(table))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Directory for the PNGs (default: RUN).")
def plot(run: Path, out: Path | None) -> None:
    """Plot loss curves and alpha over domains as PNG files.

    \b
    Example:
      soup-train plot runs/demo
    """
    from soup_train.plot import plot_alpha, plot_losses

    out = out or run
    out.mkdir(parents=True, exist_ok=True)
    click.echo(f"wrote {plot_losses(run, out / 'loss.png')}")
    click.echo(f"wrote {plot_alpha(run, out / 'alpha.png')}")


@main.command()
def presets() -> None:
    """List the data and run presets.

    \b
    Example:
      soup-train presets
    """
    from soup_train.presets import PREPARE_PRESETS, RUN_PRESETS

    click.echo("data presets (prepare --preset): " + ", ".join(PREPARE_PRESETS))
    click.echo("run presets (fit --preset):      " + ", ".join(RUN_PRESETS))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Release directory to create.")
@click.option("--step", type=int, default=None, help="The checkpoint of this step (default: the latest).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Weights as trained, or in bf16 (half the bytes; the coefficient MLP stays fp32).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def release(run: Path, out: Path, step: int | None, dtype: str, force: bool) -> None:
    """Write what the export servers need from a run: weights (no optimizer state), tokenizer,
    domains, config, and the weights' SHA-256. soup-export takes it wherever it takes a checkpoint.

    \b
    Example:
      soup-train release runs/demo --out banks/demo
      soup-train release runs/110m --step 20000 --dtype bf16 --out /banks/soup-110m
      soup-export build /banks/soup-110m --mix austen=1 --out exports/austen
    """
    from soup_train.checkpoint import WEIGHTS
    from soup_train.release import release as run_release

    target = run_release(run, out, step, dtype, force)
    size = (target / WEIGHTS).stat().st_size
    click.echo(f"wrote {out}: {dtype} weights, {size / 1e9:.2f} GB, SHA-256 recorded")


from soup_train.smalltalk.cli import smalltalk  # noqa: E402 - registered after the soup commands

main.add_command(smalltalk)


def run() -> None:
    """The `soup-train` command: `main`, with a file the command could not read or write (a full
    disk, a missing permission) reported in one line, exit 1, instead of a traceback (`-v` shows it)."""
    try:
        main()
    except (OSError, UnicodeDecodeError) as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"soup-train: {user_error(exc)}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
