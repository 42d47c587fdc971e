"""onnxruntime-genai as an alternative engine on the same export (`soup-run --engine genai`).

The export's genai_config.json describes the hand-built decoder, so onnxruntime-genai runs the
very same model.onnx. Tokenization stays with `tokenizers` (identical ids on both engines);
prompts are generated one at a time.
"""
from __future__ import annotations

from pathlib import Path

from soup_run.contract import TOKENIZER, Contract, model_dir_of
from soup_run.errors import RunError
from soup_run.generate import Event, GenerationConfig
from soup_run.integrity import verify


class GenaiSpecialist:
    def __init__(self, path: Path, verify_files: bool = True) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise RunError("the genai engine needs onnxruntime-genai: pip install 'soup-run[genai]'") from None
        from tokenizers import Tokenizer

        self.dir = model_dir_of(path)
        self.verified = verify(self.dir) if verify_files else 0
        self.contract = Contract.read(self.dir)
        self.tokenizer = Tokenizer.from_file(str(self.dir / TOKENIZER))
        self.og = og
        self.model = og.Model(str(self.dir))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _one(self, row: int, prompt: list[int], cfg: GenerationConfig):
        s = cfg.sampling
        params = self.og.GeneratorParams(self.model)
        length = min(len(prompt) + cfg.max_new_tokens, self.contract.context)
        options = {"max_length": length, "do_sample": s.temperature > 0, "repetition_penalty": s.repetition_penalty}
        if s.temperature > 0:
            options.update(temperature=s.temperature, top_k=s.top_k or self.contract.vocab, top_p=s.top_p,
                           random_seed=cfg.seed)
        params.set_search_options(**options)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(prompt)
        out: list[int] = []
        printed = ""
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token == self.contract.eos and cfg.stop_at_eos:
                return
            out.append(token)
            text = self.decode(out)
            hits = [text.find(x) for x in cfg.stop if x and x in text]
            if hits:
                yield Event(row, token, text[len(printed):min(hits)])
                return
            if not text.endswith("\ufffd"):
                yield Event(row, token, text[len(printed):])
                printed = text

    def stream(self, prompts, cfg: GenerationConfig):
        for row, p in enumerate(prompts):
            ids = list(p) if isinstance(p, (list, tuple)) else self.encode(p)
            yield from self._one(row, ids, cfg)

    def generate(self, prompts, cfg: GenerationConfig) -> list[str]:
        texts = ["" for _ in prompts]
        for e in self.stream(prompts, cfg):
            texts[e.row] += e.text
        return texts
