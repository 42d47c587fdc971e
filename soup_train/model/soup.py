"""Soup-of-Experts: shared parameters S, a bank of n experts, and the coefficient MLP.

Design choices:
- S *is* a dense `Llama` (`self.shared`), so its parameter names are HF Llama names and its
  init is a normal transformer's (a choice: docs/method.md, "Choices").
- The bank mirrors the dense names (`experts.model.layers.0.mlp.up_proj.weight`, shape (n, ...)),
  registered in nested `ExpertSlice` containers so `state_dict()` is exactly the checkpoint layout.
- Every dense tensor is in the soup (embeddings and norms included) [choice].
- The dense model is run part by part (`SoupModel.parts`: the embedding, each decoder layer, the
  final norm, an untied head). Each part's Theta is instantiated by that part's bank slice, `ExpertSlice`,
  a module whose forward is `soup_math.combine` for the part's tensors; the part then runs on a
  structure-only copy of the dense model (`llama.forward_by_parts`). So the model code is written
  once, and a wrapper that acts per module (FSDP2: one unit per slice, `soup_train.distributed`)
  holds one part's bank whole at a time.
- Tied embeddings: the bank holds one tensor for `model.embed_tokens.weight`; `instantiate`
  also returns it under `lm_head.weight` so the result loads into HF Llama as is.
- Initial values are drawn row by row from generators seeded by (seed, tensor name, row)
  (`soup_train.model.init`): the same soup at any world size, and a sharded soup materialises
  only its own rows.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from soup_train.config import ModelConfig, SoupConfig
from soup_train.model.init import init_soup
from soup_train.model.llama import Llama, forward_by_parts
from soup_train.model.soup_math import combine, expert_keys, is_low_rank


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


class ExpertSlice(nn.Module):
    """The experts of one part of the dense model (`experts.model.layers.3`: a container of the bank,
    its parameters named as the part's own, relative to it) and that part's instantiation."""

    def forward(self, shared: dict[str, torch.Tensor], alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """{local name: S + sum_j alpha_j E_j} for the part's shared tensors `shared` ({local name:
        tensor}), in fp32 whatever autocast region it runs in (see `SoupModel.instantiate`)."""
        with torch.autocast(alpha.device.type, enabled=False):
            return {name: combine(tensor, self.experts_of(name), alpha) for name, tensor in shared.items()}

    def experts_of(self, name: str) -> tuple[torch.Tensor, ...]:
        """The experts of dense tensor `name` (local): (E,), or (U, V) when low-rank."""
        *path, leaf = name.split(".")
        module = self
        for part in path:
            module = module._modules[part]
        if leaf in module._parameters:
            return (module._parameters[leaf],)
        return (module._parameters[f"{leaf}_u"], module._parameters[f"{leaf}_v"])


def _container(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """The (nested, created on demand) module that holds `dotted`'s last component."""
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, ExpertSlice())
        module = module._modules[part]
    return module, leaf


class ExpertBank(ExpertSlice):
    """n experts for every dense tensor; full, or low-rank U V^T for matrices."""

    def __init__(self, dense: dict[str, torch.Tensor], cfg: SoupConfig) -> None:
        super().__init__()
        self.rank = cfg.expert_rank
        self.names = list(dense)
        for name, tensor in dense.items():
            for key, shape in zip(expert_keys(name, tensor.shape, self.rank),
                                  self._shapes(tensor.shape, cfg.n_experts)):
                holder, leaf = _container(self, key.split(".", 1)[1])
                holder.register_parameter(leaf, nn.Parameter(torch.empty(shape)))

    def _shapes(self, shape: torch.Size, n: int) -> list[tuple[int, ...]]:
        if is_low_rank(shape, self.rank):
            return [(n, shape[0], self.rank), (n, shape[1], self.rank)]
        return [(n, *shape)]


Around = Callable[[nn.Module], contextlib.AbstractContextManager]


