"""Run a command from a test: a hang fails the test with what the command printed so far."""
from __future__ import annotations

import subprocess

import pytest

TIMEOUT = 600  # seconds: far above any test's command, so only a hang reaches it


def run_command(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(cmd[:4])} ... hung for {exc.timeout} s; its stderr:\n{err[-5000:]}")
