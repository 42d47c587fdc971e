"""The soup at h equals the dense model at instantiate(h), which equals transformers' Llama."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from soup_train.config import ModelConfig, SoupConfig
from soup_train.model.llama import Llama
from soup_train.model.soup import SoupModel, count_parameters
from soup_train.model.soup_math import combine

TOL = 1e-5
VARIANTS = {
    "tied-mha": (dict(tie_embeddings=True, n_kv_heads=4), dict()),
    "untied-gqa": (dict(tie_embeddings=False, n_kv_heads=2), dict()),
    "lowrank-softmax": (dict(tie_embeddings=True, n_kv_heads=1), dict(expert_rank=3, alpha="softmax")),
}


def make_soup(model_kw: dict, soup_kw: dict, k: int = 5) -> SoupModel:
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, d_ff=48, **model_kw)
    soup = SoupModel(mc, SoupConfig(n_experts=3, coef_hidden=16, **soup_kw), k)
    with torch.no_grad():  # make the experts matter: larger than their init
        for p in soup.experts.parameters():
            p.normal_(std=0.05)
        soup.coef.net[-1].weight.normal_(std=1.0)  # and alpha vary with h
    return soup


def random_h(k: int = 5) -> torch.Tensor:
    return torch.softmax(torch.randn(k) * 2, 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_soup_equals_dense_equals_transformers(variant):
    soup = make_soup(*VARIANTS[variant])
    h, ids = random_h(), torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        soup_logits = soup(ids, h)
        dense_logits = soup.dense_model(h)(ids)
        hf = LlamaForCausalLM(LlamaConfig(**soup.model_cfg.to_hf(), attn_implementation="eager")).eval()
        hf.load_state_dict({k: v.detach() for k, v in soup.instantiate(h).items()}, strict=True)
        hf_logits = hf(ids).logits
    assert (soup_logits - dense_logits).abs().max().item() <= TOL
    assert (soup_logits - hf_logits).abs().max().item() <= TOL
    # and the soup really depends on h (a different h gives different logits)
    with torch.no_grad():
        other = soup(ids, torch.nn.functional.one_hot(torch.tensor(0), 5).float())
    assert (other - soup_logits).abs().max().item() > 1e-3


def test_dense_state_dict_names_are_hf_llama_names():
    soup = make_soup(*VARIANTS["untied-gqa"])
    hf = LlamaForCausalLM(LlamaConfig(**soup.model_cfg.to_hf()))
    assert set(soup.instantiate(random_h())) == set(hf.state_dict())
    assert set(Llama(soup.model_cfg).state_dict()) == set(hf.state_dict())


def test_combine_is_s_plus_weighted_sum_of_experts():
    s, bank, alpha = torch.randn(4, 6), torch.randn(3, 4, 6), torch.randn(3)
    expected = s + alpha[0] * bank[0] + alpha[1] * bank[1] + alpha[2] * bank[2]
    assert torch.allclose(combine(s, (bank,), alpha), expected, atol=1e-6)
    u, v = torch.randn(3, 4, 2), torch.randn(3, 6, 2)
    expected = s + sum(alpha[j] * u[j] @ v[j].T for j in range(3))
    assert torch.allclose(combine(s, (u, v), alpha), expected, atol=1e-5)


def test_gradients_follow_the_paper():
    """dS = g, dE_j = alpha_j g, dalpha_j = <E_j, g>, with g = dLoss/dTheta."""
    soup = make_soup(*VARIANTS["untied-gqa"])
    h, ids = random_h(), torch.randint(0, 101, (2, 9))
    alpha = soup.alpha(h).detach().requires_grad_()
    theta = soup.instantiate_alpha(alpha)
    loss = torch.func.functional_call(soup.shared, theta, (ids,)).square().mean()
    loss.backward()
    theta_leaf = {k: v.detach().requires_grad_() for k, v in theta.items()}
    torch.func.functional_call(soup.shared, theta_leaf, (ids,)).square().mean().backward()
    name = "model.layers.1.mlp.up_proj.weight"
    g = theta_leaf[name].grad
    shared = dict(soup.shared.named_parameters())[name]
    bank = soup.experts.experts_of(name)[0]
    assert torch.allclose(shared.grad, g, atol=1e-7)
    for j in range(3):
        assert torch.allclose(bank.grad[j], alpha[j].detach() * g, atol=1e-7)
    expected = sum((soup.experts.experts_of(n)[0] * theta_leaf[n].grad).flatten(1).sum(1)
                   for n, p in soup.shared.named_parameters())
    assert torch.allclose(alpha.grad, expected, atol=1e-6)


def test_checkpoint_layout_and_parameter_count():
    soup = make_soup(*VARIANTS["lowrank-softmax"])
    keys = list(soup.state_dict())
    assert "experts.model.layers.0.self_attn.q_proj.weight_u" in keys
    assert soup.state_dict()["experts.model.norm.weight"].shape == (3, 32)
    assert any(k.startswith("coef.net.") for k in keys)
    counts = count_parameters(soup.model_cfg, soup.soup_cfg, 5)
    assert counts["total"] == sum(p.numel() for p in soup.parameters())
    assert counts["instantiated"] == sum(p.numel() for p in soup.shared.parameters())


def test_alpha_softmax_is_on_the_simplex():
    soup = make_soup(*VARIANTS["lowrank-softmax"])
    alpha = soup.alpha(random_h())
    assert alpha.min() >= 0 and abs(alpha.sum().item() - 1) < 1e-6


def test_zero_experts_is_the_dense_model_whatever_h():
    """soup.n_experts = 0 (the reproduction's dense baselines): Theta(h) = S for every h."""
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, d_ff=48)
    soup = SoupModel(mc, SoupConfig(n_experts=0, coef_hidden=16), 5)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = soup.shared(ids)
        for _ in range(3):
            assert (soup(ids, random_h()) - ref).abs().max().item() == 0.0
    assert count_parameters(mc, SoupConfig(n_experts=0, coef_hidden=16), 5)["experts"] == 0


