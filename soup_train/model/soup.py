"""Soup-of-Experts: shared parameters S, a bank of n experts, and the coefficient MLP.

Design choices:
- S *is* a dense `Llama` (`self.shared`), so its parameter names are HF Llama names and its
  init is a normal transformer's (a choice: docs/method.md, "Choices").
- The bank mirrors the dense names (`experts.model.layers.0.mlp.up_proj.weight`, shape (n, ...)),
  registered in nested containers so `state_dict()` is exactly the checkpoint layout.
- Every dense tensor is in the soup (embeddings and norms included) [choice].
- `forward(input_ids, h)` instantiates Theta(h) with `soup_math.combine` and runs the dense module
  on it via `torch.func.functional_call`: the model code is written once.
- Tied embeddings: the bank holds one tensor for `model.embed_tokens.weight`; `instantiate`
  also returns it under `lm_head.weight` so the result loads into HF Llama as is.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call

from soup_train.config import ModelConfig, SoupConfig
from soup_train.model.llama import Llama
from soup_train.model.soup_math import expert_keys, instantiate, is_low_rank


class CoefficientMLP(nn.Module):
    """w: domain weights h (k,) -> expert coefficients alpha (n,)."""

    def __init__(self, k: int, cfg: SoupConfig) -> None:
        super().__init__()
        dims = [k] + [cfg.coef_hidden] * (cfg.coef_layers - 1) + [cfg.n_experts]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(nn.ReLU())
            with warnings.catch_warnings():  # n = 0 (a dense model): the last layer is empty, by design
                warnings.simplefilter("ignore", UserWarning)
                layers.append(nn.Linear(d_in, d_out))
        self.net = nn.Sequential(*layers)
        self.softmax = cfg.alpha == "softmax"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        alpha = self.net(h.to(self.net[0].weight.dtype))  # (..., n)
        return alpha.softmax(-1) if self.softmax else alpha


def _container(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """The (nested, created on demand) module that holds `dotted`'s last component."""
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module, leaf


