"""Typed configs: dotted overrides, strict round-trips, validation messages."""
from __future__ import annotations

import dataclasses

import pytest

from soup_train.config import RunConfig, apply_overrides, from_dict, load_config_file, to_dict
from soup_train.errors import ConfigError
from soup_train.presets import RUN_PRESETS


def test_overrides_parse_by_type():
    cfg = apply_overrides(RunConfig(), ["train.lr=3e-4", "soup.n_experts=16", "model.tie_embeddings=false",
                                        "soup.alpha=softmax", "meta.fixed_h=0.5,0.25,0.25", "train.steps=1e3"])
    assert cfg.train.lr == 3e-4 and cfg.soup.n_experts == 16 and cfg.model.tie_embeddings is False
    assert cfg.soup.alpha == "softmax" and cfg.meta.fixed_h == (0.5, 0.25, 0.25) and cfg.train.steps == 1000
    assert apply_overrides(cfg, ["meta.fixed_h=none"]).meta.fixed_h is None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("train=1", "is a section"),
    ("soup.alpha=tanh", "must be one of raw, softmax"),
    ("train.steps=many", "expects a number"),
    ("model.tie_embeddings=maybe", "expects true or false"),
    ("train.lr", "not of the form key.sub=value"),
    ("model.n_heads=3", "divisible"),
])
def test_bad_overrides_say_what_is_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [override])


@pytest.mark.parametrize("name", list(RUN_PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = RUN_PRESETS[name]
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_configs_are_frozen_and_strict(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().train.lr = 1.0  # type: ignore[misc]
    data = to_dict(RunConfig())
    data["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown config key.*train.bogus"):
        from_dict(RunConfig, data)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\nsoup:\n  n_experts: 2\n")
    cfg = load_config_file(path)
    assert cfg.train.steps == 7 and cfg.soup.n_experts == 2 and cfg.model == RunConfig().model
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")
