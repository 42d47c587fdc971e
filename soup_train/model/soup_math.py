"""The soup math, defined once: Theta(h) = S + sum_j alpha_j(h) E_j, tensor by tensor.

Used by training (`SoupModel.instantiate`), by export (fusing memory-mapped tensors one at a
time) and by tests. Gradients follow from autograd: dS = g, dE_j = alpha_j g, dalpha_j = <E_j, g>.

Bank key layout (the checkpoint format, `model.safetensors`):
- shared tensor `name`       -> `shared.{name}`                  shape (*shape)
- full experts of `name`     -> `experts.{name}`                 shape (n, *shape)
- low-rank experts (matrices only, rank r): `experts.{name}_u` (n, out, r) and
  `experts.{name}_v` (n, in, r), so that E_j = U_j V_j^T; vectors stay full.
- coefficient MLP            -> `coef.net.{i}.weight|bias`
"""
from __future__ import annotations

import torch

SHARED_PREFIX = "shared."
EXPERTS_PREFIX = "experts."
COEF_PREFIX = "coef."


def is_low_rank(shape: tuple[int, ...] | torch.Size, rank: int) -> bool:
    """Low-rank experts apply to matrices only, and only when rank > 0."""
    return rank > 0 and len(shape) == 2


def expert_keys(name: str, shape: tuple[int, ...] | torch.Size, rank: int) -> tuple[str, ...]:
    """Checkpoint keys holding the experts of dense tensor `name`."""
    if is_low_rank(shape, rank):
        return (f"{EXPERTS_PREFIX}{name}_u", f"{EXPERTS_PREFIX}{name}_v")
    return (f"{EXPERTS_PREFIX}{name}",)


def combine(shared: torch.Tensor, experts: tuple[torch.Tensor, ...], alpha: torch.Tensor) -> torch.Tensor:
    """One fused tensor S + sum_j alpha_j E_j.

    shared: (*shape); alpha: (n,); experts: (E,) with E (n, *shape), or (U, V) with
    U (n, out, r), V (n, in, r) for a low-rank matrix. Export calls this very function once per
    mix (no batched matrix product): the fused weights are then bit-identical to the ones the
    soup's own forward uses, which is what parity stage (a) checks.
    """
    if len(experts) == 1:
        bank = experts[0]  # (n, *shape)
        return shared + torch.tensordot(alpha.to(bank.dtype), bank, dims=1)
    u, v = experts  # (n, out, r), (n, in, r)
    return shared + torch.einsum("j,jor,jir->oi", alpha.to(u.dtype), u, v)


def combine_many(shared: torch.Tensor, experts: tuple[torch.Tensor, ...], alphas: list[torch.Tensor],
                 block_bytes: int = 4 << 20) -> list[torch.Tensor]:
    """`combine` for every alpha, bit-identical to calling it once per alpha (export's batches).

    Called per alpha on a whole tensor, `combine` streams the full bank from memory for every
    mix. Here a full bank is cut into blocks of columns (about `block_bytes` of bank each) and
    `combine` runs on every block for every alpha, so each block is read from memory once and
    then from cache: every output element is still one dot product over the n experts in the same
    order (tests check torch.equal). Low-rank experts are small and are combined whole.
    """
    if len(alphas) == 1 or len(experts) != 1 or experts[0].shape[0] == 0:
        return [combine(shared, experts, a) for a in alphas]
    bank = experts[0].reshape(experts[0].shape[0], -1)  # (n, P)
    flat = shared.reshape(-1)
    outs = [torch.empty_like(flat) for _ in alphas]
    for start, stop in column_blocks(flat.numel(), max(MIN_BLOCK, block_bytes // (bank.shape[0] * bank.element_size()))):
        block, s = bank[:, start:stop], flat[start:stop]
        for out, alpha in zip(outs, alphas):
            out[start:stop] = combine(s, (block,), alpha)
    return [o.reshape(shared.shape) for o in outs]


MIN_BLOCK = 1024  # columns; BLAS takes another kernel (another summation order) for very narrow products


def column_blocks(total: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of `step` columns; a last block narrower than MIN_BLOCK joins the one before,
    so no block is narrower than MIN_BLOCK unless the whole tensor is."""
    bounds = list(range(0, total, step)) + [total]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_BLOCK:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))