class ExpertBank(nn.Module):
    """n experts for every dense tensor; full, or low-rank U V^T for matrices."""

    def __init__(self, dense: dict[str, torch.Tensor], cfg: SoupConfig) -> None:
        super().__init__()
        self.rank = cfg.expert_rank
        self.names = list(dense)
        for name, tensor in dense.items():
            for key, shape in zip(expert_keys(name, tensor.shape, self.rank),
                                  self._shapes(tensor.shape, cfg.n_experts)):
                holder, leaf = _container(self, key.split(".", 1)[1])
                holder.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
        self.reset_parameters(cfg)

    def _shapes(self, shape: torch.Size, n: int) -> list[tuple[int, ...]]:
        if is_low_rank(shape, self.rank):
            return [(n, shape[0], self.rank), (n, shape[1], self.rank)]
        return [(n, *shape)]

    def reset_parameters(self, cfg: SoupConfig) -> None:
        """E_j ~ N(0, std^2 / n), or zeros; low-rank: V normal, U scaled so U V^T has that std."""
        std = cfg.expert_std / math.sqrt(max(cfg.n_experts, 1))  # n = 0: an empty bank (a dense model)
        for key, param in self.named_parameters():
            if param.is_meta:  # shapes only (counting, checkpoint checks): nothing to draw
                continue
            if cfg.expert_init == "zeros":
                nn.init.zeros_(param) if not key.endswith("_v") else nn.init.normal_(param, std=1.0)
            elif key.endswith("_u") or key.endswith("_v"):
                nn.init.normal_(param, std=math.sqrt(std / math.sqrt(self.rank)))
            else:
                nn.init.normal_(param, std=std)

    def tensors(self, name: str, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        out = []
        for key in expert_keys(name, shape, self.rank):
            holder, leaf = _container(self, key.split(".", 1)[1])
            out.append(getattr(holder, leaf))
        return tuple(out)


class SoupModel(nn.Module):
    """Theta(h) = S + sum_j alpha_j(h) E_j; `forward(input_ids, h)` runs the dense model at Theta(h)."""

    def __init__(self, model_cfg: ModelConfig, soup_cfg: SoupConfig, n_domains: int) -> None:
        super().__init__()
        self.model_cfg, self.soup_cfg, self.n_domains = model_cfg, soup_cfg, n_domains
        self.shared = Llama(model_cfg)
        dense = dict(self.shared.named_parameters())  # tied lm_head is listed once, as embed_tokens
        self.experts = ExpertBank(dense, soup_cfg)
        self.coef = CoefficientMLP(n_domains, soup_cfg)

    def alpha(self, h: torch.Tensor) -> torch.Tensor:
        """h (k,) on the simplex -> alpha (n,)."""
        return self.coef(h)

    def tensors(self):
        """(dense name, shared tensor, its experts) for every dense tensor (tied head once), as export's
        `Bank.tensors` gives them from a checkpoint."""
        return ((name, param, self.experts.tensors(name, param.shape)) for name, param in self.shared.named_parameters())

    def instantiate_alpha(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dense HF Llama state dict at coefficients alpha (tied lm_head included)."""
        theta = instantiate(self.tensors(), alpha)
        if self.model_cfg.tie_embeddings:
            theta["lm_head.weight"] = theta["model.embed_tokens.weight"]
        return theta

    def instantiate(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dense HF Llama state dict Theta(h), computed in fp32 whatever autocast region it is
        called in: alpha and the sum S + sum_j alpha_j E_j are the very values export fuses (under
        bf16 autocast they would be rounded, and the whole bank copied to bf16 for backward); the
        dense model's matrix products then cast Theta as autocast says."""
        with torch.autocast(h.device.type, enabled=False):
            return self.instantiate_alpha(self.alpha(h.float()))

    def forward(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), h (k,) -> logits (B, T, vocab) of the dense model at Theta(h)."""
        return functional_call(self.shared, self.instantiate(h), (input_ids,))

    def dense_model(self, h: torch.Tensor) -> Llama:
        """A standalone dense `Llama` holding Theta(h) (detached copy)."""
        dense = Llama(self.model_cfg).to(next(self.parameters()).device)
        with torch.no_grad():
            dense.load_state_dict({k: v.detach() for k, v in self.instantiate(h).items()})
        return dense


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Random initialisation left out (the tensor returned as it is). On the meta device, torch's
    `normal_` (nn.Embedding's own initialisation) is a Python kernel whose first call imports
    torch._dynamo: 1-1.5 s of every process that built a model for its shapes (every export
    command), for values that a meta tensor never holds."""

    SKIPPED = frozenset({nn.init.normal_, nn.init.trunc_normal_, nn.init.uniform_, torch.Tensor.normal_,
                         torch.Tensor.uniform_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def meta_soup(model_cfg: ModelConfig, soup_cfg: SoupConfig, n_domains: int) -> "SoupModel":
    """A soup on the meta device, its tensors' shapes and nothing else (nothing allocated or initialised)."""
    with torch.device("meta"), _NoRandomInit():
        return SoupModel(model_cfg, soup_cfg, n_domains)


def dense_forward(skeleton: Llama, theta: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the dense Llama whose weights are `theta` (its state dict, tied head listed once or
    not at all), run on `skeleton`'s modules, which may live on the meta device (only their
    structure is used: a soup larger than memory never builds a model of its own)."""
    from soup_train.model.llama import rope_inv_freq

    buffers = {"model.inv_freq": rope_inv_freq(skeleton.cfg).to(input_ids.device)}
    return functional_call(skeleton, {**theta, **buffers}, (input_ids,))


def count_parameters(model_cfg: ModelConfig, soup_cfg: SoupConfig, n_domains: int) -> dict[str, int]:
    """Parameter counts without allocating: instantiated model, shared, bank, coefficient MLP."""
    soup = meta_soup(model_cfg, soup_cfg, n_domains)
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"instantiated": total(soup.shared), "shared": total(soup.shared),
            "experts": total(soup.experts), "coef_mlp": total(soup.coef), "total": total(soup),
            "largest": max(p.numel() for p in soup.parameters())}
