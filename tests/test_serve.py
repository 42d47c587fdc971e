"""`soup-run serve`: what it serves (three trees, cross-origin isolated), what it refuses, and its errors."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.procs import run_command

CLI = [sys.executable, "-m", "soup_run.cli", "serve"]


@pytest.fixture()
def web(tmp_path) -> Path:
    """A stand-in for runtimes/web with its npm packages installed (no npm needed here)."""
    root = tmp_path / "web"
    (root / "page").mkdir(parents=True)
    (root / "page" / "index.html").write_text("<html>page</html>")
    (root / "page" / "app.js").write_text("export {};")
    (root / "src").mkdir()
    (root / "src" / "index.js").write_text("export {};")
    dist = root / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    (dist / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm")
    (root / "package.json").write_text("{}")
    return root


@pytest.fixture()
def batch(tmp_path) -> Path:
    """A batch directory of two minimal exports (the page lists them; serving reads no model)."""
    for name in ("acme", "globex"):
        onnx = tmp_path / "batch" / name / "onnx"
        onnx.mkdir(parents=True)
        (onnx / "model.onnx").write_bytes(b"graph")
        (onnx / "export.json").write_text(json.dumps({"tier": "int4"}))
        (tmp_path / "batch" / name / "manifest.json").write_text("{}")
    (tmp_path / "batch" / "notes").mkdir()
    return tmp_path / "batch"


def _get(url: str) -> tuple[int, object, bytes]:  # headers: case-insensitive
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, b""


def test_serves_the_page_runtime_and_exports_cross_origin_isolated(web, batch):
    proc = subprocess.Popen([*CLI, str(batch), "--port", "0", "--web", str(web)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving 2 model(s) (acme, globex)" in line, line
        url = line.rsplit(" on ", 1)[1].strip()
        status, headers, body = _get(url)
        assert status == 200 and body == b"<html>page</html>"
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert json.loads(_get(url + "models.json")[2]) == [
            {"name": "acme", "url": "/models/acme/", "kind": "specialist", "tier": "int4"},
            {"name": "globex", "url": "/models/globex/", "kind": "specialist", "tier": "int4"}]
        status, headers, body = _get(url + "web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")
        assert status == 200 and headers["Content-Type"] == "application/wasm" and body == b"\0asm"
        assert _get(url + "models/globex/onnx/model.onnx")[2] == b"graph"
        assert _get(url + "app.js")[1]["Content-Type"] == "text/javascript"
        for outside in ("web/package.json", "models/acme/../../../etc/passwd", "models/nobody/onnx/model.onnx",
                        "web/node_modules/", "models/acme/"):
            assert _get(url + outside)[0] == 404, outside
    finally:
        proc.terminate()
        proc.wait()


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a directory"),
    (["{empty}"], "no export or mixture in"),
    (["{batch}", "--port", "70000"], "is not a TCP port"),
    (["{batch}", "--web", "{empty}"], "holds no page/index.html"),
])
def test_bad_input_is_one_line_and_exit_2(web, batch, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    values = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "batch": batch}
    args = [a.format(**values) for a in args]
    web_args = [] if "--web" in args else ["--web", str(web)]
    proc = run_command([*CLI, *args, *web_args])
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("soup-run: error: ") and message in proc.stderr, proc.stderr


def test_a_web_dir_without_npm_packages_says_to_run_npm_ci(web, batch):
    import shutil

    shutil.rmtree(web / "node_modules")
    proc = run_command([*CLI, str(batch), "--web", str(web)])
    assert proc.returncode == 2 and "npm ci" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
