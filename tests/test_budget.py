"""Budget: sizes parsed, every tier's bytes predicted exactly, the tier chosen within a budget."""
from __future__ import annotations


import pytest

from soup_export.budget import choose_tier, parse_size, predict
from soup_export.errors import BudgetError
from soup_export.layout import read_arch
from soup_export.quantize import TIERS

from stages import write_tier


def test_size_parsing():
    assert parse_size("12MB") == 12_000_000 and parse_size("1.5 KiB") == 1536 and parse_size("800") == 800
    for bad in ("twelve", "12XB", "-3MB", "0"):
        with pytest.raises(BudgetError):
            parse_size(bad)


def test_predicted_size_is_exact_for_every_tier(hf_dir, tmp_path):
    arch, _ = read_arch(hf_dir)
    for tier, params in [(t, None) for t in TIERS] + [("int4", {"symmetric": "false"}), ("mixed", {"symmetric": "false"})]:
        out = write_tier(hf_dir, tmp_path / f"{tier}-{bool(params)}", tier, params)
        actual = (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
        assert predict(arch, tier, params).total == actual, (tier, params)
    assert predict(arch, "int4", {"symmetric": "false"}).total > predict(arch, "int4").total  # the zero points


def test_budget_picks_the_highest_precision_that_fits_or_explains_why_none_does(hf_dir):
    arch, _ = read_arch(hf_dir)
    sizes = {t: predict(arch, t).total for t in TIERS}
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["mixed"] > sizes["int4"]
    assert choose_tier(arch, "auto", None)[0] == "fp32"
    assert choose_tier(arch, "auto", sizes["int8"])[0] == "int8"
    assert choose_tier(arch, "auto", sizes["int8"] - 1)[0] == "mixed"
    with pytest.raises(BudgetError, match=r"no tier fits .*int4 .*model\.embed_tokens\.weight"):
        choose_tier(arch, "auto", sizes["int4"] - 1)
    with pytest.raises(BudgetError, match="no tier fits"):
        choose_tier(arch, "fp32", sizes["fp16"])