def _nothing(module: nn.Module) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class SoupModel(nn.Module):
    """Theta(h) = S + sum_j alpha_j(h) E_j; `forward(input_ids, h)` runs the dense model at Theta(h)."""

    def __init__(self, model_cfg: ModelConfig, soup_cfg: SoupConfig, n_domains: int, seed: int | None = None) -> None:
        """The soup with its initial values at `seed` (`soup_train.model.init`; None: torch's seed, as
        `torch.manual_seed` set it); on the meta device (`meta_soup`), its shapes only, for counting
        or for a sharded soup to materialise its rows."""
        super().__init__()
        self.model_cfg, self.soup_cfg, self.n_domains = model_cfg, soup_cfg, n_domains
        with _NoRandomInit():  # the modules' own random init: replaced by init_soup's below
            self.shared = Llama(model_cfg)
            dense = dict(self.shared.named_parameters())  # tied lm_head is listed once, as embed_tokens
            self.experts = ExpertBank(dense, soup_cfg)
            self.coef = CoefficientMLP(n_domains, soup_cfg)
        if not self.shared.lm_head.weight.is_meta:
            init_soup(self, torch.initial_seed() if seed is None else seed)
        # the structure of the dense model, outside the module tree (no parameters of its own to
        # save, move or shard): each part's Theta runs on it
        with torch.device("meta"), _NoRandomInit():
            object.__setattr__(self, "skeleton", Llama(model_cfg))

    def materialised(self) -> None:
        """After `to_empty` (which leaves buffers undefined and gives tied modules a tensor each): the
        head tied to the embedding again and the non-persistent buffers recomputed."""
        self.shared.tie_weights()
        self.shared.reset_buffers(self.shared.lm_head.weight.device)

    def initialise(self, seed: int, place=None) -> None:
        """A soup materialised from the meta device (`to_empty`): tied again, its buffers, and the initial
        values at `seed` of the rows `place` gives (`init_soup`; None: every parameter whole)."""
        self.materialised()
        init_soup(self, seed, place)

    def parts(self) -> list[str]:
        """The dense model's parts, in the order they run: each is instantiated from its bank slice."""
        names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(self.model_cfg.n_layers)), "model.norm"]
        return names if self.model_cfg.tie_embeddings else [*names, "lm_head"]

    def slices(self) -> list[ExpertSlice]:
        """The bank's slice of every part (what a per-module wrapper such as FSDP2 groups by)."""
        return [self.experts.get_submodule(part) for part in self.parts()]

    def part_theta(self, part: str, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """{local name: Theta} of one part, by its bank slice's forward (a module call: a wrapper's
        hooks gather the slice's bank for it and release it after)."""
        shared = self.shared.get_submodule(part)
        return self.experts.get_submodule(part)(dict(shared.named_parameters()), alpha)

    def alpha(self, h: torch.Tensor) -> torch.Tensor:
        """h (k,) on the simplex -> alpha (n,)."""
        return self.coef(h)

    def tensors(self):
        """(dense name, shared tensor, its experts) for every dense tensor (tied head once), as export's
        `Bank.tensors` gives them from a checkpoint."""
        return ((name, param, self.experts.experts_of(name)) for name, param in self.shared.named_parameters())

    def instantiate_alpha(self, alpha: torch.Tensor, around: Around = _nothing) -> dict[str, torch.Tensor]:
        """The dense HF Llama state dict at coefficients alpha (tied lm_head included), part by part:
        `around(slice)` is entered while a part's bank slice is read (a sharded soup gathers that slice
        there, so one part's bank is whole at a time)."""
        theta: dict[str, torch.Tensor] = {}
        for part, bank in zip(self.parts(), self.slices()):
            shared = dict(self.shared.get_submodule(part).named_parameters())
            with around(bank):
                theta.update({f"{part}.{name}": t for name, t in bank.forward(shared, alpha).items()})
        if self.model_cfg.tie_embeddings:
            theta["lm_head.weight"] = theta["model.embed_tokens.weight"]
        return theta

    def instantiate(self, h: torch.Tensor, around: Around = _nothing) -> dict[str, torch.Tensor]:
        """The dense HF Llama state dict Theta(h), computed in fp32 whatever autocast region it is
        called in: alpha and the sum S + sum_j alpha_j E_j are the very values export fuses (under
        bf16 autocast they would be rounded, and the whole bank copied to bf16 for backward); the
        dense model's matrix products then cast Theta as autocast says."""
        with torch.autocast(h.device.type, enabled=False):
            return self.instantiate_alpha(self.alpha(h.float()), around)

    def forward(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), h (k,) -> logits (B, T, vocab) of the dense model at Theta(h), each part
        instantiated just before it runs (the same values as `instantiate`, bit for bit)."""
        with torch.autocast(h.device.type, enabled=False):
            alpha = self.alpha(h.float())
        tied: dict[str, torch.Tensor] = {}  # the embedding's Theta, which a tied head reads again

        def weights(part: str) -> dict[str, torch.Tensor]:
            if part == "lm_head" and self.model_cfg.tie_embeddings:
                return tied
            theta = self.part_theta(part, alpha)
            if part == "model.embed_tokens":
                tied.update(theta)
            return theta

        return forward_by_parts(self.skeleton, weights, input_ids, self.shared.model.inv_freq)

    def dense_model(self, h: torch.Tensor, around: Around = _nothing) -> Llama:
        """A standalone dense `Llama` holding Theta(h) (detached copy; `around`: see `instantiate_alpha`)."""
        with torch.device("meta"), _NoRandomInit():
            dense = Llama(self.model_cfg)
        with torch.no_grad():
            theta = {k: v.detach() for k, v in self.instantiate(h, around).items()}
        dense.load_state_dict(theta, assign=True)
        dense.reset_buffers(h.device)
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
