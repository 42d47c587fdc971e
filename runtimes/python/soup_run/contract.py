"""What the runner reads from an export: file names, graph I/O names and the decoder's shapes.

`soup-export build` writes an export directory and `soup_run` reads it. Every name the runner relies
on is defined here once, without torch, so the other modules use these constants instead of
literals and one test can compare them with what the export side writes.

The past and present name patterns are read from each export's `genai_config.json` (onnxruntime-genai
reads the same file); PAST and PRESENT are the patterns `soup-export` writes there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from soup_run.errors import RunError

# files
ONNX_DIR = "onnx"  # the export's shippable sub-directory
MODEL_FILE = "model.onnx"  # the graph
DATA_FILE = "model.onnx.data"  # its weights (external data, read by onnxruntime)
ORT_FILE = "model.ort"  # the onnxruntime mobile format (`soup-export build --ort-format`); optional
GENAI_CONFIG = "genai_config.json"  # the decoder's shapes and I/O names
TOKENIZER = "tokenizer.json"  # HF tokenizers byte-level BPE
MANIFEST = "manifest.json"  # SHA-256 and size of every file; in the export directory, above onnx/
FILES = (MODEL_FILE, DATA_FILE, GENAI_CONFIG, TOKENIZER)  # what every export's onnx/ holds for the runner

# graph inputs and outputs; the past/present patterns take the layer index
INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
LOGITS = "logits"
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")

MIXTURE_KIND = "smalltalk-mixture"  # the `kind` of a mixture's manifest.json (`soup-export mixture`)


def _per_layer(layers: int, patterns: tuple[str, str]) -> list[str]:
    return [name % i for i in range(layers) for name in patterns]


def contract_names(layers: int) -> dict[str, list[str]]:
    """The graph's input and output names, in graph order, for a decoder of `layers` layers."""
    return {"inputs": [*INPUTS, *_per_layer(layers, PAST)], "outputs": [LOGITS, *_per_layer(layers, PRESENT)]}


@dataclass(frozen=True)
class Contract:
    """The decoder's shapes, special tokens and cache names, as one export's genai_config.json gives them."""

    layers: int
    kv_heads: int
    head_size: int
    vocab: int
    context: int
    eos: int
    pad: int
    past_key: str  # %d patterns, PAST and PRESENT in every soup-export
    past_value: str
    present_key: str
    present_value: str

    @classmethod
    def read(cls, model_dir: Path) -> "Contract":
        path = Path(model_dir) / GENAI_CONFIG
        if not path.is_file():
            raise RunError(f"{model_dir} has no {GENAI_CONFIG}; pass an export directory (or its {ONNX_DIR}/) "
                           "written by `soup-export build`")
        try:
            m = json.loads(path.read_text(encoding="utf-8"))["model"]
            d = m["decoder"]
            return cls(d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"], m["vocab_size"],
                       m["context_length"], m["eos_token_id"], m.get("pad_token_id", m["eos_token_id"]),
                       d["inputs"]["past_key_names"], d["inputs"]["past_value_names"],
                       d["outputs"]["present_key_names"], d["outputs"]["present_value_names"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path} is not a soup-export {GENAI_CONFIG} ({type(exc).__name__}: {exc}); "
                           "rebuild the export") from None

    def past_names(self) -> list[str]:
        return _per_layer(self.layers, (self.past_key, self.past_value))

    def present_names(self) -> list[str]:
        return _per_layer(self.layers, (self.present_key, self.present_value))


def model_dir_of(path: Path) -> Path:
    """The directory holding model.onnx / model.ort: the export's onnx/ or the path itself."""
    path = Path(path)
    found = _model_dir(path)
    if found is not None:
        return found
    customers = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and _model_dir(p)) \
        if path.is_dir() else []
    hint = f" (this holds {len(customers)} exports: pass one, e.g. {path / customers[0]})" if customers else ""
    raise RunError(f"no {MODEL_FILE} or {ORT_FILE} under {path}; pass the directory written by `soup-export build`"
                   f"{hint}")


def _model_dir(path: Path) -> Path | None:
    """The export's onnx/ or the path itself, whichever holds model.onnx / model.ort, else None."""
    path = Path(path)
    for candidate in (path / ONNX_DIR, path):
        if (candidate / MODEL_FILE).is_file() or (candidate / ORT_FILE).is_file():
            return candidate
    return None
