"""What generation, scoring, chat and routing need from a model: the `Decoder` protocol.

`generate`, `score` and `chat` depend on this protocol, not on `model.Specialist`, so `model.py` can
offer `Specialist.stream/generate` on top of `generate.py` without an import cycle. The mixture's
routing uses these members too (it builds its Specialists itself). `Specialist` satisfies the
protocol, and so does any object with these members; `genai_engine.GenaiSpecialist` does not
(onnxruntime-genai runs its own loop, so it has no `step`).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from soup_run.contract import Contract


@runtime_checkable
class Decoder(Protocol):
    contract: Contract  # generation reads eos, pad, context and vocab from it

    def encode(self, text: str) -> list[int]:
        """Token ids of a text."""

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens skipped."""

    def empty_past(self, batch: int) -> Any:
        """A fresh KV cache for `batch` rows; opaque to callers, passed back to `step`."""

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any,
             all_logits: bool = False) -> tuple[np.ndarray, Any]:
        """One forward: ids/positions (B, S), mask (B, P+S), the cache after P tokens -> (logits, the cache
        after P+S tokens). logits: (B, V) for the last position, or (B, S, V) with all_logits."""
