"""The export format has one owner (`soup_export/layout.py`) and the runtime one torch-free copy of
its contract (`soup_run/contract.py`): the two agree on names, I/O and files, on a real export."""
from __future__ import annotations

import json

import onnx
import pytest

import soup_export.layout as layout
import soup_run.contract as contract


@pytest.fixture(scope="module")
def export(debug_ckpt, tmp_path_factory):
    from soup_export.bank import Bank
    from soup_export.build import ExportSpec, build
    from soup_export.mix import validate

    domains = Bank.open(debug_ckpt).info.domains
    out = tmp_path_factory.mktemp("contract") / "acme"
    build(debug_ckpt, validate({domains[0]: 1.0}, domains, "weights", "acme"), out,
          ExportSpec(quant="int4", parity=False, ort_format=False))
    return out


def test_the_runtime_contract_names_what_layout_writes():
    for name in ("ONNX_DIR", "MODEL_FILE", "DATA_FILE", "ORT_FILE", "GENAI_CONFIG", "TOKENIZER", "MANIFEST",
                 "INPUTS", "LOGITS", "PAST", "PRESENT", "MIXTURE_KIND"):
        assert getattr(contract, name) == getattr(layout, name), name
    for layers in (1, 3):
        assert contract.contract_names(layers) == layout.io_names(layers)


def test_an_export_holds_the_contract_and_its_graph_has_its_io(export):
    onnx_dir = layout.onnx_dir(export)
    assert onnx_dir == export / contract.ONNX_DIR
    for name in contract.FILES:
        assert (onnx_dir / name).is_file(), name
    config = json.loads((onnx_dir / layout.GENAI_CONFIG).read_text())
    read = contract.Contract.read(onnx_dir)
    arch, _ = layout.read_arch(onnx_dir)
    assert (read.layers, read.kv_heads, read.head_size, read.vocab, read.context) == \
        (arch.layers, arch.kv_heads, arch.head_dim, arch.vocab, arch.max_pos)
    decoder = config["model"]["decoder"]
    assert (read.past_key, read.past_value) == contract.PAST and (read.present_key, read.present_value) == contract.PRESENT
    assert decoder["filename"] == contract.MODEL_FILE
    model = onnx.load(str(onnx_dir / contract.MODEL_FILE), load_external_data=False)
    names = {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}
    assert names == contract.contract_names(arch.layers) == layout.io_names(arch.layers)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {contract.DATA_FILE}
    manifest = layout.read_manifest(export)
    listed = set(manifest["files"])
    assert {f"{contract.ONNX_DIR}/{name}" for name in contract.FILES} <= listed
    assert layout.verify_files(export, manifest) == len(listed)
