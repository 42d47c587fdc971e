"""A SmallTalk mixture on a device: score a text's prefix under every router, run the best router's expert.

The directory is what `soup-export mixture` writes: `manifest.json` (kind "smalltalk-mixture",
the prefix length M and every model's directory) and one export directory per router and expert.
Routing is the training's rule: a router reads the first M + 1 tokens (fewer for a shorter text),
takes tokens 0..M-1 as inputs and is scored on predicting tokens 1..M; the mean log-likelihood per
predicted token is compared and the argmax wins (no balancing at inference).

Verification: the member manifests are checked against the mixture's manifest when it opens, and
each model's files against its own manifest when that model is loaded (routers at once, an
expert the first time a text is routed to it), so a device never reads an expert it does not use.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from soup_run.contract import MANIFEST, MIXTURE_KIND
from soup_run.errors import RunError
from soup_run.generate import GenerationConfig
from soup_run.integrity import sha256
from soup_run.model import Specialist
from soup_run.score import token_log_probs


def is_mixture(path: Path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("kind") == MIXTURE_KIND
    except ValueError:
        return False


class RoutedMixture:
    """Routers loaded at once, experts on first use. `threads=0` lets onnxruntime choose."""

    def __init__(self, path: Path, *, threads: int = 0, verify_files: bool = True) -> None:
        self.dir = Path(path)
        self.manifest = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
        self.prefix_len = int(self.manifest["prefix_len"])
        self.threads, self.verify_files = threads, verify_files
        if verify_files:
            self._verify_members()
        self.routers = [self._open(m) for m in self._members("router")]
        self._experts: dict[int, Specialist] = {}
        self.tokenizer = self.routers[0].tokenizer

    def _members(self, kind: str) -> list[dict]:
        found = sorted((m for m in self.manifest["models"] if m["kind"] == kind), key=lambda m: m["index"])
        if not found:
            raise RunError(f"{self.dir}/{MANIFEST} lists no {kind}; rebuild with `soup-export mixture`")
        return found

    def _verify_members(self) -> None:
        files = self.manifest.get("files", {})
        for m in self.manifest["models"]:
            rel = f"{m['path']}/{MANIFEST}"
            target = self.dir / rel
            if rel not in files or not target.is_file() or sha256(target) != files[rel]["sha256"]:
                raise RunError(f"{target} is missing or does not match the mixture's manifest: the mixture was "
                               "modified or copied incompletely; copy it again (or pass --no-verify)")

    def _open(self, member: dict) -> Specialist:
        return Specialist(self.dir / member["path"], threads=self.threads, verify_files=self.verify_files)

    @property
    def experts(self) -> int:
        return len(self.routers)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def scores(self, ids: list[int]) -> np.ndarray:
        """(E,) mean prefix log-likelihood of a token sequence under every router."""
        span = np.asarray(ids[:self.prefix_len + 1], np.int64)
        if len(span) < 2:
            raise RunError("routing needs a text of at least 2 tokens; give a longer prompt")
        x, y = span[None, :-1], span[1:]
        out = np.empty(self.experts)
        for e, router in enumerate(self.routers):
            logits, _ = router.step(x, np.ones_like(x), np.arange(x.shape[1])[None], router.empty_past(1),
                                    all_logits=True)
            out[e] = float(token_log_probs(logits[0], y).mean())
        return out

    def route(self, text: str) -> tuple[int, np.ndarray]:
        """(chosen expert, every router's score) for a text."""
        scores = self.scores(self.encode(text))
        return int(scores.argmax()), scores

    def expert(self, e: int) -> Specialist:
        if e not in self._experts:
            self._experts[e] = self._open(self._members("expert")[e])
        return self._experts[e]


def run_routed_chat(mixture: RoutedMixture, cfg: GenerationConfig, lines: Iterable[str], emit: Callable[[str], None],
                    announce: Callable[[int, np.ndarray], None]) -> None:
    """`soup-run chat` on a mixture: the first line of a conversation picks the expert."""
    from soup_run.chat import Conversation

    conv = None
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            conv = None
            emit("[new conversation]\n")
            continue
        if conv is None:
            try:
                e, scores = mixture.route(line)
            except RunError as exc:  # e.g. a one-token first line: ask again, keep the session
                emit(f"[{exc}]\n")
                continue
            announce(e, scores)
            conv = Conversation(mixture.expert(e), cfg)
        conv.turn(line, emit)
