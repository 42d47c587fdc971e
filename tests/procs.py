"""Run a command from a test: a hang fails the test with what the command printed so far."""
from __future__ import annotations

import subprocess

import pytest

TIMEOUT = 600  # seconds: far above any test's command, so only a hang reaches it


def inspect_in_fresh_process(export) -> tuple[str, set[str]]:
    """`soup-export inspect EXPORT` in a fresh interpreter: what it printed and which of torch and onnx
    it imported (inspect reads manifests only, so it imports neither)."""
    import sys

    code = ("import sys; from soup_export.cli import main\n"
            f"try:\n    main(['inspect', {str(export)!r}])\n"
            "except SystemExit:\n    pass\n"
            "print('imported:', *[m for m in ('torch', 'onnx') if m in sys.modules])")
    result = run_command([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    printed, _, imported = result.stdout.rstrip("\n").rpartition("\n")
    assert imported.startswith("imported:"), result.stdout
    return printed, set(imported.split()[1:])


def run_command(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(cmd[:4])} ... hung for {exc.timeout} s; its stderr:\n{err[-5000:]}")
