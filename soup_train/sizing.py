"""`fit --dry-run`: parameter counts, memory per GPU and tokens per step, without allocating.

Memory per GPU (GiB), fp32 master weights and AdamW, the parts of one training step at its peak
(the middle of the backward pass). P is the soup's parameter count, W the world size, R the root
unit's (the shared tensors S and the coefficient MLP), U the largest bank slice's (one part of the
dense model: the embedding's, or one decoder layer's) and D the instantiated model's:
- state: weights, gradients and AdamW's two moments, 16 bytes per parameter: 16P under DDP, whose
  gradient buckets add 4P more; 16P / W under FSDP2;
- FSDP2's root unit, gathered through forward and backward with its gradients: 8R;
- FSDP2's slices in flight, at their most in backward: the slice being computed (its gathered
  weights, its gradients before the reduce-scatter, the reduce-scatter's buffer) and the
  all-gather of the slice before it (prefetch): 4 * max_i (3 U_i + U_{i-1}), slices in forward
  order. The embedding's slice runs last in backward with nothing to prefetch;
- Theta: in fp32 the matrix products keep it for backward (4D); under bf16 autocast they keep its
  16-bit casts instead (2D), and of the fp32 Theta only the part being computed and the
  embedding's (a tied head reads it again) live at once (4 times the largest part);
- activations: B*T*d*(34 + 5*heads*T/d) bytes per layer in bf16 (Korthikanti et al. 2022, no
  recomputation), without the 5*heads*T/d attention-matrix term on CUDA (flash attention), twice
  that in fp32; the logits, their fp32 copy for the loss and its gradient: B*T*vocab*(6 or 8).
`tests/test_memory.py` checks the FSDP2 figure against torch's FSDP memory tracker on two CPU ranks
(gloo). On CUDA, FSDP2 frees a slice's gathered weights before it allocates the reduce-scatter's
buffer, so the slices' term is an upper bound there (by up to one slice); the CUDA caching
allocator's reserve, the CUDA context and NCCL's buffers are not counted, and no GPU has checked
the figure yet.

Traffic per rank and optimizer step under FSDP2: each micro-batch gathers every slice in forward
and again in backward and reduce-scatters its gradients, all in fp32: about 12P bytes per
micro-batch (the root's gather and reduction included).

Checkpoints (`sharded`): model.safetensors holds every parameter in fp32 (4 bytes each), the
optimizer's two moments (8 bytes per parameter) are written by every rank as its own shard
(1/world of them), and the writing rank receives one rank's rows of one tensor at a time beyond
its shard: at most 1/world of the largest soup tensor.
"""
from __future__ import annotations

from soup_train.config import RunConfig
from soup_train.model.soup import count_parameters, meta_soup

GIB = 1024**3
WORLD_SIZES = (8, 32, 128)  # the world sizes every dry run prints FSDP2's memory for


def unit_counts(cfg: RunConfig, n_domains: int) -> dict[str, int]:
    """Parameters of FSDP2's root unit (S and the coefficient MLP), and the most parameters of bank
    slices in flight at once in backward, max_i (3 U_i + U_{i-1}) (see the module's docstring)."""
    soup = meta_soup(cfg.model, cfg.soup, n_domains)
    slices = [sum(p.numel() for p in s.parameters()) for s in soup.slices()]
    total = sum(p.numel() for p in soup.parameters())
    in_flight = max(3 * u + (slices[i - 1] if i else 0) for i, u in enumerate(slices))
    dense = [sum(p.numel() for p in soup.shared.get_submodule(part).parameters()) for part in soup.parts()]
    return {"root": total - sum(slices), "slices_in_flight": in_flight, "largest_dense_part": max(dense)}


def soup_counts(cfg: RunConfig, n_domains: int) -> dict[str, int]:
    """Every parameter count the memory model reads (`count_parameters` and `unit_counts`)."""
    return {**count_parameters(cfg.model, cfg.soup, n_domains), **unit_counts(cfg, n_domains)}


