"""Benchmark: step time of the soup vs the dense model of the same instantiated size.

Every configuration runs in its own fresh process (so peak RSS is its own), with the same
training step as `soup-train fit` (`soup_train.train.optimizer_step`: forward at Theta(h),
backward, clipping, AdamW) on random token batches. Prints a table and, last,
`soup_over_dense_step_time_n16: <ratio>`.

    python tools/bench_train.py           # n in {4, 16, 64}, 30 timed steps each
    python tools/bench_train.py --quick   # under a minute
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

MODEL = dict(vocab_size=4096, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=176, max_seq_len=128)
BATCH, SEQ, K = 32, 128, 8


def _measure(n_experts: int, steps: int, warmup: int, queue) -> None:
    import torch

    from soup_train.config import ModelConfig, SoupConfig, TrainConfig
    from soup_train.model.llama import Llama
    from soup_train.model.soup import SoupModel
    from soup_train.train import make_optimizer, optimizer_step

    class Dense(torch.nn.Module):  # the dense model behind the soup's (x, h) call signature
        def __init__(self, cfg):
            super().__init__()
            self.net = Llama(cfg)

        def forward(self, x, h):
            return self.net(x)

    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL)
    model = Dense(cfg) if n_experts == 0 else SoupModel(cfg, SoupConfig(n_experts=n_experts), K)
    t = TrainConfig(steps=steps + warmup, batch_size=BATCH, warmup_steps=1)
    optim = make_optimizer(model, t)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        batch = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
        h = torch.distributions.Dirichlet(torch.ones(K)).sample()
        start = time.perf_counter()
        optimizer_step(model, optim, [batch], h, t, step, SEQ)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    queue.put((statistics.median(times), params, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(n_experts: int, steps: int, warmup: int) -> tuple[float, int, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(n_experts, steps, warmup, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps; finishes in under a minute")
    args = parser.parse_args()
    steps, warmup = (8, 2) if args.quick else (30, 5)
    print(f"model {MODEL}, batch {BATCH} x {SEQ} tokens, k={K} domains, {steps} timed steps (median)")
    dense_t, dense_p, dense_m = measure(0, steps, warmup)
    print("| model | params | step ms | tokens/s | peak RSS MB | step time / dense |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| dense | {dense_p / 1e6:.2f}M | {1e3 * dense_t:.1f} | {BATCH * SEQ / dense_t:,.0f} | {dense_m:.0f} | 1.00 |")
    ratios = {}
    for n in (4, 16, 64):
        t, p, m = measure(n, steps, warmup)
        ratios[n] = t / dense_t
        print(f"| soup n={n} | {p / 1e6:.2f}M | {1e3 * t:.1f} | {BATCH * SEQ / t:,.0f} | {m:.0f} | {ratios[n]:.2f} |")
    print(f"soup_over_dense_step_time_n16: {ratios[16]:.3f}")


if __name__ == "__main__":
    main()
