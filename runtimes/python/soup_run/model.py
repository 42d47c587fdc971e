"""A specialist on disk: its I/O contract, tokenizer and onnxruntime session, and one decoder step.

The I/O contract (what `soup-export` writes, read from `genai_config.json`):
    inputs  input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
            past_key_values.{i}.key|value (B, KV, P, head) float32
    outputs logits (B, S, V) float32, present.{i}.key|value (B, KV, P+S, head) float32
The KV cache is one preallocated onnxruntime buffer per layer and kind, (B, KV, context, head),
bound through an I/O binding as both the past input and the present output of every step:
GroupQueryAttention then writes each new position in place instead of copying the whole cache
into a new tensor (onnxruntime-genai's `past_present_share_buffer`). The cache bindings are made
once per sequence. A decode step rebinds only attention_mask: its input_ids and position_ids are
read in place from preallocated arrays and its logits land in a preallocated (B, 1, V) buffer.
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
    found = _model_dir(path)
    if found is not None:
        return found
    customers = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and _model_dir(p)) \
        if path.is_dir() else []
    hint = f" (this holds {len(customers)} exports: pass one, e.g. {path / customers[0]})" if customers else ""
    raise RunError(f"no model.onnx or model.ort under {path}; pass the directory written by `soup-export build`{hint}")


def _model_dir(path: Path) -> Path | None:
    """The export's onnx/ or the path itself, whichever holds model.onnx / model.ort, else None."""
    path = Path(path)
    for candidate in (path / "onnx", path):
        if (candidate / "model.onnx").is_file() or (candidate / "model.ort").is_file():
            return candidate
    return None


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
    def empty_past(self, batch: int) -> "KVCache":
        """A fresh KV cache for `batch` rows, up to the model's context."""
        return KVCache(self, batch)

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: "KVCache",
             all_logits: bool = False) -> tuple[np.ndarray, "KVCache"]:
        """One forward: ids/positions (B, S), mask (B, P+S), the cache after P tokens -> (logits, the cache
        after P+S tokens; the same object, updated in place).

        logits: (B, V) for the last position, or (B, S, V) with all_logits.
        """
        logits = past.run(ids, mask, positions)
        return (logits if all_logits else logits[:, -1].copy()), past  # not a view pinning (B, S, V)


class KVCache:
    """Past = present buffers of one sequence batch, with their I/O binding (see the module docstring).

    A decode step (one new token per row) is the hot path: its input_ids and position_ids live in
    (B, 1) arrays that onnxruntime reads in place (bound once, overwritten per step), its logits
    land in a bound (B, 1, V) buffer, and only attention_mask (its length grows) is rebound, as a
    zero-copy view of the caller's array. A prefill (several new tokens) binds the caller's arrays and
    lets onnxruntime allocate its (B, S, V) logits.
    """

    def __init__(self, model: Specialist, batch: int) -> None:
        c, ort = model.contract, model._ort
        self.model, self.batch, self.length = model, batch, 0
        self._value = ort.OrtValue.ortvalue_from_numpy  # wraps CPU numpy memory without copying
        self.binding = model.session.io_binding()
        shape = (batch, c.kv_heads, c.context, c.head_size)
        self.buffers = [self._value(np.zeros(shape, np.float32)) for _ in range(2 * c.layers)]
        for past, present, value in zip(c.past_names(), c.present_names(), self.buffers):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self._ids, self._positions = np.zeros((batch, 1), np.int64), np.zeros((batch, 1), np.int64)
        self._step_values = (self._value(self._ids), self._value(self._positions))
        self._logits = np.zeros((batch, 1, c.vocab), np.float32)
        self._step_logits = self._value(self._logits)
        self._mask = None  # the bound attention_mask OrtValue, kept alive while bound
        self._bound = None  # what input_ids / position_ids / logits are bound to: "decode" or "prefill"

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(B, S, V) logits; the new positions' keys and values are written into the buffers."""
        b, s = ids.shape
        total = mask.shape[1]
        if b != self.batch or total != self.length + s:
            raise RunError(f"cache holds {self.batch} rows of {self.length} tokens; got {b} rows, {s} new tokens "
                           f"and a mask of {total}")
        if total > self.model.contract.context:
            raise RunError(f"{total} tokens exceed the model's context of {self.model.contract.context}")
        bind = self.binding
        self._mask = self._value(np.ascontiguousarray(mask, dtype=np.int64))
        bind.bind_ortvalue_input("attention_mask", self._mask)
        if s == 1:
            self._ids[:], self._positions[:] = ids, positions
            if self._bound != "decode":
                bind.bind_ortvalue_input("input_ids", self._step_values[0])
                bind.bind_ortvalue_input("position_ids", self._step_values[1])
                bind.bind_ortvalue_output("logits", self._step_logits)
                self._bound = "decode"
        else:
            bind.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
            bind.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
            bind.bind_output("logits")  # a new shape every prefill: onnxruntime allocates it
            self._bound = "prefill"
        self.model.session.run_with_iobinding(bind)
        self.length = total
        if s == 1:
            return self._logits.copy()  # owned: the buffer is rewritten by the next step
        return bind.get_outputs()[-1].numpy()
