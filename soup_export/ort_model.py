"""A small onnxruntime wrapper around an exported decoder: forward with a KV cache, and greedy decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soup_export.layout import MODEL_FILE, decoder_feeds, read_arch


class OrtDecoder:
    def __init__(self, directory: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        self.arch, self.config = read_arch(Path(directory))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(directory) / MODEL_FILE), opts, providers=["CPUExecutionProvider"])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        a = self.arch
        return [np.zeros((batch, a.kv_heads, 0, a.head_dim), np.float32) for _ in range(2 * a.layers)]

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids/positions (B, S), mask (B, P+S) -> logits (B, S, V), present (2 * layers arrays)."""
        past = past if past is not None else self.empty_past(len(ids))
        feeds = decoder_feeds(ids.astype(np.int64), mask.astype(np.int64), positions.astype(np.int64), past)
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits of unpadded rows (B, S) -> (B, S, V)."""
        b, s = ids.shape
        return self.forward(ids, np.ones((b, s), np.int64), np.broadcast_to(np.arange(s), (b, s)))[0]

    def greedy(self, prompt: list[int], new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy decoding with the KV cache (batch 1)."""
        ids = np.asarray([prompt], np.int64)
        logits, past = self.forward(ids, np.ones_like(ids), np.arange(len(prompt))[None])
        out: list[int] = []
        for step in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == eos_id or len(prompt) + len(out) >= self.arch.max_pos:
                break
            total = len(prompt) + len(out)
            logits, past = self.forward(np.asarray([[token]]), np.ones((1, total), np.int64),
                                        np.asarray([[total - 1]]), past)
        return out
