"""A specialist on disk: its I/O contract, tokenizer and onnxruntime session, and one decoder step.

The I/O contract (what `soup-export` writes, read from `genai_config.json`):
    inputs  input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
            past_key_values.{i}.key|value (B, KV, P, head) float32
    outputs logits (B, S, V) float32, present.{i}.key|value (B, KV, P+S, head) float32
The KV cache stays in onnxruntime-owned OrtValues between steps: present outputs are fed as the
next step's past inputs without a round trip through numpy (one `run_with_ort_values` call per
step, which measured less Python overhead than rebuilding an I/O binding of 2 x layers + 4
names every step); only the last position's logits are copied out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soup_run.errors import RunError
from soup_run.integrity import verify


@dataclass(frozen=True)
class Contract:
    layers: int
    kv_heads: int
    head_size: int
    vocab: int
    context: int
    eos: int
    pad: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    @classmethod
    def read(cls, model_dir: Path) -> "Contract":
        path = model_dir / "genai_config.json"
        if not path.is_file():
            raise RunError(f"{model_dir} has no genai_config.json; pass an export directory (or its onnx/) "
                           "written by `soup-export build`")
        m = json.loads(path.read_text())["model"]
        d = m["decoder"]
        return cls(d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"], m["vocab_size"],
                   m["context_length"], m["eos_token_id"], m.get("pad_token_id", m["eos_token_id"]),
                   d["inputs"]["past_key_names"], d["inputs"]["past_value_names"],
                   d["outputs"]["present_key_names"], d["outputs"]["present_value_names"])

    def past_names(self) -> list[str]:
        return [n % i for i in range(self.layers) for n in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        return [n % i for i in range(self.layers) for n in (self.present_key, self.present_value)]


def model_dir_of(path: Path) -> Path:
    """The directory holding model.onnx / model.ort: the export's onnx/ or the path itself."""
    path = Path(path)
    for candidate in (path / "onnx", path):
        if (candidate / "model.onnx").is_file() or (candidate / "model.ort").is_file():
            return candidate
    raise RunError(f"no model.onnx or model.ort under {path}; pass the directory written by `soup-export build`")


class Specialist:
    """Load (after verifying) and step a specialist. `threads=0` lets onnxruntime choose."""

    def __init__(self, path: Path, *, threads: int = 0, verify_files: bool = True, ort_format: bool | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.dir = model_dir_of(path)
        self.verified = verify(self.dir) if verify_files else 0
        self.contract = Contract.read(self.dir)
        self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        model_file = self._model_file(ort_format)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise RunError(f"onnxruntime cannot load {model_file}: {str(exc).splitlines()[0][:300]}; "
                           "the file is corrupt or not a soup-export model") from None
        self.model_file = model_file
        self._ort = ort
        self._past_names = self.contract.past_names()
        self._output_names = ["logits", *self.contract.present_names()]

    def _model_file(self, ort_format: bool | None) -> Path:
        onnx, ort_file = self.dir / "model.onnx", self.dir / "model.ort"
        if ort_format is True and not ort_file.is_file():
            raise RunError(f"{self.dir} has no model.ort; export with `soup-export build --ort-format`")
        if ort_format is True or (ort_format is None and not onnx.is_file()):
            return ort_file
        return onnx

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, prompts, cfg):
        from soup_run.generate import stream

        return stream(self, prompts, cfg)

    def generate(self, prompts, cfg):
        from soup_run.generate import generate

        return generate(self, prompts, cfg)

    # ------------------------------------------------------------------ steps
    def empty_past(self, batch: int) -> list:
        c = self.contract
        empty = np.zeros((batch, c.kv_heads, 0, c.head_size), np.float32)
        return [self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * c.layers)]

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list,
             all_logits: bool = False) -> tuple[np.ndarray, list]:
        """One forward: ids/positions (B, S), mask (B, P+S), past OrtValues -> (logits, present OrtValues).

        logits: (B, V) for the last position, or (B, S, V) with all_logits.
        """
        value = self._ort.OrtValue.ortvalue_from_numpy
        feeds = {"input_ids": value(np.ascontiguousarray(ids, dtype=np.int64)),
                 "attention_mask": value(np.ascontiguousarray(mask, dtype=np.int64)),
                 "position_ids": value(np.ascontiguousarray(positions, dtype=np.int64))}
        feeds.update(zip(self._past_names, past))
        outputs = self.session.run_with_ort_values(self._output_names, feeds)
        logits = outputs[0].numpy()
        return (logits if all_logits else logits[:, -1].copy()), list(outputs[1:])
