"""Byte-level BPE trained on the corpus with HF `tokenizers`; loads in transformers.

Choices: GPT-2 style byte-level pre-tokenization (every string encodes, decode is exact), one
special token `<|endoftext|>` (id 0) that separates documents and serves as BOS/EOS/PAD.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: Path):
    """Train, save as `path` (tokenizer.json) and return the `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def hf_tokenizer(path: Path):
    """The tokenizer as a `transformers.PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])
