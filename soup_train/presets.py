"""Named presets: data preparation (`prepare --preset`) and training runs (`fit --preset`).

- `debug`: tests; a tiny corpus built offline in seconds and a model that trains in seconds.
- `demo`: what `make demo` trains on the default 7-domain corpus in a few minutes on 2 CPU cores.
- `paper-110m`: the paper's scale (110M instantiated, 128 experts, k = 4096 clusters) for GPU
  clusters; not run here, `soup-train fit --preset paper-110m --dry-run` sizes it.
"""
from __future__ import annotations

from soup_train.config import (
    DataConfig, MetaConfig, ModelConfig, PrepareConfig, RunConfig, SoupConfig, TrainConfig,
)
from soup_train.errors import ConfigError

PREPARE_PRESETS: dict[str, PrepareConfig] = {
    "debug": PrepareConfig(preset="debug", vocab_size=512, seq_len=32, k_clusters=4, max_docs=120,
                           test_fraction=0.15, max_test_docs=30, embed_dim=32, hash_features=8192),
    "default": PrepareConfig(preset="default", vocab_size=4096, seq_len=128, k_clusters=16,
                             max_chars=2_500_000, test_fraction=0.05, max_test_docs=120),
}

RUN_PRESETS: dict[str, RunConfig] = {
    "debug": RunConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
        soup=SoupConfig(n_experts=4, coef_hidden=32),
        train=TrainConfig(steps=20, batch_size=4, warmup_steps=4, lr=3e-3, eval_every=10,
                          eval_batches=1, log_every=1, ckpt_every=10),
    ),
    "demo": RunConfig(
        model=ModelConfig(d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256),
        soup=SoupConfig(n_experts=8),
        # 16 sequences per step as 4 micro-batches, each from its own h (meta.h_per_micro_batch): one h
        # per step made every step's gradient one narrow mixture's, which cost more than the experts gained
        meta=MetaConfig(h_per_micro_batch=True),
        train=TrainConfig(steps=1200, batch_size=4, grad_accum=4, warmup_steps=60, lr=4e-3, eval_every=300,
                          eval_batches=16, log_every=20, ckpt_every=300),
    ),
    "paper-110m": RunConfig(
        model=ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                          d_ff=2048, max_seq_len=1024),
        soup=SoupConfig(n_experts=128),
        data=DataConfig(domains="clusters", seq_len=1024),
        train=TrainConfig(steps=100_000, batch_size=16, lr=6e-4, warmup_steps=2000,
                          eval_every=2000, ckpt_every=1000, log_every=50, parallel="fsdp"),
    ),
}

# Number of domains each run preset is designed for (used by --dry-run, which reads no data):
# the debug corpus has 3 named sources, the default corpus 7, the paper k = 4096 clusters.
DOMAINS_FOR_RUN = {"debug": 3, "demo": 7, "paper-110m": 4096}


def run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]


def prepare_preset(name: str) -> PrepareConfig:
    if name not in PREPARE_PRESETS:
        raise ConfigError(f"unknown data preset {name!r}; choose one of {', '.join(PREPARE_PRESETS)}")
    return PREPARE_PRESETS[name]
