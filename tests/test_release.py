"""`soup-train release`: a checkpoint without its training state, which soup-export takes as it is;
and a save or a release that fails leaves nothing half-written."""
from __future__ import annotations

import errno
import json
import sys

import pytest
import torch
from click.testing import CliRunner

from soup_train.checkpoint import CHECKSUMS, resolve_checkpoint
from soup_train.cli import main
from soup_train.safetensors_map import safetensors_header


def run_cli(*args) -> tuple[int, str]:
    """soup-train through its error boundary (`cli.run`): (exit code, stderr's lines)."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "soup_train.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stderr


def test_a_release_holds_what_export_needs_and_exports_as_its_checkpoint(debug_ckpt, tmp_path, monkeypatch):
    from soup_export import bank as bank_mod
    from soup_export import cache
    from soup_export.bank import Bank
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate

    r = CliRunner().invoke(main, ["release", str(debug_ckpt), "--out", str(tmp_path / "bank")])
    assert r.exit_code == 0, r.output
    rel, ckpt = tmp_path / "bank", resolve_checkpoint(debug_ckpt)
    assert sorted(p.name for p in rel.iterdir()) == sorted(["config.json", "model.safetensors", CHECKSUMS,
                                                            "tokenizer.json", "domains"])
    assert json.loads((rel / "config.json").read_text())["release"] == {"checkpoint": ckpt.name, "dtype": "fp32"}
    with monkeypatch.context() as m:  # export trusts the SHA-256 recorded while the release was written
        for module in (bank_mod, cache):
            m.setattr(module, "file_sha256", lambda path: pytest.fail("the release was hashed"))
        opened = Bank.open(rel)
    assert opened.sha256 == Bank.open(ckpt).sha256  # the same weights, the same bytes
    domains = opened.info.domains
    mix = validate({domains[0]: 0.6, domains[1]: 0.4}, domains, name="acme")
    spec = ExportSpec(quant="int4", parity=False, keep_hf=False)
    a, b = build(rel, mix, tmp_path / "from-release", spec), build(debug_ckpt, mix, tmp_path / "from-ckpt", spec)
    assert a["files"]["onnx/model.onnx.data"] == b["files"]["onnx/model.onnx.data"]


def test_a_bf16_release_halves_the_bank_and_keeps_the_coefficient_mlp_in_fp32(debug_ckpt, tmp_path):
    from soup_export.bank import Bank
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_train.checkpoint import load_soup

    r = CliRunner().invoke(main, ["release", str(debug_ckpt), "--dtype", "bf16", "--out", str(tmp_path / "bf16")])
    assert r.exit_code == 0, r.output
    header, _ = safetensors_header(tmp_path / "bf16" / "model.safetensors")
    dtypes = {name: e["dtype"] for name, e in header.items()}
    assert {d for n, d in dtypes.items() if n.startswith("coef.")} == {"F32"}
    assert {d for n, d in dtypes.items() if not n.startswith("coef.")} == {"BF16"}
    soup32, _ = load_soup(debug_ckpt)
    soup16, _ = load_soup(tmp_path / "bf16")
    for (name, p32), (_, p16) in zip(soup32.named_parameters(), soup16.named_parameters()):
        assert torch.equal(p16, p32.to(torch.bfloat16).float() if not name.startswith("coef.") else p32), name
    bank = Bank.open(tmp_path / "bf16")
    domains = bank.info.domains
    manifest = build(bank, validate({domains[0]: 1.0}, domains, name="x"), tmp_path / "x",
                     ExportSpec(quant="fp32", parity=True, data=None))
    assert manifest["parity"]["a_soup_vs_dense"]["max_abs_logit_diff"] <= 1e-5


def test_release_refuses_to_overwrite_names_missing_steps_and_leaves_nothing_when_it_fails(debug_ckpt, tmp_path,
                                                                                             monkeypatch):
    from soup_train.stream import SafetensorsWriter

    out = tmp_path / "bank"
    assert CliRunner().invoke(main, ["release", str(debug_ckpt), "--out", str(out)]).exit_code == 0
    code, err = run_cli("release", debug_ckpt, "--out", out)
    assert code != 0 and "already exists; pass --force" in err and "Traceback" not in err
    code, err = run_cli("release", debug_ckpt, "--step", 3, "--out", tmp_path / "other")
    assert code != 0 and "has no checkpoint of step 3" in err and "step_" in err
    before = (out / "model.safetensors").read_bytes()

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    monkeypatch.setattr(sys, "argv", ["soup-train", "release", str(debug_ckpt), "--out", str(out), "--force"])
    from soup_train.cli import run

    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 1
    assert (out / "model.safetensors").read_bytes() == before  # the release it was replacing is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no staging directory left


def test_a_save_that_fails_keeps_the_previous_checkpoint_and_leaves_no_staging(debug_data, tmp_path, monkeypatch,
                                                                             capsys):
    """A full disk while fit saves: one line naming the file and what to do, exit 1, `latest` still
    the previous checkpoint, and no `.step_NNNNNNN.tmp` left behind."""
    from soup_train.cli import run
    from soup_train.stream import SafetensorsWriter

    real = SafetensorsWriter._put

    def second_save_fails(self, data):  # the disk fills up during the save of step 4
        if ".step_0000004.tmp" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
        return real(self, data)

    monkeypatch.setattr(SafetensorsWriter, "_put", second_save_fails)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["soup-train", "fit", "--preset", "debug", "--data", str(debug_data),
                                      "--out", str(out), "--no-progress", "--set", "train.steps=4",
                                      "--set", "train.ckpt_every=2", "--set", "train.eval_every=0"])
    with pytest.raises(SystemExit) as exc:
        run()
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "No space left on device" in err and "free disk space" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_force_replaces_only_a_release_and_a_kill_between_renames_loses_nothing(debug_ckpt, tmp_path):
    from soup_train.staging import staged

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, err = run_cli("release", debug_ckpt, "--out", other, "--force")
    assert code != 0 and "is not a release" in err and (other / "keep.txt").read_text() == "mine"
    target = tmp_path / "bank"
    target.mkdir()
    (target / "v1").write_text("old")
    target.rename(tmp_path / ".bank.old")  # killed after moving the old copy aside, before the new one went in
    with pytest.raises(RuntimeError):
        with staged(target) as tmp:
            (tmp / "v2").write_text("new")
            raise RuntimeError("this run fails too")
    assert (target / "v1").read_text() == "old"  # the old copy, put back before anything else
