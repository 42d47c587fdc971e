"""runtimes/web, the JavaScript runner, against soup-run on the same exports: the Node tests
(`node --test runtimes/web/test/`, fed soup-run's outputs as references) and the browser test
(headless chromium driving the page of `soup-run serve`)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soup_run import GenerationConfig, Specialist, generate
from soup_run.generate import generate_ids, stream
from soup_run.integrity import verify
from soup_run.sampling import Sampling
from tests.procs import run_command

WEB = Path(__file__).resolve().parents[1] / "runtimes" / "web"
PROMPT = "Permission is hereby granted, free of charge, to any person"
TEXTS = [PROMPT, "import os\n\ndef main():\n    return 0", "Ünïcödé: naïve café, Grüße, 日本語, emoji 🎉 — done.", "  two  spaces\ttab\r\n"]
BATCH = ["import os", PROMPT, "The"]
HOT = Sampling(temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2)
# held out: no domain of the debug soup was trained on this paragraph
HELD_OUT = ("The committee met on a wet Tuesday to decide where the new library would stand. Some wanted it by the "
            "river, where the old mill had been; others argued for the square, close to the school and the station.")
TOP1_AGREEMENT = 0.95  # int4 in WebAssembly vs native: same argmax on at least this share of positions
GREEDY = 32


def _need_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the JavaScript runner's tests need Node 20+ and npm (`make test` says so too)")
    if not (WEB / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail(f"{WEB}/node_modules is missing: run `make web-install` (npm ci with ONNXRUNTIME_NODE_INSTALL=skip)")
    return node


@pytest.fixture(scope="module")
def web_exports(debug_ckpt, debug_data, smalltalk_run, tmp_path_factory) -> Path:
    """A batch directory: fp32, int8 and int4 exports of the test soup and an fp32 SmallTalk mixture."""
    from soup_export.bank import Bank
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_export.mixture import export_mixture

    root = tmp_path_factory.mktemp("web")
    mix = validate({"licences": 0.8, "python-docs": 0.2}, Bank.open(debug_ckpt).info.domains)
    for tier in ("fp32", "int8", "int4"):
        build(debug_ckpt, mix, root / tier, ExportSpec(quant=tier, data=str(debug_data), parity=False, keep_hf=False))
    export_mixture(smalltalk_run, root / "mixture", ExportSpec(quant="fp32", parity=False), progress=False)
    shutil.copytree(root / "int4", root / "tampered")  # one bit of its weights flipped: the page must refuse it
    data = bytearray((root / "tampered" / "onnx" / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "tampered" / "onnx" / "model.onnx.data").write_bytes(bytes(data))
    return root


def _stepped_logits(model: Specialist, ids: list[int], steps: int) -> list[list[float]]:
    """Greedy decoding's logits: at the prefill's last position, then after each of `steps` decode steps."""
    logits, past = model.step(np.asarray([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                              model.empty_past(1))
    out = [logits[0]]
    for k in range(steps):
        n = len(ids) + k + 1
        logits, past = model.step(np.asarray([[int(out[-1].argmax())]]), np.ones((1, n), np.int64), np.asarray([[n - 1]]), past)
        out.append(logits[0])
    return [row.astype(float).tolist() for row in out]


def _stream_logits(model: Specialist, prompts: list[str], n: int) -> dict:
    """The logits `stream` chose each token from (the prefill, then every decode step) on a left-padded batch."""
    steps, step = [], model.step

    def recording(ids, mask, positions, past, all_logits=False):
        logits, past = step(ids, mask, positions, past, all_logits)
        steps.append(logits.astype(float).tolist())
        return logits, past

    model.step = recording
    list(stream(model, prompts, GenerationConfig(max_new_tokens=n, stop_at_eos=False)))
    model.step = step
    return {"prompts": prompts, "n": n, "steps": steps}


def _mixture_refs(path: Path) -> dict:
    from soup_run.mixture import RoutedMixture

    mixture = RoutedMixture(path)
    rows = []
    for text in TEXTS[:2]:
        e, scores = mixture.route(text)
        expert = mixture.expert(e)
        ids = mixture.encode(text)[:expert.contract.context // 2]  # the experts' context is short
        n = min(GREEDY, expert.contract.context - len(ids))
        rows.append({"text": text, "expert": e, "scores": scores.tolist(), "n": n, "ids": ids,
                     "greedy": generate_ids(expert, ids, GenerationConfig(max_new_tokens=n, stop_at_eos=False))})
    return {"path": str(path), "routes": rows}


@pytest.fixture(scope="module")
def refs(web_exports, tmp_path_factory) -> Path:
    """soup-run's outputs on every export, as the JSON the Node tests read."""
    out = {"exports": {}, "greedy": {}, "listed": {}, "prompt": PROMPT}
    for tier in ("fp32", "int8", "int4"):
        model = Specialist(web_exports / tier)
        out["exports"][tier] = str(web_exports / tier)
        out["listed"][tier] = verify(model.dir)
        out["greedy"][tier] = generate_ids(model, model.encode(PROMPT), GenerationConfig(max_new_tokens=GREEDY, stop_at_eos=False))
    fp32 = Specialist(web_exports / "fp32")
    ids = fp32.encode(PROMPT)
    out["prompt_ids"] = ids
    out["tokenizer"] = [{"text": t, "ids": fp32.encode(t), "decoded": fp32.decode(fp32.encode(t))} for t in TEXTS]
    out["logits"] = _stepped_logits(fp32, ids, 2)
    out["stream_logits"] = _stream_logits(fp32, BATCH[:2], 8)
    sampled = GenerationConfig(max_new_tokens=24, seed=7, sampling=HOT, stop_at_eos=False)
    out["sampled"] = {"seed": 7, "sampling": {"temperature": HOT.temperature, "topK": HOT.top_k, "topP": HOT.top_p,
                                              "repetitionPenalty": HOT.repetition_penalty},
                      "ids": generate_ids(fp32, ids, sampled)}
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    out["batch"] = {"prompts": BATCH, "texts": generate(fp32, BATCH, cfg), "alone": [generate(fp32, [p], cfg)[0] for p in BATCH]}
    out["mixture"] = _mixture_refs(web_exports / "mixture")
    path = tmp_path_factory.mktemp("web-refs") / "refs.json"
    path.write_text(json.dumps(out))
    return path


