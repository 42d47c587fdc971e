"""soup-run's own contract: no import cycle between its modules, the decoder protocol, one place for every
name it reads from an export, and one-line errors for prompt and score files it cannot read."""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# found, not imported: with an import cycle the package may not import, and the cycle test should say why
PACKAGE = Path(importlib.util.find_spec("soup_run").submodule_search_locations[0])


# ---------------------------------------------------------------------------- import graph
def sources() -> dict[str, str]:
    """{module name: source} of every module of soup_run (the package itself is `soup_run`)."""
    return {("soup_run" if p.stem == "__init__" else f"soup_run.{p.stem}"): p.read_text()
            for p in sorted(PACKAGE.glob("*.py"))}


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """{module: the soup_run modules it imports}, from every import statement wherever it stands
    (module level, in a function, under `if TYPE_CHECKING`)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, source in modules.items():
        package = module if module == "soup_run" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package if node.level else node.module  # relative imports: soup_run has one level
                if node.level and node.module:
                    base = f"{package}.{node.module}"
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":  # an ancestor on the path: the path from it closes a cycle
                return path[path.index(nxt):] + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_module_of_soup_run_imports_another_in_a_cycle():
    graph = import_graph(sources())
    assert "soup_run.generate" in graph["soup_run.model"]  # Specialist.stream/generate sit on generate.py
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    for module in ("soup_run.generate", "soup_run.chat", "soup_run.score"):  # they need the protocol only
        assert "soup_run.model" not in reachable(graph, module), module


def test_the_cycle_check_sees_generate_importing_the_model():
    modules = sources()
    modules["soup_run.generate"] += "\nfrom soup_run.model import Specialist\n"
    assert find_cycle(import_graph(modules)) == ["soup_run.generate", "soup_run.model", "soup_run.generate"]
    modules = sources()
    modules["soup_run.generate"] += "\ndef f():\n    from soup_run import Specialist\n"  # in a function, via the package
    assert find_cycle(import_graph(modules)) == ["soup_run", "soup_run.generate", "soup_run"]


# ---------------------------------------------------------------------------- the contract module
def test_only_contract_py_spells_the_names_it_defines():
    """Outside docstrings, no other module has one of its names as a literal (or a file name inside one)."""
    from soup_run import contract as c

    files = {c.MODEL_FILE, c.DATA_FILE, c.ORT_FILE, c.GENAI_CONFIG, c.TOKENIZER, c.MANIFEST}
    names = {*files, c.ONNX_DIR, c.MIXTURE_KIND, *c.INPUTS, c.LOGITS, *c.PAST, *c.PRESENT}
    found = []
    for module, source in sources().items():
        if module == "soup_run.contract":
            continue
        tree = ast.parse(source)
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if node.value in names or any(name in node.value for name in files):
                    found.append(f"{module}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_contract_names():
    from soup_run import contract

    assert contract.contract_names(2) == {
        "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
                   "past_key_values.1.key", "past_key_values.1.value"],
        "outputs": ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]}
    assert contract.FILES == ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def export(debug_ckpt, debug_data, tmp_path_factory):
    """An fp32 export of the session's debug checkpoint."""
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate
    from soup_export.resolve import Bank

    out = tmp_path_factory.mktemp("contract") / "fp32"
    mix = validate({"licences": 0.8, "python-docs": 0.2}, Bank.open(debug_ckpt).info.domains)
    build(debug_ckpt, mix, out, ExportSpec(quant="fp32", data=str(debug_data)))
    return out


def test_an_export_has_the_files_and_graph_names_of_the_contract(export):
    from soup_run import Specialist, contract
    from soup_run.decoder import Decoder

    model = Specialist(export)
    assert model.dir == export / contract.ONNX_DIR and (export / contract.MANIFEST).is_file()
    assert all((model.dir / name).is_file() for name in contract.FILES)
    c = model.contract
    assert (c.past_key, c.past_value, c.present_key, c.present_value) == (*contract.PAST, *contract.PRESENT)
    names = contract.contract_names(c.layers)
    assert [i.name for i in model.session.get_inputs()] == names["inputs"]
    assert [o.name for o in model.session.get_outputs()] == names["outputs"]
    assert isinstance(model, Decoder)  # what generate, chat, score and routing use


# ---------------------------------------------------------------------------- files soup-run cannot read
def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soup_run.cli", *argv], capture_output=True, text=True)


def assert_one_line_error(proc, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("soup-run: error: ") and all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("command, content, words", [
    ("generate", b"\xff\xfe\x00bad", ["is not UTF-8 text", "save it as UTF-8"]),
    ("generate", None, ["is not a file"]),
    ("generate", "dir", ["is not a file"]),
    ("score", b"fine start \xe9t\xe9 in latin-1", ["is not UTF-8 text", "save it as UTF-8"]),
    ("score", None, ["is not a file"]),
    ("score", "dir", ["is not a file"]),
])
def test_a_prompt_or_score_file_it_cannot_read_is_one_line_and_exit_2(export, tmp_path, command, content, words):
    path = tmp_path / "texts.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    argv = ["--prompt-file", str(path)] if command == "generate" else [str(path)]
    assert_one_line_error(run_cli(command, str(export), *argv), str(path), *words)


@pytest.mark.parametrize("command", ["generate", "score"])
def test_an_unreadable_file_is_one_line_and_exit_2(export, tmp_path, monkeypatch, capsys, command):
    from soup_run import cli

    path = tmp_path / "locked.txt"
    path.write_text("some text to read\n")
    read_text = Path.read_text

    def locked(self, *args, **kwargs):  # chmod cannot lock a file for root: refuse it here
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked)
    argv = ["--prompt-file", str(path)] if command == "generate" else [str(path)]
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, str(export), *argv])
    proc = subprocess.CompletedProcess([], exit_.value.code, "", capsys.readouterr().err)
    assert_one_line_error(proc, str(path), "cannot be read", "Permission denied")


def test_a_broken_genai_config_is_one_line_and_exit_2(export, tmp_path):
    from soup_run import contract

    copy = tmp_path / "copy"
    shutil.copytree(export / contract.ONNX_DIR, copy / contract.ONNX_DIR)
    (copy / contract.ONNX_DIR / contract.GENAI_CONFIG).write_text(json.dumps({"model": {}}))
    proc = run_cli("generate", str(copy), "--prompt", "x", "--no-verify")
    assert_one_line_error(proc, contract.GENAI_CONFIG, "rebuild the export")
