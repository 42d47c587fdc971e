"""Typed, frozen configuration of a training run.

Design choices:
- Every config is a frozen dataclass; `__post_init__` is the one place that validates fields.
- A run is `RunConfig(model, soup, meta, data, train)`; it is saved as `config.json` next to
  every checkpoint and read back strictly (unknown keys are errors, not silently ignored).
- CLI overrides are dotted keys (`train.lr=3e-4`, `soup.n_experts=16`), parsed by field type.
- Where the papers are silent, the default here is the choice docs/method.md records ([choice] below).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

from soup_train.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """A ConfigError carrying `message` unless `ok` (the configs' validation)."""
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """One Llama-style decoder; names and math follow `transformers.LlamaForCausalLM`."""

    vocab_size: int = 0  # 0 = take it from the data's tokenizer at fit time
    d_model: int = 64  # hidden size
    n_layers: int = 2  # decoder layers
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads; < n_heads means grouped-query attention
    d_ff: int = 176  # SwiGLU inner size
    max_seq_len: int = 128  # longest context the model is configured for
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    init_std: float = 0.02  # normal init of every matrix (as HF `initializer_range`)

    def __post_init__(self) -> None:
        require(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        require(self.d_model > 0 and self.n_layers > 0 and self.d_ff > 0,
               "model.d_model, model.n_layers and model.d_ff must be positive")
        require(self.n_heads > 0 and self.d_model % self.n_heads == 0,
               f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        require(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
               f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        require((self.d_model // self.n_heads) % 2 == 0, "the head size must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_hf(self) -> dict[str, Any]:
        """The equivalent `transformers.LlamaConfig` keyword arguments."""
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.d_model, intermediate_size=self.d_ff,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta, rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_embeddings, initializer_range=self.init_std,
            attention_bias=False, mlp_bias=False, hidden_act="silu", head_dim=self.head_dim,
        )


@dataclass(frozen=True)
class SoupConfig:
    """The Soup-of-Experts around the model: bank of experts and coefficient MLP."""

    n_experts: int = 4  # n: experts in the bank, each the shapes of one model; 0 = a plain dense model (Theta = S)
    coef_hidden: int = 256  # width of the coefficient MLP [choice]
    coef_layers: int = 3  # Linear layers in the coefficient MLP (ReLU between) [choice]
    alpha: Literal["raw", "softmax"] = "raw"  # raw alpha [choice] or a softmax over experts
    expert_init: Literal["normal", "zeros"] = "normal"  # E_j ~ N(0, expert_std^2 / n) or zeros
    expert_std: float = 0.02  # std of expert init before the 1/sqrt(n) scaling
    expert_rank: int = 0  # 0 = full experts; r > 0 = low-rank experts E_j = U_j V_j^T

    def __post_init__(self) -> None:
        require(self.n_experts >= 0, f"soup.n_experts must be >= 0 (0 = a dense model), got {self.n_experts}")
        require(self.coef_layers >= 1 and self.coef_hidden >= 1,
               "soup.coef_layers and soup.coef_hidden must be >= 1")
        require(self.expert_rank >= 0, f"soup.expert_rank must be >= 0, got {self.expert_rank}")


@dataclass(frozen=True)
class MetaConfig:
    """The meta-distribution pi over domain weights h (docs/method.md lists the defaults)."""

    s_max: int = 4  # support size s ~ Uniform{1..s_max} [choice]
    beta: float = 1.0  # Dirichlet concentration on the s chosen domains [choice]
    p_nat: float = 0.1  # probability of using the natural domain frequencies [choice]
    fixed_h: tuple[float, ...] | None = None  # always this h (tests, ablations); None = sample
    h_per_micro_batch: bool = False  # a new h for every micro-batch of a step: train.grad_accum h's per step
    # and rank, as if each micro-batch were its own data-parallel rank [choice]

    def __post_init__(self) -> None:
        require(self.s_max >= 1, f"meta.s_max must be >= 1, got {self.s_max}")
        require(self.beta > 0, f"meta.beta must be > 0, got {self.beta}")
        require(0.0 <= self.p_nat <= 1.0, f"meta.p_nat must be in [0, 1], got {self.p_nat}")
        if self.fixed_h is not None:
            require(all(x >= 0 for x in self.fixed_h) and sum(self.fixed_h) > 0,
                   "meta.fixed_h must be non-negative weights, not all zero")


@dataclass(frozen=True)
class DataConfig:
    """Which prepared data to train on and how domains are defined."""

    path: str = ""  # directory written by `soup-train prepare`
    domains: Literal["sources", "clusters"] = "sources"  # named sources or k-means clusters
    seq_len: int = 0  # training context; 0 = the prepared window length

    def __post_init__(self) -> None:
        require(self.seq_len >= 0, f"data.seq_len must be >= 0, got {self.seq_len}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, logging and checkpointing."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step (all share the rank's h)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 disables
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    parallel: Literal["ddp", "fsdp"] = "ddp"  # data parallelism under torchrun
    threads: int = 0  # torch CPU threads; 0 = torch's default
    eval_every: int = 50  # steps between per-domain evaluations; 0 = only at the end
    eval_batches: int = 4  # batches per domain per evaluation
    log_every: int = 10  # steps between log records
    ckpt_every: int = 50  # steps between checkpoints; the last step always saves
    keep_last: int = 2  # checkpoints kept on disk
    tensorboard: bool = False  # also write TensorBoard events (needs `tensorboard`)

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        require(self.batch_size >= 1 and self.grad_accum >= 1,
               "train.batch_size and train.grad_accum must be >= 1")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "train.lr must be > 0 and "
               "train.min_lr_ratio in [0, 1]")
        require(self.warmup_steps >= 0 and self.keep_last >= 1 and self.ckpt_every >= 1,
               "train.warmup_steps must be >= 0, train.keep_last and train.ckpt_every >= 1")
        require(self.log_every >= 1 and self.eval_every >= 0 and self.eval_batches >= 1,
               "train.log_every and train.eval_batches must be >= 1, train.eval_every >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved with every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Fields that may differ between a checkpoint and the run resuming it.
RESUME_MUTABLE = frozenset({
    "data.path", "train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.ckpt_every", "train.keep_last", "train.tensorboard", "train.threads", "train.device",
})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Strictly build a config dataclass from a dict; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {where or cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys: {', '.join(where + k for k in sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, where + name)
    return cls(**kwargs)


def flat_items(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} for every leaf field."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(flat_items(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `key.sub=value` overrides, parsing each value by the field's declared type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value "
                              "(e.g. --set train.lr=3e-4)")
        key, raw = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), raw.strip(), key.strip())
    return cfg


def _set_path(cfg: Any, parts: list[str], raw: str, key: str) -> Any:
    names = {f.name for f in fields(cfg)}
    if parts[0] not in names:
        valid = ", ".join(sorted(flat_items(cfg)))
        raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
    current = getattr(cfg, parts[0])
    if is_dataclass(current):
        if len(parts) == 1:
            raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.<field>=...")
        return replace(cfg, **{parts[0]: _set_path(current, parts[1:], raw, key)})
    if len(parts) > 1:
        raise ConfigError(f"unknown config key {key!r}: {parts[0]!r} has no sub-fields")
    kind = typing.get_type_hints(type(cfg))[parts[0]]
    return replace(cfg, **{parts[0]: _parse(raw, kind, key)})


def _parse(raw: str, kind: Any, key: str) -> Any:
    """Parse a command-line string into a value of the declared type."""
    if raw.lower() in ("none", "null") and _allows_none(kind):
        return None
    base = _strip_optional(kind)
    if typing.get_origin(base) is tuple:
        items = [x for x in raw.replace(" ", "").split(",") if x]
        return _coerce([_parse(x, typing.get_args(base)[0], key) for x in items], base, key)
    if base is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {raw!r}")
    if base in (int, float):
        try:
            return base(float(raw)) if base is int and float(raw).is_integer() else base(raw)
        except ValueError:
            raise ConfigError(f"{key} expects a number ({base.__name__}), got {raw!r}") from None
    return _coerce(raw, kind, key)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check (and lightly convert) a JSON value against a declared type."""
    if value is None:
        if _allows_none(kind):
            return None
        raise ConfigError(f"{key} may not be null")
    base = _strip_optional(kind)
    origin = typing.get_origin(base)
    if origin is Literal:
        options = typing.get_args(base)
        if value not in options:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, options))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        inner = typing.get_args(base)[0]
        return tuple(_coerce(v, inner, key) for v in value)
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key} expects {base.__name__}, got {value!r}")
    return value


def _allows_none(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _strip_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def load_config_file(path: Path) -> RunConfig:
    """Read a RunConfig from a JSON or YAML file (a serialized instance)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a JSON or YAML file "
                          "written like a checkpoint's config.json")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    data = data.get("run", data) if isinstance(data, dict) else data
    return from_dict(RunConfig, data)


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary name in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@dataclass(frozen=True)
class PrepareConfig:
    """How `soup-train prepare` builds a data directory from a corpus."""

    preset: str = "debug"  # corpus preset of soup_train.data.sources (debug, default)
    sources: tuple[str, ...] = ()  # extra NAME=PATH|hf:DATASET domains read through HF datasets
    vocab_size: int = 512  # byte-level BPE vocabulary size
    seq_len: int = 64  # training context; windows hold seq_len + 1 tokens
    test_fraction: float = 0.1  # documents per domain held out for evaluation
    max_test_docs: int = 400  # cap on held-out documents per domain
    doc_chars: int = 4000  # documents are chunked to at most this many characters
    max_docs: int = 0  # cap on documents per source; 0 = no cap
    max_chars: int = 0  # cap on characters per domain (balances huge sources); 0 = no cap
    k_clusters: int = 8  # k-means clusters for the "clusters" domain view
    source_centroids: int = 8  # centroids per named source for Algorithm 3 in the "sources" view
    embedder: str = "hashing-svd"  # or "sentence-transformers:<model name or local path>"
    embed_dim: int = 64  # SVD dimensions of the hashing-svd embedder
    hash_features: int = 32768  # hashing-vectorizer buckets of the hashing-svd embedder
    seed: int = 0

    def __post_init__(self) -> None:
        require(0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}")
        require(self.vocab_size >= 300, f"vocab_size must be >= 300 (256 bytes + merges), got {self.vocab_size}")
        require(self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}")
        require(self.k_clusters >= 2, f"k_clusters must be >= 2, got {self.k_clusters}")
        require(self.source_centroids >= 1, f"source_centroids must be >= 1, got {self.source_centroids}")
        require(self.max_test_docs >= 1 and self.doc_chars >= 200, "max_test_docs must be >= 1 and doc_chars >= 200")
