"""`soup-train smalltalk ...`: thin click commands over soup_train.smalltalk."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click

_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config field, e.g. --set em.experts=4 (repeatable).")


@click.group()
def smalltalk() -> None:
    """SmallTalk LM: routers trained by EM, experts trained independently.

    \b
    Example (the whole pipeline, or its steps):
      soup-train smalltalk fit --preset tiny --data data/default --out runs/st
      soup-train smalltalk routers --preset tiny --data data/default --out runs/st
      soup-train smalltalk assign runs/st
      soup-train smalltalk launch runs/st --parallel 2
      soup-train smalltalk eval runs/st
    """


def _create(preset: str, data: Path, out: Path, overrides: tuple[str, ...]):
    from soup_train.config import apply_overrides
    from soup_train.smalltalk.config import smalltalk_preset
    from soup_train.smalltalk.run import SmallTalkRun

    cfg = smalltalk_preset(preset)
    cfg = apply_overrides(replace(cfg, data=replace(cfg.data, path=str(data))), overrides)
    return SmallTalkRun.create(out, cfg)


def _open(run: Path):
    from soup_train.smalltalk.run import SmallTalkRun

    return SmallTalkRun.open(run)


_run_options = [
    click.option("--preset", default="debug", show_default=True, help="SmallTalk preset: debug or tiny."),
    click.option("--data", required=True, type=click.Path(path_type=Path), help="Data directory (soup-train prepare)."),
    click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (resumes if present)."),
    _set_option,
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def run_options(f):
    for option in reversed(_run_options):
        f = option(f)
    return f


@smalltalk.command()
@run_options
def routers(preset: str, data: Path, out: Path, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Train the E router LMs by EM on sequence prefixes (resumes at the last finished round).

    \b
    Example:
      soup-train smalltalk routers --preset tiny --data data/default --out runs/st --set em.experts=2
    """
    from soup_train.smalltalk.routers import train_routers

    run = _create(preset, data, out, overrides)
    history = train_routers(run, progress=not no_progress)
    if history:
        last = history[-1]
        click.echo(f"routers: {len(history)} EM rounds, purity {last['purity']:.3f}, argmax shares "
                   + " ".join(f"{x:.2f}" for x in last["argmax_shares"]))


@smalltalk.command()
@click.argument("run", type=click.Path(path_type=Path))
def assign(run: Path) -> None:
    """Balanced-assign the expert training budget with the trained routers.

    \b
    Example:
      soup-train smalltalk assign runs/st
    """
    from soup_train.smalltalk.routers import assign_budget

    summary = assign_budget(_open(run))
    click.echo(f"assigned {summary['sequences']:,} sequences (capacity {summary['capacity']:,} each), "
               f"routing purity {summary['purity']:.3f}")
    click.echo("  shares: " + " ".join(f"{x:.3f}" for x in summary["shares"]))


@smalltalk.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--index", "index", type=int, required=True, help="Which expert to train (0..E-1).")
@click.option("--threads", type=int, default=0, help="Torch CPU threads (0 = default).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def expert(run: Path, index: int, threads: int, quiet: bool) -> None:
    """Train one expert as an independent job (also under torchrun); resumes if interrupted.

    \b
    Example:
      soup-train smalltalk expert runs/st --index 0
      torchrun --standalone --nproc-per-node 8 -m soup_train.cli smalltalk expert runs/st --index 3
    """
    import torch

    from soup_train.smalltalk.experts import train_expert

    if threads:
        torch.set_num_threads(threads)
    result = train_expert(_open(run), index, progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"expert {index}: step {result.step} ({result.world_size} process(es)) -> {result.out}")


@smalltalk.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--parallel", type=int, default=1, show_default=True, help="Expert jobs at once on this machine.")
@click.option("--threads", type=int, default=0, help="Torch threads per job (default: CPUs / --parallel).")
@click.option("--torchrun", "nproc", type=int, default=0,
              help="Do not train: print one torchrun command per pending expert with this many processes each.")
@click.option("--nnodes", type=int, default=1, show_default=True, help="With --torchrun: nodes per expert job.")
def launch(run: Path, parallel: int, threads: int, nproc: int, nnodes: int) -> None:
    """Train every pending expert here (one job after another, or --parallel), or print cluster commands.

    \b
    Example:
      soup-train smalltalk launch runs/st --parallel 2
      soup-train smalltalk launch runs/st --torchrun 8 > jobs.sh
    """
    from soup_train.smalltalk.launch import launch_local, torchrun_script

    st = _open(run)
    if nproc:
        click.echo(torchrun_script(st, nproc, nnodes))
        return
    if parallel < 1:
        raise click.BadParameter("must be >= 1", param_hint="--parallel")
    done = launch_local(st, parallel, threads, echo=click.echo)
    click.echo(f"trained {len(done)} expert(s); {st.experts - len(st.missing_experts())}/{st.experts} ready")


@smalltalk.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--prefix-len", "prefix_lens", type=int, multiple=True,
              help="Routing prefix length(s) to evaluate (default: the run's).")
