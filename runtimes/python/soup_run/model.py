"""A specialist on disk: its tokenizer and onnxruntime session, and one decoder step (a `Decoder`).

The I/O contract (what `soup-export` writes, read from `genai_config.json`; names in `contract.py`):
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

from pathlib import Path

import numpy as np

from soup_run.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, MODEL_FILE, ORT_FILE, POSITION_IDS, TOKENIZER,
                               Contract, model_dir_of)
from soup_run.errors import RunError
from soup_run.generate import generate, stream
from soup_run.integrity import verify


class Specialist:
    """Load (after verifying) and step a specialist. `threads=0` lets onnxruntime choose."""

    def __init__(self, path: Path, *, threads: int = 0, verify_files: bool = True, ort_format: bool | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.dir = model_dir_of(path)
        self.verified = verify(self.dir) if verify_files else 0
        self.contract = Contract.read(self.dir)
        self.tokenizer = Tokenizer.from_file(str(self.dir / TOKENIZER))
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
        onnx, ort_file = self.dir / MODEL_FILE, self.dir / ORT_FILE
        if ort_format is True and not ort_file.is_file():
            raise RunError(f"{self.dir} has no {ORT_FILE}; export with `soup-export build --ort-format`")
        if ort_format is True or (ort_format is None and not onnx.is_file()):
            return ort_file
        return onnx

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, prompts, cfg):
        return stream(self, prompts, cfg)

    def generate(self, prompts, cfg):
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
        bind.bind_ortvalue_input(ATTENTION_MASK, self._mask)
        if s == 1:
            self._ids[:], self._positions[:] = ids, positions
            if self._bound != "decode":
                bind.bind_ortvalue_input(INPUT_IDS, self._step_values[0])
                bind.bind_ortvalue_input(POSITION_IDS, self._step_values[1])
                bind.bind_ortvalue_output(LOGITS, self._step_logits)
                self._bound = "decode"
        else:
            bind.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
            bind.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
            bind.bind_output(LOGITS)  # a new shape every prefill: onnxruntime allocates it
            self._bound = "prefill"
        self.model.session.run_with_iobinding(bind)
        self.length = total
        if s == 1:
            return self._logits.copy()  # owned: the buffer is rewritten by the next step
        return bind.get_outputs()[-1].numpy()
