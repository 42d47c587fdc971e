"""`soup-run serve`: the JavaScript runner's page and an export (or batch, or mixture) on localhost.

Standard library only. Three trees are served, nothing else: `/` the page (runtimes/web/page),
`/web/` the runner's modules and the two npm packages the page loads (onnxruntime-web's
WebAssembly build and @huggingface/tokenizers, from runtimes/web/node_modules), and
`/models/NAME/` each export's files; `/models.json` lists the exports. Every response carries
the two headers that make the page cross-origin isolated, which WebAssembly threads need
(SharedArrayBuffer): `Cross-Origin-Opener-Policy: same-origin` and
`Cross-Origin-Embedder-Policy: require-corp`.
"""
from __future__ import annotations

import json
import mimetypes
import posixpath
import sys
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from soup_run.contract import MANIFEST, MIXTURE_KIND, ONNX_DIR, _model_dir
from soup_run.errors import RunError

ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache"}
WEB_FILES = ("page", "src", "node_modules/onnxruntime-web/dist", "node_modules/@huggingface/tokenizers/dist")
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".html": "text/html; charset=utf-8", ".css": "text/css", ".onnx": "application/octet-stream",
         ".data": "application/octet-stream", ".map": "application/json"}


def default_web_dir() -> Path:
    """runtimes/web next to this package in a checkout of the repository."""
    return Path(__file__).resolve().parents[2] / "web"


def check_web_dir(web: Path) -> Path:
    web = Path(web)
    if not (web / "page" / "index.html").is_file():
        raise RunError(f"{web} holds no page/index.html; pass --web RUNTIMES_WEB_DIR (runtimes/web of the repository)")
    if not (web / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        raise RunError(f"{web}/node_modules has no onnxruntime-web; run `ONNXRUNTIME_NODE_INSTALL=skip npm ci` in {web}")
    return web


def _kind(path: Path) -> str | None:
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("kind") == MIXTURE_KIND:
                return "mixture"
        except ValueError:
            pass
    return "specialist" if _model_dir(path) is not None and (path / ONNX_DIR).is_dir() else None


def _tier(path: Path, kind: str) -> str:
    try:
        if kind == "mixture":
            return str(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("tier", "?"))
        return str(json.loads((path / ONNX_DIR / "export.json").read_text(encoding="utf-8")).get("tier", "?"))
    except (OSError, ValueError):
        return "?"


def list_models(root: Path) -> dict[str, Path]:
    """name -> directory: the export or mixture itself, or every one in a batch directory."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root} is not a directory; pass an export, mixture or batch directory written by soup-export")
    if _kind(root):
        return {root.resolve().name: root}
    found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and _kind(p)}
    if not found:
        raise RunError(f"no export or mixture in {root}; pass a directory written by `soup-export build`, `batch` "
                       "or `mixture`")
    return found


class Handler(SimpleHTTPRequestHandler):
    """GET/HEAD of the three trees (module docstring); 404 for anything else."""

    def __init__(self, *args, web: Path, models: dict[str, Path], **kwargs):
        self.web, self.models = web, models
        super().__init__(*args, directory=str(web), **kwargs)

    def end_headers(self) -> None:
        for name, value in ISOLATION.items():
            self.send_header(name, value)
        super().end_headers()

    def guess_type(self, path) -> str:
        return TYPES.get(Path(str(path)).suffix, mimetypes.guess_type(str(path))[0] or "application/octet-stream")

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def _listing(self) -> bytes:
        rows = [{"name": n, "url": f"/models/{n}/", "kind": _kind(p), "tier": _tier(p, _kind(p))}
                for n, p in self.models.items()]
        return json.dumps(rows).encode()

    def translate_path(self, path: str) -> str:
        parts = [p for p in posixpath.normpath(unquote(urlsplit(path).path)).split("/") if p and p not in (".", "..")]
        if not parts:
            return str(self.web / "page" / "index.html")
        if parts[0] == "models" and len(parts) > 2 and parts[1] in self.models:
            return str(self.models[parts[1]].joinpath(*parts[2:]))
        if parts[0] == "web":
            rel = "/".join(parts[1:])
            if any(rel.startswith(tree + "/") for tree in WEB_FILES):
                return str(self.web.joinpath(*parts[1:]))
        if len(parts) == 1 and (self.web / "page" / parts[0]).is_file():
            return str(self.web / "page" / parts[0])
        return str(self.web / "page" / ".not-served")  # a 404, never a directory listing

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "not found")
        return None

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if urlsplit(self.path).path == "/models.json":
            body = self._listing()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


def serve(root: Path, port: int, host: str = "127.0.0.1", web: Path | None = None) -> None:
    """Serve until interrupted; prints the URL (port 0 picks a free port)."""
    if not 0 <= port <= 65535:
        raise RunError(f"--port {port} is not a TCP port; pass 0..65535 (0 picks a free one)")
    web = check_web_dir(web or default_web_dir())
    models = list_models(root)
    try:
        server = ThreadingHTTPServer((host, port), partial(Handler, web=web, models=models))
    except OSError as exc:
        raise RunError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port") from None
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"soup-run: serving {len(models)} model(s) ({', '.join(models)}) on {url}", flush=True)
    print("soup-run: press Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
