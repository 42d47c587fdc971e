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
                 block_bytes: int = 4 << 20, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """`combine` for every alpha at once (export's batches): a (len(alphas), *shape) tensor.

    One mix is `combine` itself, so a single build's weights are bit-identical to the soup's own
    forward. For several mixes, a full bank is cut into blocks of columns (about `block_bytes` of
    bank each) and each block is fused for all mixes by one matrix product, shared + A @ block with
    A the (mixes, n) alphas: the bank is read from memory once, and the product runs at matrix
    speed instead of one vector product per mix (3x faster at 16 mixes of 32 experts). Each
    output is the same sum in another order, so it equals `combine` to fp32 rounding (tests bound
    it); the same batch gives the same bytes every time. Low-rank experts are small and are
    combined whole, per mix. `workspace` (fp32, at least mixes x numel) receives the block products
    instead of a fresh tensor: a caller fusing tensor after tensor saves the page faults of new
    memory, which cost about as much as the products themselves (the result is a view of it).
    """
    if len(alphas) == 1:  # a single build: `combine` itself, as a (1, *shape) view (no copy)
        return _combine_into(shared, experts, alphas[0], workspace).unsqueeze(0)
    if len(experts) != 1 or experts[0].shape[0] == 0:
        return torch.stack([combine(shared, experts, a) for a in alphas])
    bank = experts[0].reshape(experts[0].shape[0], -1)  # (n, P)
    flat = shared.reshape(-1)
    coefs = torch.stack([a.to(bank.dtype) for a in alphas])  # (mixes, n)
    size = len(alphas) * flat.numel()
    reuse = workspace is not None and workspace.dtype == flat.dtype and workspace.numel() >= size
    out = (workspace[:size] if reuse else torch.empty(size, dtype=flat.dtype)).view(len(alphas), flat.numel())
    for start, stop in column_blocks(flat.numel(), max(MIN_BLOCK, block_bytes // (bank.shape[0] * bank.element_size()))):
        torch.addmm(flat[start:stop], coefs, bank[:, start:stop], out=out[:, start:stop])
    return out.reshape(len(alphas), *shared.shape)


def _combine_into(shared: torch.Tensor, experts: tuple[torch.Tensor, ...], alpha: torch.Tensor,
                  workspace: torch.Tensor | None) -> torch.Tensor:
    """`combine` computed into the workspace when it fits: the same two operations (the expert
    product, then the shared tensor added: a + b == b + a in IEEE arithmetic), so the same bits."""
    size = shared.numel()
    if (len(experts) != 1 or workspace is None or workspace.dtype != shared.dtype or workspace.numel() < size
            or experts[0].dtype != shared.dtype):
        return combine(shared, experts, alpha)
    out = workspace[:size].view(shared.shape)
    torch.tensordot(alpha.to(experts[0].dtype), experts[0], dims=1, out=out)
    return out.add_(shared)


MIN_BLOCK = 1024  # columns; narrower products waste the matrix kernel


def column_blocks(total: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of `step` columns; a last block narrower than MIN_BLOCK joins the one before,
    so no block is narrower than MIN_BLOCK unless the whole tensor is."""
    bounds = list(range(0, total, step)) + [total]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_BLOCK:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))