@pytest.mark.parametrize("n, rank, shape, block", [
    (7, 0, (301, 67), 1500),  # 1500-column blocks, a ragged last block
    (128, 0, (3073,), 1024),  # a narrow tail joins the block before
    (7, 3, (301, 67), 1500),  # low-rank experts: combined whole, per mix
    (0, 0, (40, 9), 1024),  # no experts (a dense model)
])
def test_combine_many_matches_combine_per_mix(n, rank, shape, block):
    """Export's batches fuse block by block with one matrix product for all mixes: every fused
    tensor must equal `combine` on the whole tensor to fp32 rounding, be the same bytes on a
    second call, and one mix must be `combine` exactly (single builds stay bit-identical)."""
    from soup_train.model.soup_math import combine_many

    torch.manual_seed(0)
    shared = torch.randn(*shape)
    experts = (torch.randn(n, *shape),) if rank == 0 else (torch.randn(n, shape[0], rank), torch.randn(n, shape[1], rank))
    alphas = [torch.randn(n) for _ in range(5)]
    fused = combine_many(shared, experts, alphas, block_bytes=max(n, 1) * 4 * block)
    assert fused.shape == (5, *shape)
    assert torch.equal(fused, combine_many(shared, experts, alphas, block_bytes=max(n, 1) * 4 * block))
    for alpha, got in zip(alphas, fused):
        ref = combine(shared, experts, alpha)
        scale = shared.abs().max() + (combine(torch.zeros_like(shared), tuple(e.abs() for e in experts), alpha.abs())
                                      .abs().max() if n else 0)
        assert (got - ref).abs().max() <= 8 * torch.finfo(torch.float32).eps * scale
        if rank or not n:
            assert torch.equal(got, ref)  # per-mix paths are combine itself
    assert torch.equal(combine_many(shared, experts, alphas[:1])[0], combine(shared, experts, alphas[0]))
    workspace = torch.full((5 * math.prod(shape) + 3,), float("nan"))  # larger than needed; stale values
    into = combine_many(shared, experts, alphas, block_bytes=max(n, 1) * 4 * block, workspace=workspace)
    assert torch.equal(into, fused)  # every value written, none left from before
    if n and not rank:
        assert into.data_ptr() == workspace.data_ptr()  # the products went into the workspace
    one = combine_many(shared, experts, alphas[:1], workspace=workspace)[0]
    assert torch.equal(one, combine(shared, experts, alphas[0]))  # a single build stays bit-identical to the soup
    if n and not rank:
        assert one.data_ptr() == workspace.data_ptr()  # and it was computed in the workspace
    small = torch.zeros(3)
    assert torch.equal(combine_many(shared, experts, alphas, block_bytes=max(n, 1) * 4 * block, workspace=small), fused)