def test_node_runner_equals_soup_run(refs):
    """`node --test` on runtimes/web/test with soup-run's references: every Node test runs, none skipped."""
    node = _need_node()
    proc = run_command([node, "--test", "--test-reporter=tap", *sorted(str(p) for p in (WEB / "test").glob("*.test.js"))],
                       env={**os.environ, "SOUP_WEB_REFS": str(refs)})
    summary = {k: int(v) for k, v in (line[2:].split(" ", 1) for line in proc.stdout.splitlines()
                                      if line.startswith("# ") and line[2:].split(" ")[0] in ("tests", "pass", "fail", "skipped", "todo"))}
    print(summary)
    assert proc.returncode == 0 and summary.get("fail") == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert summary.get("skipped") == 0 and summary.get("todo") == 0 and summary.get("pass", 0) >= 20, summary


@pytest.fixture(scope="module")
def server(web_exports):
    """`soup-run serve` on the batch directory, on a free port; its URL."""
    _need_node()
    cmd = [sys.executable, "-m", "soup_run.cli", "serve", str(web_exports), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        pytest.fail(f"soup-run serve did not start: {line}{proc.stderr.read()}")
    yield line.rsplit(" on ", 1)[1].strip()
    proc.terminate()
    proc.wait()


def _browser(url: str, tasks: list[dict], tmp_path: Path) -> list:
    chromium = os.environ.get("SOUP_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        pytest.fail(f"{chromium} is missing: the browser test needs Debian's chromium (`apt-get install -y chromium`; "
                    ".ci/run installs it)")
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    proc = run_command(["node", str(WEB / "tools" / "browser.mjs"), url, str(tmp_path / "tasks.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_page_runs_fp32_and_int4_like_soup_run(server, web_exports, tmp_path):
    """In headless chromium, from the page of `soup-run serve`: files are verified with WebCrypto (a
    flipped bit is refused by name), the fp32 export's greedy tokens equal
    soup-run's, the page's Generate button prints soup-run's text, and the int4 export's teacher-forced
    top-1 (WebAssembly int4 kernels) agrees with soup-run's on >= 95% of a held-out text's positions."""
    fp32, int4 = Specialist(web_exports / "fp32"), Specialist(web_exports / "int4")
    ids = fp32.encode(PROMPT)
    held = int4.encode(HELD_OUT)[:int4.contract.context]
    cfg = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    threads, verified, tampered, greedy, ui, forced, routed = _browser(server, [
        {"do": "threads"},
        {"do": "open", "model": "/models/int4/"},
        {"do": "open", "model": "/models/tampered/"},
        {"do": "greedy", "model": "/models/fp32/", "ids": ids, "n": GREEDY},
        {"do": "ui", "model": "/models/fp32/", "prompt": PROMPT, "n": 16},
        {"do": "logits", "model": "/models/int4/", "ids": held},
        {"do": "ui", "model": "/models/mixture/", "prompt": "import os", "n": 4},
    ], tmp_path)
    assert threads["isolated"] is True  # the COOP/COEP headers: WebAssembly threads available
    assert verified == {"ok": True, "verified": verify(int4.dir)}  # WebCrypto checked every listed file
    assert not tampered["ok"] and "model.onnx.data does not match its SHA-256" in tampered["error"], tampered
    assert greedy == generate_ids(fp32, ids, GenerationConfig(max_new_tokens=GREEDY, stop_at_eos=False))
    assert ui["output"] == PROMPT + generate(fp32, [PROMPT], cfg)[0] and "tokens/s" in ui["status"]
    x = np.asarray([held])
    native = int4.step(x, np.ones_like(x), np.arange(len(held))[None], int4.empty_past(1), all_logits=True)[0][0]
    web = np.frombuffer(base64.b64decode(forced["logits"]), np.float32).reshape(native.shape)
    agree = float(np.mean(np.asarray(forced["top1"]) == native.argmax(-1)))
    print(f"int4 WebAssembly vs native: top-1 agreement {agree:.3f} over {len(held)} positions, "
          f"max |logit diff| {np.abs(web - native).max():.4f}")
    assert agree >= TOP1_AGREEMENT, agree
    assert "routed to expert" in routed["status"], routed
