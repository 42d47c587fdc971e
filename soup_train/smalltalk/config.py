"""Typed, frozen configuration of a SmallTalk LM run (docs/method.md section 4) and its presets.

A run is E tiny router LMs trained by EM on sequence prefixes, then E experts trained on the
sequences the routers assign them, each as an independent job. Both kinds of model are the same
Llama decoder as the soup's instantiated model (`soup_train.model.llama`), so every router and
expert is a plain Hugging Face Llama and exports like a soup specialist.

Choices where the paper is silent or its scale does not transfer (each a field here):
- `em.sequences_per_round` fresh sequences are drawn per EM round (the paper streams its corpus;
  here the pool is the data directory's training windows, drawn without replacement per round).
- A router trains on the first `prefix_len + 1` tokens of its shard's sequences, the same span
  it scores at routing time.
- Routers keep their AdamW state across rounds; the learning rate is constant after warm-up
  (`router_train.min_lr_ratio = 1`, the paper's schedule).
- `em.budget` sequences (0 = every training window) are balanced-assigned once to the experts;
  each expert then samples its own shard uniformly with replacement.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from soup_train.config import DataConfig, ModelConfig, TrainConfig, require
from soup_train.errors import ConfigError


@dataclass(frozen=True)
class EMConfig:
    """Router training by expectation-maximisation and the assignment of the expert budget."""

    experts: int = 4  # E: experts, and routers
    prefix_len: int = 32  # M: tokens every router scores (paper 256; still beats dense at 32)
    rounds: int = 6  # EM rounds (paper ~94) [choice]
    sequences_per_round: int = 2048  # fresh sequences re-assigned per round; capacity = this / E [choice]
    steps_per_round: int = 30  # optimizer steps per router per round [choice]
    budget: int = 0  # sequences assigned to experts in total; 0 = every training window [choice]
    score_batch: int = 256  # sequences per router forward when scoring prefixes

    def __post_init__(self) -> None:
        require(self.experts >= 1, f"em.experts must be >= 1, got {self.experts}")
        require(self.prefix_len >= 1, f"em.prefix_len must be >= 1, got {self.prefix_len}")
        require(self.rounds >= 0 and self.steps_per_round >= 1,
               "em.rounds must be >= 0 and em.steps_per_round >= 1")
        require(self.sequences_per_round >= self.experts,
               f"em.sequences_per_round ({self.sequences_per_round}) must be >= em.experts ({self.experts})")
        require(self.budget >= 0 and self.score_batch >= 1, "em.budget must be >= 0, em.score_batch >= 1")


@dataclass(frozen=True)
class SmallTalkConfig:
    """Everything that defines a SmallTalk run; saved as RUN/smalltalk.json."""

    router: ModelConfig = field(default_factory=lambda: ModelConfig(d_model=32, n_layers=2, n_heads=4,
                                                                     n_kv_heads=4, d_ff=96))
    router_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1, batch_size=32, lr=2e-3, min_lr_ratio=1.0, warmup_steps=20))  # steps: em sets them
    expert: ModelConfig = field(default_factory=ModelConfig)
    expert_train: TrainConfig = field(default_factory=TrainConfig)
    em: EMConfig = field(default_factory=EMConfig)
    data: DataConfig = field(default_factory=DataConfig)


SMALLTALK_PRESETS: dict[str, SmallTalkConfig] = {
    # tests: the debug corpus, seconds
    "debug": SmallTalkConfig(
        router=ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32),
        router_train=TrainConfig(steps=1, batch_size=16, lr=3e-3, min_lr_ratio=1.0, warmup_steps=2,
                                 log_every=5, eval_every=0, ckpt_every=1000),
        expert=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
        expert_train=TrainConfig(steps=12, batch_size=4, warmup_steps=2, eval_every=0, eval_batches=1,
                                 log_every=2, ckpt_every=6),
        em=EMConfig(experts=2, prefix_len=8, rounds=2, sequences_per_round=64, steps_per_round=4,
                    score_batch=64),
    ),
    # the reproduction at tiny scale on the default corpus (tools/reproduce_smalltalk.py)
    "tiny": SmallTalkConfig(
        router=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96),
        router_train=TrainConfig(steps=1, batch_size=32, lr=3e-3, min_lr_ratio=1.0, warmup_steps=20,
                                 eval_every=0, log_every=20, ckpt_every=1000),
        expert=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176),
        expert_train=TrainConfig(steps=400, batch_size=16, lr=4e-3, warmup_steps=30, eval_every=0,
                                 log_every=20, ckpt_every=100),
        em=EMConfig(experts=4, prefix_len=32, rounds=6, sequences_per_round=4096, steps_per_round=40),
    ),
}


def smalltalk_preset(name: str) -> SmallTalkConfig:
    if name not in SMALLTALK_PRESETS:
        raise ConfigError(f"unknown SmallTalk preset {name!r}; choose one of {', '.join(SMALLTALK_PRESETS)}")
    return SMALLTALK_PRESETS[name]