def memory(cfg: RunConfig, counts: dict[str, int], world_size: int, device: str = "cuda") -> dict[str, float]:
    """Bytes per GPU by part (see the module's docstring), under DDP and FSDP2; `counts`: `soup_counts`."""
    m, t = cfg.model, cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device == "cuda")
    seq = cfg.data.seq_len or m.max_seq_len
    per_layer = 34 + (0 if device == "cuda" else 5 * m.n_heads * seq / m.d_model)
    act = t.batch_size * seq * m.d_model * per_layer * m.n_layers * (1 if bf16 else 2)
    act += t.batch_size * seq * m.vocab_size * (6 if bf16 else 8)
    largest_part = max(counts["largest_dense_part"], 1)
    theta = counts["instantiated"] * (2 if bf16 else 4) + (4 * largest_part if bf16 else 0)
    p = counts["total"]
    fsdp = {"state": 16 * p / world_size, "root": 8 * counts["root"], "slices": 4 * counts["slices_in_flight"],
            "theta": theta, "activations": act}
    return {"ddp": 20 * p + theta + act, "fsdp": fsdp, "fsdp_total": sum(fsdp.values()),
            "fsdp_traffic": 12 * p * t.grad_accum * (world_size - 1) / world_size}


def plan(cfg: RunConfig, n_domains: int, world_size: int) -> dict[str, float]:
    m, t = cfg.model, cfg.train
    counts = soup_counts(cfg, n_domains)
    mem = memory(cfg, counts, world_size)
    seq = cfg.data.seq_len or m.max_seq_len
    return {**{f"params_{k}": v for k, v in counts.items()},
            "tokens_per_step": t.batch_size * seq * t.grad_accum * world_size,
            "gib_per_gpu_ddp": mem["ddp"] / GIB, "gib_per_gpu_fsdp": mem["fsdp_total"] / GIB,
            **{f"gib_fsdp_{k}": v / GIB for k, v in mem["fsdp"].items()},
            **{f"gib_per_gpu_fsdp_w{w}": memory(cfg, counts, w)["fsdp_total"] / GIB for w in WORLD_SIZES},
            "gib_fsdp_traffic": mem["fsdp_traffic"] / GIB,
            "gib_checkpoint_weights": counts["total"] * 4 / GIB, "gib_checkpoint_optimizer": counts["total"] * 8 / GIB,
            "gib_checkpoint_optimizer_per_rank": counts["total"] * 8 / world_size / GIB,
            "gib_save_extra_rank0": counts["largest"] * 4 / world_size / GIB,
            "world_size": world_size, "n_domains": n_domains}


def describe(p: dict[str, float]) -> list[str]:
    """Human-readable lines of a plan."""
    return [
        f"domains k:                  {p['n_domains']:,}",
        f"instantiated model:         {p['params_instantiated'] / 1e6:,.1f}M parameters",
        f"soup total (S + bank + MLP): {p['params_total'] / 1e6:,.1f}M "
        f"(bank {p['params_experts'] / 1e6:,.1f}M, MLP {p['params_coef_mlp'] / 1e6:,.2f}M)",
        f"world size:                 {p['world_size']}",
        f"tokens per optimizer step:  {p['tokens_per_step']:,}",
        f"memory per GPU, DDP:        {p['gib_per_gpu_ddp']:,.1f} GiB",
        f"memory per GPU, FSDP2:      {p['gib_per_gpu_fsdp']:,.1f} GiB (state {p['gib_fsdp_state']:.1f}, root unit "
        f"{p['gib_fsdp_root']:.1f}, bank slices in flight {p['gib_fsdp_slices']:.1f}, Theta {p['gib_fsdp_theta']:.1f}, "
        f"activations {p['gib_fsdp_activations']:.1f})",
        "FSDP2 by world size:        " + ", ".join(f"{w} GPUs {p[f'gib_per_gpu_fsdp_w{w}']:,.1f} GiB" for w in WORLD_SIZES),
        f"FSDP2 traffic per step:     {p['gib_fsdp_traffic']:,.0f} GiB per GPU (fp32 gathers in forward and backward, "
        "a reduce-scatter of the gradients; estimates: not yet measured on GPUs)",
        f"checkpoint on disk:         {p['gib_checkpoint_weights']:,.1f} GiB weights (model.safetensors, what export "
        f"reads) + {p['gib_checkpoint_optimizer']:,.1f} GiB optimizer, {p['gib_checkpoint_optimizer_per_rank']:,.2f} GiB "
        "written by each rank",
        f"checkpoint memory per rank: its own shard, nothing gathered; the writing rank (0) also one rank's rows "
        f"of one tensor at a time, at most {p['gib_save_extra_rank0']:,.2f} GiB",
    ]
