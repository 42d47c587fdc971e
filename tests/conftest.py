"""Shared fixtures: a tiny debug data directory and a trained debug run, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
