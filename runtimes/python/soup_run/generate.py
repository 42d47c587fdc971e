"""Incremental generation with the KV cache: a batch of prompts, left-padded, streamed.

`stream` yields `Event(row, token, text)` as each token is produced (text is the newly
decodable part of that row's output); `generate` collects the final strings. A row stops at
EOS, at a stop string (which is cut from its text) or after max_new_tokens; the context length
is never exceeded. Left padding: padded positions have attention_mask 0, and position ids count
real tokens only (as transformers does), so a padded row computes exactly what it would alone.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from soup_run.decoder import Decoder
from soup_run.errors import RunError
from soup_run.sampling import Sampling, choose


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    seed: int = 0
    stop_at_eos: bool = True


@dataclass
class Event:
    row: int
    token: int
    text: str  # newly printable text of this row (may be empty while bytes are incomplete)


@dataclass
class _Row:
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    printed: str = ""
    done: bool = False


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask, position ids (B, S) for left-padded prompts."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of text that could still grow into a stop string."""
    keep = 0
    for word in stop:
        for n in range(min(len(word) - 1, len(text)), keep, -1):
            if text.endswith(word[:n]):
                keep = n
                break
    return keep


def _new_text(model: Decoder, row: _Row, stop: tuple[str, ...], final: bool = False) -> str:
    """The part of the row's decoded output that is safe to print now.

    Text that could be the start of a stop string is held back until it is resolved, and an
    incomplete UTF-8 sequence until its next byte arrives; `final` flushes what is left.
    """
    text = model.decode(row.out)
    hits = [text.find(w) for w in stop if w and w in text]
    if hits:
        text, row.done = text[:min(hits)], True
    elif not final:
        if text.endswith("\ufffd"):
            return ""
        text = text[:len(text) - _held_back(text, stop)]
    new = text[len(row.printed):] if len(text) > len(row.printed) else ""
    row.printed = max(row.printed, text, key=len)
    return new


def stream(model: Decoder, prompts: list[str] | list[list[int]],
           cfg: GenerationConfig = GenerationConfig()) -> Iterator[Event]:
    """Events as tokens are produced; prompts are strings or token id lists."""
    c = model.contract
    rows = [_Row(list(p) if isinstance(p, (list, tuple)) else model.encode(p)) for p in prompts]
    if any(not r.prompt for r in rows):
        raise RunError("a prompt encodes to no tokens; give non-empty prompts")
    longest = max(len(r.prompt) for r in rows)
    if longest >= c.context:
        raise RunError(f"a prompt has {longest} tokens, the model's context is {c.context}; shorten it")
    budget = min(cfg.max_new_tokens, c.context - longest)
    rng = np.random.default_rng(cfg.seed)
    ids, mask, positions = left_pad([r.prompt for r in rows], c.pad)
    seen = np.zeros((len(rows), c.vocab), bool)
    for i, r in enumerate(rows):
        seen[i, r.prompt] = True
    logits, past = model.step(ids, mask, positions, model.empty_past(len(rows)))
    for n in range(budget):
        tokens = np.full(len(rows), c.pad, np.int64)
        for i, r in enumerate(rows):
            if r.done:
                continue
            token = choose(logits[i], seen[i], cfg.sampling, rng)
            tokens[i], seen[i, token] = token, True
            if cfg.stop_at_eos and token == c.eos:
                r.done = True
                yield Event(i, token, _new_text(model, r, cfg.stop, final=True))
                continue
            r.out.append(token)
            yield Event(i, token, _new_text(model, r, cfg.stop))
        if all(r.done for r in rows):
            return
        if n == budget - 1:  # the last token chosen: no forward for a token that will not be drawn
            break
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = model.step(tokens[:, None], mask, positions, past)
    for i, r in enumerate(rows):  # the token budget ran out: print what was held back
        if not r.done:
            rest = _new_text(model, r, cfg.stop, final=True)
            if rest:
                yield Event(i, -1, rest)


def generate(model: Decoder, prompts: list[str], cfg: GenerationConfig = GenerationConfig()) -> list[str]:
    texts = ["" for _ in prompts]
    for event in stream(model, prompts, cfg):
        texts[event.row] += event.text
    return texts


def generate_ids(model: Decoder, prompt: list[int], cfg: GenerationConfig = GenerationConfig()) -> list[int]:
    """The token ids generated for one prompt given as ids (cross-runtime comparisons)."""
    return [e.token for e in stream(model, [prompt], cfg) if e.token >= 0]
