"""`fit --dry-run`: parameter counts, memory per GPU and tokens per step, without allocating.

Memory model (fp32 master weights, AdamW): 16 bytes per trained parameter (weights 4, gradients
4, two moments 8). DDP replicates all of it on every GPU; FSDP2 shards it over the world size but
gathers the full soup (4 bytes per parameter) transiently to instantiate Theta(h). Both add the
instantiated model (4 bytes per parameter, plus its gradient) and activations, estimated as
B*T*d*(34 + 5*heads*T/d) bytes per layer (Korthikanti et al. 2022, bf16, no recomputation) plus
the logits (B*T*vocab*6 bytes).

Checkpoints (`sharded`): model.safetensors holds every parameter in fp32 (4 bytes each), the
optimizer's two moments (8 bytes per parameter) are written by every rank as its own shard
(1/world of them), and the writing rank receives one rank's rows of one tensor at a time beyond
its shard: at most 1/world of the largest soup tensor.
"""
from __future__ import annotations

from soup_train.config import RunConfig
from soup_train.model.soup import count_parameters

GB = 1024**3


def plan(cfg: RunConfig, n_domains: int, world_size: int) -> dict[str, float]:
    m, t = cfg.model, cfg.train
    counts = count_parameters(m, cfg.soup, n_domains)
    seq = cfg.data.seq_len or m.max_seq_len
    act = t.batch_size * seq * m.d_model * (34 + 5 * m.n_heads * seq / m.d_model) * m.n_layers
    act += t.batch_size * seq * m.vocab_size * 6
    theta = counts["instantiated"] * 8
    ddp = counts["total"] * 16 + theta + act
    fsdp = counts["total"] * 16 / world_size + counts["total"] * 4 + theta + act
    return {**{f"params_{k}": v for k, v in counts.items()},
            "tokens_per_step": t.batch_size * seq * t.grad_accum * world_size,
            "gb_per_gpu_ddp": ddp / GB, "gb_per_gpu_fsdp": fsdp / GB, "gb_activations": act / GB,
            "gb_checkpoint_weights": counts["total"] * 4 / GB, "gb_checkpoint_optimizer": counts["total"] * 8 / GB,
            "gb_checkpoint_optimizer_per_rank": counts["total"] * 8 / world_size / GB,
            "gb_save_extra_rank0": counts["largest"] * 4 / world_size / GB,
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
        f"memory per GPU, DDP:        {p['gb_per_gpu_ddp']:,.1f} GB",
        f"memory per GPU, FSDP2:      {p['gb_per_gpu_fsdp']:,.1f} GB (activations {p['gb_activations']:.1f} GB)",
        f"checkpoint on disk:         {p['gb_checkpoint_weights']:,.1f} GB weights (model.safetensors, what export "
        f"reads) + {p['gb_checkpoint_optimizer']:,.1f} GB optimizer, {p['gb_checkpoint_optimizer_per_rank']:,.2f} GB "
        "written by each rank",
        f"checkpoint memory per rank: its own shard, nothing gathered; the writing rank (0) also one rank's rows "
        f"of one tensor at a time, at most {p['gb_save_extra_rank0']:,.2f} GB",
    ]
