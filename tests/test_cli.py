"""The CLI: every command documented with an example; user mistakes exit non-zero, no traceback."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from soup_train.cli import main

COMMANDS = sorted(main.commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


@pytest.mark.parametrize("args, message", [
    (["fit", "--preset", "nope", "--data", "d", "--out", "o"], "unknown preset 'nope'"),
    (["fit", "--preset", "debug", "--out", "o"], "needs --data"),
    (["fit", "--data", "/nonexistent", "--out", "o"], "is not a data directory"),
    (["fit", "--data", "d", "--out", "o", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    (["prepare", "--preset", "huge", "--out", "o"], "unknown data preset 'huge'"),
    (["estimate", "/nonexistent", "x.txt"], "has no domain map"),
    (["eval", "/nonexistent"], "no checkpoint at"),
])
def test_user_mistakes_are_one_line_errors(args, message, tmp_path):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, AttributeError, TypeError))


def test_dry_run_sizes_the_paper_preset_for_a_cluster():
    result = CliRunner().invoke(main, ["fit", "--preset", "paper-110m", "--dry-run", "--world-size", "8"])
    assert result.exit_code == 0, result.output
    assert "tokens per optimizer step:  131,072" in result.output
    line = next(l for l in result.output.splitlines() if l.startswith("instantiated model"))
    assert 100 <= float(line.split()[2].rstrip("M")) <= 120  # about 110M parameters
    lines = {l.split(":")[0]: l for l in result.output.splitlines()}
    total = float(lines["soup total (S + bank + MLP)"].split(":")[1].split("M")[0].replace(",", "")) * 1e6
    disk = lines["checkpoint on disk"].split(":")[1].split()
    weights, optimizer, per_rank = float(disk[0]), float(disk[8]), float(disk[11])
    assert abs(weights - total * 4 / 1024**3) < 0.06 and abs(optimizer - 2 * weights) < 0.11
    assert abs(per_rank - optimizer / 8) < 0.01  # world size 8: each rank writes an eighth
    extra = float(lines["checkpoint memory per rank"].split("at most ")[1].split()[0])
    from soup_train.presets import run_preset

    m, n = run_preset("paper-110m").model, run_preset("paper-110m").soup.n_experts
    assert abs(extra - n * m.vocab_size * m.d_model * 4 / 8 / 1024**3) < 0.01  # an eighth of the embedding's bank
    assert extra < weights / 32  # one shard of one tensor: far below the gathered soup and its moments
    assert "GB" not in result.output.replace("GiB", "")  # binary units, named as such
    by_world = lines["FSDP2 by world size"].split(":")[1].split(",")
    sizes = [float(part.split("GPUs")[1].split("GiB")[0]) for part in by_world]
    assert [part.split()[0] for part in by_world] == ["8", "32", "128"] and sizes == sorted(sizes, reverse=True)
    assert sizes[0] < 80 < float(lines["memory per GPU, DDP"].split(":")[1].split()[0])  # FSDP2 fits 80 GB GPUs


def test_estimate_and_eval_and_plot_on_real_artifacts(debug_data, tmp_path):
    import json

    texts = tmp_path / "texts"
    texts.mkdir()
    for i, line in enumerate((debug_data / "corpus" / "test" / "licences.jsonl").read_text().splitlines()[:8]):
        (texts / f"{i}.txt").write_text(json.loads(line)["text"])
    result = CliRunner().invoke(main, ["estimate", str(debug_data), str(texts), "--json"])
    assert result.exit_code == 0, result.output
    weights = json.loads(result.output)
    assert max(weights, key=weights.get) == "licences"
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "--data", str(debug_data), "--out", str(run), "--no-progress",
                                       "--set", "train.steps=4", "--set", "train.ckpt_every=4"])
    assert result.exit_code == 0, result.output
    assert "| licences |" in result.output and "specialist (own h) beats natural mix" in result.output
    result = CliRunner().invoke(main, ["eval", str(run), "--batches", "1"])
    assert result.exit_code == 0 and "| licences |" in result.output
    result = CliRunner().invoke(main, ["plot", str(run), "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "png" / "loss.png").stat().st_size > 1000 and (tmp_path / "png" / "alpha.png").is_file()
