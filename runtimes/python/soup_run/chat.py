"""An interactive loop that keeps the KV cache across turns.

Each turn appends the user's text (and a newline) to the conversation, feeds only the new tokens
through the model with the cached past, and continues the text. When the conversation would
exceed the context, the cache is dropped and the conversation restarts from the latest turn.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from soup_run.decoder import Decoder
from soup_run.generate import GenerationConfig
from soup_run.sampling import choose


class Conversation:
    def __init__(self, model: Decoder, cfg: GenerationConfig) -> None:
        self.model, self.cfg = model, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.past = self.model.empty_past(1)
        self.logits = None

    def _feed(self, ids: list[int]) -> None:
        start = len(self.tokens)
        self.tokens += ids
        x = np.asarray([ids], np.int64)
        mask = np.ones((1, len(self.tokens)), np.int64)
        self.logits, self.past = self.model.step(x, mask, np.arange(start, len(self.tokens))[None], self.past)

    def turn(self, text: str, emit: Callable[[str], None]) -> str:
        ids = self.model.encode(text + "\n")
        c = self.model.contract
        if len(self.tokens) + len(ids) + self.cfg.max_new_tokens >= c.context:
            emit("[context full: starting a new conversation]\n")
            self.reset()
            ids = ids[-(c.context - self.cfg.max_new_tokens - 1):]
        self._feed(ids)
        out: list[int] = []
        printed = ""
        seen = np.zeros(c.vocab, bool)
        seen[self.tokens] = True
        for _ in range(self.cfg.max_new_tokens):
            token = choose(self.logits[0], seen, self.cfg.sampling, self.rng)
            seen[token] = True
            if token == c.eos:
                break
            out.append(token)
            text_out = self.model.decode(out)
            if not text_out.endswith("\ufffd"):
                emit(text_out[len(printed):])
                printed = text_out
            self._feed([token])
            if any(s and s in printed for s in self.cfg.stop) or printed.endswith("\n\n"):
                break
        emit("\n")
        return printed


def run_chat(model: Decoder, cfg: GenerationConfig, lines: Iterable[str], emit: Callable[[str], None]) -> None:
    conv = Conversation(model, cfg)
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            conv.reset()
            emit("[new conversation]\n")
            continue
        conv.turn(line, emit)
