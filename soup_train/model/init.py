"""The soup's initial values, drawn row by row from seeded generators.

Row r (index along dim 0) of the soup's tensor `name` is drawn from a generator seeded by (seed,
name, r). The values therefore do not depend on how a tensor is split into rows: a soup sharded
along dim 0 (FSDP2) and built on the meta device draws only its own rows and equals the soup a
single process builds at the same seed, at any world size.

The distributions are a transformer's usual ones (docs/method.md, "Choices"):
- shared tensors S: matrices and embeddings N(0, init_std^2), RMSNorm weights 1;
- experts: N(0, expert_std^2 / n) (so the sum over n experts has std expert_std), or zeros
  (`soup.expert_init=zeros`); low-rank factors U, V such that U V^T has that std;
- the coefficient MLP: torch's `nn.Linear` default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from soup_train.config import ModelConfig, SoupConfig
from soup_train.model.soup_math import COEF_PREFIX, EXPERTS_PREFIX


def row_seed(seed: int, name: str, row: int) -> int:
    """The generator seed of one row of one tensor (63 bits of a hash: no two rows share a stream)."""
    digest = hashlib.blake2b(f"{seed}:{name}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw(name: str, shape: tuple[int, ...], start: int, stop: int, seed: int, model_cfg: ModelConfig,
         soup_cfg: SoupConfig, fan_in: int = 0) -> torch.Tensor:
    """Rows [start, stop) of tensor `name` (its full shape `shape`), on the CPU in fp32. `fan_in`:
    the input width of a coefficient-MLP layer (its bias has no second dimension to tell it)."""
    kind, scale = _distribution(name, shape, model_cfg, soup_cfg, fan_in)
    out = torch.empty((stop - start, *shape[1:]), dtype=torch.float32)
    if kind == "constant":
        return out.fill_(scale)
    generator = torch.Generator()
    for i, row in enumerate(out):
        generator.manual_seed(row_seed(seed, name, start + i))
        if kind == "normal":
            row.normal_(0.0, scale, generator=generator)
        else:
            row.uniform_(-scale, scale, generator=generator)
    return out


def _distribution(name: str, shape: tuple[int, ...], model_cfg: ModelConfig, soup_cfg: SoupConfig,
                  fan_in: int) -> tuple[str, float]:
    """("normal", std), ("uniform", bound) or ("constant", value) for tensor `name`."""
    if name.startswith(COEF_PREFIX):
        return "uniform", 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    if name.startswith(EXPERTS_PREFIX):
        std = soup_cfg.expert_std / math.sqrt(max(soup_cfg.n_experts, 1))
        if soup_cfg.expert_init == "zeros":
            return ("normal", 1.0) if name.endswith("_v") else ("constant", 0.0)
        if name.endswith(("_u", "_v")):
            return "normal", math.sqrt(std / math.sqrt(soup_cfg.expert_rank))
        return "normal", std
    if len(shape) == 1:  # the shared model's RMSNorm weights: its only vectors
        return "constant", 1.0
    return "normal", model_cfg.init_std


Place = Callable[[nn.Parameter], tuple[torch.Tensor, int]]


@torch.no_grad()
def init_soup(soup: nn.Module, seed: int, place: Place | None = None) -> None:
    """Fill every parameter of a soup (its `named_parameters` names) with its initial values.
    `place(p)` gives the tensor this process holds of p and the index of its first row (a sharded
    parameter: its local rows; None: every parameter whole); only those rows are drawn."""
    fan_ins = {name.rsplit(".", 1)[0]: p.shape[1] for name, p in soup.named_parameters()
               if name.startswith(COEF_PREFIX) and name.endswith(".weight")}
    for name, p in soup.named_parameters():
        local, start = place(p) if place is not None else (p.data, 0)
        if local.numel() == 0:
            continue
        rows = draw(name, tuple(p.shape), start, start + local.shape[0], seed, soup.model_cfg, soup.soup_cfg,
                    fan_ins.get(name.rsplit(".", 1)[0], 0))
        local.copy_(rows)
