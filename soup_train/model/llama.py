"""A Llama-style decoder, written once and used both as a dense model and inside the soup.

Design choices:
- Parameter names and math follow `transformers.LlamaForCausalLM` exactly (RMSNorm in fp32,
  RoPE with `rotate_half`, SwiGLU, optional grouped KV heads, tied or untied embeddings), so a
  state dict of this module loads into a plain HF Llama and vice versa.
- Attention uses `scaled_dot_product_attention` with a causal mask (equal to HF's eager path
  within fp32 rounding); there is no KV cache: generation runs on exported models.
- No parallelism here: DDP/FSDP are applied from outside (`soup_train.distributed`).
- The rotary inverse frequencies are a non-persistent buffer, so `state_dict()` holds weights only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from soup_train.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,), computed on the CPU as transformers does."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float() / cfg.head_dim
    return 1.0 / (cfg.rope_theta ** exponents)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (T, head_dim) for integer positions (T,)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, head_dim); cos/sin: (T, head_dim)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each KV head
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of an HF Llama: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # computed on the CPU (as transformers does) and moved to the default device: on the meta device
        # (a model built for its shapes), the first arithmetic of a process imports torch._dynamo (1-1.5 s)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_tables(self.inv_freq, positions)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Llama(nn.Module):
    """Dense causal LM; `state_dict()` keys equal `transformers.LlamaForCausalLM`'s."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.vocab_size > 0, "resolve model.vocab_size before building the model"
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """The head reads the embedding's tensor when the config ties them (again after `to_empty`,
        which gives each module a tensor of its own)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self) -> None:
        """HF-style init: every matrix ~ N(0, init_std^2), norm weights = 1 (nothing to do on the meta device,
        where shapes are only counted or checked)."""
        if self.lm_head.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def reset_buffers(self, device: torch.device) -> None:
        """The rotary frequencies on `device` (a model materialised from the meta device, by `to_empty` or
        by loading with `assign=True`, has them undefined or on the meta device)."""
        self.model.inv_freq = rope_inv_freq(self.cfg).to(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.model(input_ids))


def forward_by_parts(model: Llama, weights: Callable[[str], dict[str, torch.Tensor]],
                     input_ids: torch.Tensor, inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """`model(input_ids)` with each part's weights asked for when it runs: `weights(prefix)` gives
    {local name: tensor} for "model.embed_tokens", "model.layers.{i}", "model.norm" and "lm_head".
    The same modules and math as `Llama.forward` (`model` may live on the meta device: only its
    structure is used), so a caller can hold one layer's weights at a time (export's parity check
    of a soup larger than memory instantiates each layer from the bank in turn). `inv_freq`: RoPE's
    frequencies already on the input's device (computed here otherwise)."""
    from torch.func import functional_call

    decoder = model.model
    if inv_freq is None or inv_freq.device != input_ids.device:
        inv_freq = rope_inv_freq(model.cfg).to(input_ids.device)
    cos, sin = rope_tables(inv_freq, torch.arange(input_ids.shape[1], device=input_ids.device))
    x = functional_call(decoder.embed_tokens, weights("model.embed_tokens"), (input_ids,))
    for i, layer in enumerate(decoder.layers):
        x = functional_call(layer, weights(f"model.layers.{i}"), (x, cos, sin))
    x = functional_call(decoder.norm, weights("model.norm"), (x,))
    return functional_call(model.lm_head, weights("lm_head"), (x,))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; logits (B, T, V), targets (B, T). per_row: (B,) means."""
    if per_row:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(1)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