@click.option("--per-domain", type=int, default=0, help="Held-out windows per domain (0 = all).")
def eval_cmd(run: Path, prefix_lens: tuple[int, ...], per_domain: int) -> None:
    """Held-out perplexity of the routed mixture, per domain, with shares and routing purity.

    \b
    Example:
      soup-train smalltalk eval runs/st --prefix-len 8 --prefix-len 32
    """
    from soup_train.smalltalk.mixture import Mixture, evaluate, test_windows

    st = _open(run)
    mixture = Mixture.load(st)
    windows, labels = test_windows(st, per_domain)
    for m in prefix_lens or (st.prefix_len,):
        r = evaluate(st, mixture, windows, labels, m)
        click.echo(f"prefix {r['prefix_len']:>4}: perplexity {r['ppl']:.3f}, purity {r['purity']:.3f}, "
                   f"shares {' '.join(f'{x:.2f}' for x in r['shares'])}")
        for name, ppl in r["per_domain"].items():
            click.echo(f"    {name:<14} {ppl:9.3f}")


@smalltalk.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True, type=click.Path(path_type=Path))
def route(run: Path, texts: tuple[Path, ...]) -> None:
    """Which expert each text goes to (argmax of the routers' prefix log-likelihood).

    \b
    Example:
      soup-train smalltalk route runs/st examples/customers/globex
    """
    import numpy as np
    from tokenizers import Tokenizer

    from soup_train.smalltalk.routing import prefix_scores
    from soup_train.textfiles import read_named_texts

    st = _open(run)
    tok = Tokenizer.from_file(str(st.tokenizer))
    routers = st.load_routers()
    for name, text in read_named_texts(texts):
        ids = np.array([tok.encode(text).ids[:st.prefix_len + 1]])
        if ids.shape[1] < 2:
            click.echo(f"{name}: too short to route (needs 2 tokens)")
            continue
        scores = prefix_scores(routers, ids, st.prefix_len)[0]
        click.echo(f"{name}: expert {int(scores.argmax())}  (log-lik/token " +
                   " ".join(f"{s:.3f}" for s in scores) + ")")


@smalltalk.command()
@run_options
@click.option("--parallel", type=int, default=1, show_default=True, help="Expert jobs at once.")
def fit(preset: str, data: Path, out: Path, overrides: tuple[str, ...], no_progress: bool, parallel: int) -> None:
    """The whole pipeline: routers, assignment, every expert (local jobs), evaluation.

    \b
    Example:
      soup-train smalltalk fit --preset tiny --data data/default --out runs/st --parallel 2
    """
    from soup_train.smalltalk.launch import launch_local
    from soup_train.smalltalk.mixture import Mixture, evaluate, test_windows
    from soup_train.smalltalk.routers import assign_budget, train_routers

    run = _create(preset, data, out, overrides)
    train_routers(run, progress=not no_progress)
    if not all(run.assign_file(e).is_file() for e in range(run.experts)):
        summary = assign_budget(run)
        click.echo(f"assigned {summary['sequences']:,} sequences, purity {summary['purity']:.3f}")
    launch_local(run, parallel, echo=click.echo)
    r = evaluate(run, Mixture.load(run), *test_windows(run))
    click.echo(f"held-out perplexity {r['ppl']:.3f}, routing purity {r['purity']:.3f}, shares "
               + " ".join(f"{x:.2f}" for x in r["shares"]))
