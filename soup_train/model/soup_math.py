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


def combine(shared: torch.Tensor, experts: tuple[torch.Tensor, ...], alpha: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """One fused tensor S + sum_j alpha_j E_j.

    shared: (*shape); alpha: (n,); experts: (E,) with E (n, *shape), or (U, V) with
    U (n, out, r), V (n, in, r) for a low-rank matrix, or () for a dense weight (no experts). Export calls this very function once per
    mix (no batched matrix product): the fused weights are then bit-identical to the ones the
    soup's own forward uses, which is what parity stage (a) checks. `out` (a full bank, no
    autograd): the result is written there by the same two operations, the product (1, n) @ (n, P)
    and then S added (a + b == b + a in IEEE arithmetic), so the bits are the same.
    """
    if not experts:  # a dense model (export's stage commands): Theta is the weight itself
        return shared.clone() if out is None else out.view(shared.shape).copy_(shared)
    if len(experts) == 1:
        bank = experts[0]  # (n, *shape)
        flat_bank = bank.reshape(bank.shape[0], shared.numel())  # (n, P)
        if bank.dtype != shared.dtype:  # a 16-bit bank (export): summed in the shared tensor's precision
            return _upcast_combine(shared, flat_bank, alpha, out)
        coef = alpha.to(bank.dtype)[None]  # (1, n)
        if out is None or out.dtype != shared.dtype:
            return shared + torch.mm(coef, flat_bank).view(shared.shape)
        torch.mm(coef, flat_bank, out=out.view(1, -1))
        return out.view(shared.shape).add_(shared)
    u, v = experts  # (n, out, r), (n, in, r)
    if u.dtype != shared.dtype:
        u, v = u.to(shared.dtype), v.to(shared.dtype)  # low-rank factors are small
    return shared + torch.einsum("j,jor,jir->oi", alpha.to(u.dtype), u, v)


def instantiate(tensors, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """{dense name: `combine`d tensor} of (name, shared, experts) triples, one after another: the dense
    state at coefficients alpha, from a soup in memory (`SoupModel.tensors`) or a mapped bank
    (export's `Bank.tensors`), whole or a part of it."""
    return {name: combine(shared, experts, alpha) for name, shared, experts in tensors}


UPCAST_VALUES = 1 << 22  # bank values converted at a time (16 MB in fp32)


def _upcast_combine(shared: torch.Tensor, flat_bank: torch.Tensor, alpha: torch.Tensor,
                    out: torch.Tensor | None) -> torch.Tensor:
    """`combine` of a bank stored in lower precision (bf16 or fp16: exported soups): each block of
    columns is converted to the shared tensor's dtype and multiplied there, so the sum is the one of
    the converted bank without ever holding it (a 128-expert embedding bank is 12.6 GB in fp32).
    The same blocks every time: a bank fuses to the same bits in every export and check."""
    n, total = flat_bank.shape
    coef = alpha.to(shared.dtype)[None]  # (1, n)
    flat = out.view(-1) if out is not None and out.dtype == shared.dtype else torch.empty(total, dtype=shared.dtype)
    step = max(1, UPCAST_VALUES // max(n, 1))
    for start in range(0, total, step):
        stop = min(total, start + step)
        torch.mm(coef, flat_bank[:, start:stop].to(shared.dtype), out=flat[start:stop].view(1, -1))
    return flat.view(shared.shape).add_(shared)


def combine_many(shared: torch.Tensor, experts: tuple[torch.Tensor, ...], alphas: list[torch.Tensor],
                 block_bytes: int = 4 << 20, workspace: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """`combine` for every alpha at once (export's batches): a (len(alphas), *shape) tensor.

    One mix is `combine` itself, so a single build's weights are bit-identical to the soup's own
    forward. For several mixes, a full bank is cut into blocks of columns (about `block_bytes` of
    bank each) and each block is fused for all mixes by one matrix product, shared + A @ block with
    A the (mixes, n) alphas: the bank is read from memory once, and the product runs at matrix
    speed instead of one vector product per mix (measured: docs/internals.md). Each
    output is the same sum in another order, so it equals `combine` to fp32 rounding (tests bound
    it); the same batch gives the same bytes every time. Low-rank experts are small and are
    combined whole, per mix. `workspace` (fp32, at least mixes x numel) receives the products
    instead of fresh memory: a caller fusing tensor after tensor saves the page faults of new
    memory, which would cost about as much as the products themselves (the result is a view of it).
    `exact`: every mix by `combine` itself, bit-identical to its single build (the bank is then read
    once per mix).
    """
    flat = shared.reshape(-1)
    out = _workspace(workspace, len(alphas), flat)
    if len(alphas) == 1 or exact:  # a single build, or exact: `combine` itself for each mix
        if out is None:
            return torch.stack([combine(shared, experts, a) for a in alphas])
        rows = out.view(len(alphas), *shared.shape)
        for row, a in zip(rows, alphas):
            fused = combine(shared, experts, a, out=row)
            if fused.data_ptr() != row.data_ptr():  # low-rank experts: combine makes a new tensor
                row.copy_(fused)
        return rows
    if len(experts) != 1 or experts[0].shape[0] == 0:
        return torch.stack([combine(shared, experts, a) for a in alphas])
    bank = experts[0].reshape(experts[0].shape[0], -1)  # (n, P), possibly 16-bit: converted a block at a time
    coefs = torch.stack([a.to(flat.dtype) for a in alphas])  # (mixes, n)
    out = torch.empty(len(alphas) * flat.numel(), dtype=flat.dtype) if out is None else out
    out = out.view(len(alphas), flat.numel())
    for start, stop in column_blocks(flat.numel(), max(MIN_BLOCK, block_bytes // (bank.shape[0] * flat.element_size()))):
        torch.addmm(flat[start:stop], coefs, bank[:, start:stop].to(flat.dtype), out=out[:, start:stop])
    return out.reshape(len(alphas), *shared.shape)


def _workspace(workspace: torch.Tensor | None, mixes: int, like: torch.Tensor) -> torch.Tensor | None:
    """The first mixes x numel values of the workspace (flat), or None when it cannot hold them."""
    size = mixes * like.numel()
    if workspace is None or workspace.dtype != like.dtype or workspace.numel() < size:
        return None
    return workspace[:size]


MIN_BLOCK = 1024  # columns; narrower products waste the matrix kernel


def column_blocks(total: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of `step` columns; a last block narrower than MIN_BLOCK joins the one before,
    so no block is narrower than MIN_BLOCK unless the whole tensor is."""
    bounds = list(range(0, total, step)) + [total]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_BLOCK:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def coefficient_grad(experts: tuple[torch.Tensor, ...], grad: torch.Tensor) -> torch.Tensor:
    """d<combine(S, experts, alpha), grad>/d alpha: the (n,) vector <E_j, grad> (export's mix search:
    the gradient of a loss through alpha, from the dense model's gradient `grad` of one tensor,
    without the soup in memory). Summed in `grad`'s dtype over blocks of columns, as `combine` is."""
    if len(experts) == 1:
        flat_bank = experts[0].reshape(experts[0].shape[0], -1)  # (n, P)
        flat = grad.reshape(-1)
        out = torch.zeros(flat_bank.shape[0], dtype=grad.dtype)
        step = max(1, UPCAST_VALUES // max(flat_bank.shape[0], 1))
        for start in range(0, flat.numel(), step):
            out += flat_bank[:, start:start + step].to(grad.dtype) @ flat[start:start + step]
        return out
    u, v = experts  # (n, out, r), (n, in, r): <U_j V_j^T, G> = sum_oi (U_j V_j^T)_oi G_oi
    return torch.einsum("jor,oi,jir->j", u.to(grad.dtype), grad, v.to(grad.dtype))
