"""One error boundary per CLI: a user's mistake is one line naming what is wrong and what to do,
a non-zero exit, no traceback and nothing half-written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soup_export.bank import Bank


def soup_export(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from soup_export.cli import run; run()", *args],
                          capture_output=True, text=True, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def mix(debug_ckpt) -> str:
    return f"{Bank.open(debug_ckpt).info.domains[0]}=1"


def test_an_out_under_a_file_is_one_line(debug_ckpt, mix, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    r = soup_export("build", str(debug_ckpt), "--mix", mix, "--no-parity", "--out", str(tmp_path / "file" / "acme"))
    line = one_line_error(r)
    assert "is a file, not a directory" in line and str(tmp_path / "file") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_refuses_an_export_altered_after_it_was_written(debug_ckpt, mix, tmp_path):
    out = tmp_path / "acme"
    r = soup_export("build", str(debug_ckpt), "--mix", mix, "--quant", "fp32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ok = soup_export("check", str(out), "--ckpt", str(debug_ckpt))
    assert ok.returncode == 0 and "files match the manifest" in ok.stdout, ok.stderr
    data = out / "hf" / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1  # one bit of one weight: parity alone would not notice
    data.write_bytes(bytes(raw))
    line = one_line_error(soup_export("check", str(out), "--ckpt", str(debug_ckpt)))
    assert "hf/model.safetensors does not match" in line and "manifest" in line
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    (out / "onnx" / "genai_config.json").unlink()
    line = one_line_error(soup_export("check", str(out)))
    assert "genai_config.json is listed in" in line and "missing" in line


def test_unreadable_inputs_are_one_line(debug_ckpt, mix, tmp_path):
    bad = tmp_path / "mix.json"
    bad.write_bytes(b"\xff\xfe{not json")
    assert "mix file" in one_line_error(soup_export("build", str(debug_ckpt), "--mix-file", str(bad),
                                                    "--out", str(tmp_path / "a")))
    line = one_line_error(soup_export("build", str(tmp_path / "nowhere"), "--mix", mix, "--out", str(tmp_path / "b")))
    assert "nowhere" in line
    customers = tmp_path / "customers.yaml"
    customers.write_text("acme: {texts: [missing.txt]}\n")
    assert "missing.txt" in one_line_error(soup_export("batch", str(debug_ckpt), str(customers),
                                                       "--out", str(tmp_path / "c")))
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_an_os_error_is_one_line_with_the_path_and_what_to_do():
    import errno

    from soup_export.cli import user_error

    line = user_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/.acme.tmp/onnx/model.onnx.data"))
    assert "No space left on device: /data/out/.acme.tmp" in line and "free disk space" in line
    assert "UTF-8" in user_error(b"\xff".decode("utf-8", errors="strict") if False else
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert json.dumps(line)  # one line
    assert "\n" not in line
