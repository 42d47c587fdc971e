"""`soup-train plot`: loss curves and alpha over domains, as PNG files (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from soup_train.checkpoint import load_soup
from soup_train.evaluate import one_hot
from soup_train.runlog import read_log


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run_dir: Path, out: Path) -> Path:
    """Training loss per step and mean held-out loss at own vs natural h."""
    plt = _pyplot()
    records = read_log(run_dir / "log.jsonl")
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (sampled h)", alpha=0.6)
    for setting in ("own", "natural"):
        points = [(r["step"], np.mean([d[setting] for d in r["domains"].values()])) for r in evals]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"held-out, {setting} h (mean over domains)")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_alpha(run_dir: Path, out: Path) -> Path:
    """Heat map of alpha(e_i) for every domain i, plus the natural mix."""
    plt = _pyplot()
    soup, info = load_soup(run_dir)
    k = len(info.domains)
    hs = [one_hot(k, i) for i in range(k)] + [np.asarray(info.natural)]
    with torch.no_grad():
        alpha = soup.alpha(torch.tensor(np.stack(hs), dtype=torch.float32)).numpy()  # (k+1, n)
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * alpha.shape[1], 1 + 0.4 * len(hs)))
    im = ax.imshow(alpha, cmap="coolwarm", aspect="auto")
    ax.set_yticks(range(len(hs)), info.domains + ["natural mix"])
    ax.set_xticks(range(alpha.shape[1]), [f"E{j}" for j in range(alpha.shape[1])])
    ax.set(xlabel="expert", title=f"alpha(h), step {info.step}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
