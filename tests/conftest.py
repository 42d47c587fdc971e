"""Shared fixtures: a tiny debug data directory and a trained debug run, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# a batch's kernel reads as told: the reads measured under the suite's load would be kept in the user
# cache for real exports (both ways are tested explicitly, and the measurement with its own cache)
os.environ.setdefault("SOUP_NATIVE_READS", "copy")


@pytest.fixture(scope="session")
def debug_data(tmp_path_factory) -> Path:
    from soup_train.data.prepare import prepare
    from soup_train.presets import prepare_preset

    out = tmp_path_factory.mktemp("data") / "debug"
    prepare(prepare_preset("debug"), out, tmp_path_factory.mktemp("cache"))
    return out


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SOUP_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs the package registries; set SOUP_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def debug_ckpt(debug_data, tmp_path_factory) -> Path:
    """A debug soup trained long enough that quantization is judged on trained weights."""
    from dataclasses import replace

    from soup_train.config import apply_overrides
    from soup_train.presets import run_preset
    from soup_train.train import fit

    cfg = run_preset("debug")
    cfg = apply_overrides(replace(cfg, data=replace(cfg.data, path=str(debug_data))),
                          ["train.steps=80", "train.ckpt_every=80", "train.eval_every=0", "train.log_every=20"])
    out = tmp_path_factory.mktemp("runs") / "export-src"
    fit(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def smalltalk_run(debug_data, tmp_path_factory) -> Path:
    """A finished debug SmallTalk run (2 routers, 2 experts), trained in-process in seconds."""
    from dataclasses import replace

    from soup_train.config import apply_overrides
    from soup_train.smalltalk.config import smalltalk_preset
    from soup_train.smalltalk.experts import train_expert
    from soup_train.smalltalk.routers import assign_budget, train_routers
    from soup_train.smalltalk.run import SmallTalkRun

    cfg = smalltalk_preset("debug")
    cfg = apply_overrides(replace(cfg, data=replace(cfg.data, path=str(debug_data))),
                          ["expert_train.steps=40", "expert_train.ckpt_every=40"])
    run = SmallTalkRun.create(tmp_path_factory.mktemp("runs") / "smalltalk", cfg)
    train_routers(run, progress=False)
    assign_budget(run)
    for e in range(run.experts):
        train_expert(run, e, progress=False)
    return run.path


@pytest.fixture(scope="session")
def hf_dir(debug_ckpt, tmp_path_factory) -> Path:
    """The debug soup resolved at python-code/licences 0.5/0.5: an HF Llama directory."""
    from soup_export.bank import Bank
    from soup_export.mix import validate
    from soup_export.resolve import resolve_batch

    bank = Bank.open(debug_ckpt)
    out = tmp_path_factory.mktemp("hf") / "hf"
    resolve_batch(debug_ckpt, [validate({"python-code": 0.5, "licences": 0.5}, bank.info.domains)], [out])
    return out