def test_column_blocks_never_leave_a_narrow_tail():
    from soup_train.model.soup_math import MIN_BLOCK, column_blocks

    assert column_blocks(3073, 1024) == [(0, 1024), (1024, 2048), (2048, 3073)]
    assert column_blocks(5000, 2000) == [(0, 2000), (2000, 5000)]
    assert column_blocks(6000, 2000) == [(0, 2000), (2000, 4000), (4000, 6000)]
    assert column_blocks(500, 2000) == [(0, 500)]
    for total in (1, 1023, 1025, 4096, 9999):
        blocks = column_blocks(total, MIN_BLOCK)
        assert blocks[0][0] == 0 and blocks[-1][1] == total and all(b - a >= min(MIN_BLOCK, total) for a, b in blocks)


def test_window_losses_are_each_windows_cross_entropy_and_average_to_loss_at():
    import numpy as np
    import torch.nn.functional as F

    from soup_train.evaluate import loss_at, window_losses

    soup = make_soup({}, {}).eval()
    h = random_h()
    windows = np.random.default_rng(0).integers(0, 101, size=(7, 13))
    per = window_losses(soup, windows, h.numpy(), 3, 12, torch.device("cpu"))  # batches of 3: 3 + 3 + 1
    with torch.no_grad():
        for i, row in enumerate(torch.as_tensor(windows)):
            ref = F.cross_entropy(soup(row[None, :12], h)[0], row[1:13])
            assert abs(per[i] - float(ref)) <= 1e-5
    assert per.shape == (7,) and abs(loss_at(soup, windows, h.numpy(), 3, 12, torch.device("cpu")) - per.mean()) <= 1e-9


def test_theta_is_instantiated_in_fp32_under_bf16_autocast_as_export_fuses_it(debug_ckpt):
    """Training's Theta(h) under bf16 autocast (the GPU default) equals export's fp32 fusion of the
    same checkpoint bit for bit: alpha and the expert sum are never rounded to bf16."""
    from soup_export.bank import Bank
    from soup_train.checkpoint import load_soup

    soup, info = load_soup(debug_ckpt)
    bank = Bank.open(debug_ckpt)
    h = torch.tensor([0.6, 0.3, 0.1])
    forward_theta, part_theta = {}, soup.part_theta  # what the forward itself instantiates, part by part

    def recorded(part, alpha):
        theta = part_theta(part, alpha)
        forward_theta.update({f"{part}.{k}": v for k, v in theta.items()})
        return theta

    soup.part_theta = recorded
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = soup.instantiate(h)
        logits = soup(torch.tensor([[1, 2, 3, 4]]), h)
    assert logits.dtype == torch.bfloat16  # the matrix products still run in bf16
    exported = bank.instantiate(bank.alpha(h.numpy()))
    assert set(forward_theta) == set(exported) - {"lm_head.weight"}  # tied: the embedding's, read again
    for name, tensor in exported.items():
        assert theta[name].dtype == torch.float32 and torch.equal(theta[name], tensor), name
        if name in forward_theta:
            assert forward_theta[name].dtype == torch.float32 and torch.equal(forward_theta[name], tensor), name
