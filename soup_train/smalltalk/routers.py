"""Router training by EM (docs/method.md section 4), and the assignment of the expert budget.

Round 0 splits `sequences_per_round` random sequences evenly at random. Each round then
(M) trains every router for `steps_per_round` steps on the prefixes of its shard, and
(E) draws fresh sequences, scores their prefixes under every router, and balanced-assigns them
(`routing.balanced_assign`): those shards are the next round's. The state after each round
(routers, AdamW moments, random stream, assignment) is saved in RUN/routers/round_NNN, so a
killed EM run resumes at its last finished round. Single process: routers are tiny.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from soup_train.checkpoint import read_tensors
from soup_train.config import save_json
from soup_train.model.llama import Llama
from soup_train.smalltalk.routing import balanced_assign, capacity, prefix_scores, purity, shares
from soup_train.smalltalk.run import SmallTalkRun, load_model, save_model
from soup_train.train import lr_at, make_optimizer, optimizer_step

log = logging.getLogger(__name__)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 77, purpose])))


class EM:
    def __init__(self, run: SmallTalkRun) -> None:
        self.run, self.cfg = run, run.config
        self.pool = run.pool("train")
        torch.manual_seed(self.cfg.router_train.seed)
        self.routers = [Llama(self.cfg.router) for _ in range(run.experts)]
        self.optims = [make_optimizer(r, self.cfg.router_train) for r in self.routers]
        self.rng = _rng(self.cfg.router_train.seed, 0)
        self.round, self.steps = 0, 0
        self.seqs, self.assign = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.history: list[dict] = []

    # ----------------------------------------------------------------------------- steps
    def fresh(self) -> np.ndarray:
        """Indices of this round's fresh sequences (without replacement within a round)."""
        n = min(self.cfg.em.sequences_per_round, len(self.pool))
        return self.rng.choice(len(self.pool), size=n, replace=False)

    def m_step(self) -> list[float]:
        """Train every router on the prefixes of its shard; returns each router's mean loss."""
        em, t = self.cfg.em, self.cfg.router_train
        losses = []
        for e, (router, optim) in enumerate(zip(self.routers, self.optims)):
            shard = self.seqs[self.assign == e]
            router.train()
            total = 0.0
            for s in range(em.steps_per_round):
                rows = shard[self.rng.integers(0, len(shard), size=t.batch_size)] if len(shard) else \
                    self.rng.integers(0, len(self.pool), size=t.batch_size)
                batch = torch.from_numpy(self.pool.take(rows)[:, :em.prefix_len + 1])
                loss, _ = optimizer_step(router, optim, [batch], None, t, self.steps + s, em.prefix_len)
                total += loss
            router.eval()
            losses.append(total / em.steps_per_round)
        self.steps += em.steps_per_round
        return losses

    def e_step(self) -> dict:
        """Score fresh sequences under every router and balanced-assign them."""
        em = self.cfg.em
        self.seqs = self.fresh()
        scores = prefix_scores(self.routers, self.pool.take(self.seqs), em.prefix_len, em.score_batch)
        self.assign = balanced_assign(scores, capacity(len(self.seqs), self.run.experts))
        free = scores.argmax(1)
        return {"mean_best_loglik": float(scores.max(1).mean()),
                "balanced_shares": shares(self.assign, self.run.experts),
                "argmax_shares": shares(free, self.run.experts),
                "purity": purity(self.assign, self.pool.labels[self.seqs], self.run.experts)}

    # ----------------------------------------------------------------------------- save / resume
    def save_round(self) -> None:
        final = self.run.round_dir(self.round)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for e, (router, optim) in enumerate(zip(self.routers, self.optims)):
            save_model(router, tmp / f"router_{e:02d}.safetensors")
            sd = optim.state_dict()
            save_file({f"{p}::{k}": v.contiguous() for p, st in sd["state"].items() for k, v in st.items()},
                      str(tmp / f"optim_{e:02d}.safetensors"))
            (tmp / f"optim_{e:02d}.json").write_text(json.dumps(sd["param_groups"]) + "\n")
        np.savez(tmp / "assignment.npz", sequences=self.seqs, routers=self.assign)
        save_json(tmp / "state.json", {"round": self.round, "steps": self.steps, "rng": self.rng.bit_generator.state,
                                       "history": self.history})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def resume(self) -> bool:
        rounds = sorted(p for p in (self.run.path / "routers").glob("round_*") if (p / "state.json").is_file())
        if not rounds:
            return False
        last = rounds[-1]
        state = json.loads((last / "state.json").read_text())
        for e in range(self.run.experts):
            self.routers[e] = load_model(self.cfg.router, last / f"router_{e:02d}.safetensors")
            self.optims[e] = make_optimizer(self.routers[e], self.cfg.router_train)
            flat = read_tensors(last / f"optim_{e:02d}.safetensors")
            st: dict[int, dict] = {}
            for key, v in flat.items():
                p, k = key.split("::")
                st.setdefault(int(p), {})[k] = v
            groups = json.loads((last / f"optim_{e:02d}.json").read_text())
            self.optims[e].load_state_dict({"state": st, "param_groups": groups})
        data = np.load(last / "assignment.npz")
        self.seqs, self.assign = data["sequences"], data["routers"]
        self.round, self.steps, self.history = state["round"], state["steps"], state["history"]
        self.rng.bit_generator.state = state["rng"]
        log.info("routers: resumed after EM round %d", self.round)
        return True


def train_routers(run: SmallTalkRun, progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) EM; writes RUN/routers/router_EE.safetensors at the end. Returns per-round stats."""
    em_cfg = run.config.em
    em = EM(run)
    if not em.resume():
        em.seqs = em.fresh()  # round 0: an even random split
        em.assign = em.rng.permutation(len(em.seqs)) % run.experts
        em.save_round()
    bar = tqdm(total=em_cfg.rounds, initial=em.round, desc="EM rounds", unit="round", disable=not progress)
    while em.round < em_cfg.rounds:
        losses = em.m_step()
        stats = {"round": em.round + 1, "router_loss": losses, **em.e_step(),
                 "lr": lr_at(em.steps - 1, run.config.router_train)}
        em.history.append(stats)
        em.round += 1
        em.save_round()
        bar.update(1)
        bar.set_postfix(purity=f"{stats['purity']:.2f}", loss=f"{np.mean(losses):.3f}")
        log.info("EM round %d: router loss %s, purity %.3f, argmax shares %s", em.round,
                 " ".join(f"{x:.3f}" for x in losses), stats["purity"],
                 " ".join(f"{x:.2f}" for x in stats["argmax_shares"]))
        if stop_after is not None and em.round >= stop_after:
            break
    bar.close()
    if em.round >= em_cfg.rounds:
        for e, router in enumerate(em.routers):
            save_model(router, run.router_file(e))
    return em.history


def assign_budget(run: SmallTalkRun) -> dict:
    """Balanced-assign the expert training budget with the trained routers; write RUN/assign/."""
    em = run.config.em
    pool = run.pool("train")
    routers = run.load_routers()
    n = len(pool) if em.budget == 0 else min(em.budget, len(pool))
    rng = _rng(run.config.router_train.seed, 1)
    seqs = np.sort(rng.choice(len(pool), size=n, replace=False)) if n < len(pool) else np.arange(len(pool))
    scores = np.concatenate([prefix_scores(routers, pool.take(seqs[i:i + 8192]), em.prefix_len, em.score_batch)
                             for i in range(0, len(seqs), 8192)])
    assign = balanced_assign(scores, capacity(n, run.experts))
    out = run.path / "assign"
    out.mkdir(parents=True, exist_ok=True)
    for e in range(run.experts):
        np.save(out / f".expert_{e:02d}.tmp.npy", seqs[assign == e])
        (out / f".expert_{e:02d}.tmp.npy").replace(run.assign_file(e))
    labels = pool.labels[seqs]
    by_domain = {name: np.bincount(assign[labels == d], minlength=run.experts).tolist()
                 for d, name in enumerate(run.domains)}
    summary = {"sequences": int(n), "capacity": capacity(n, run.experts), "prefix_len": em.prefix_len,
               "shares": shares(assign, run.experts), "purity": purity(assign, labels, run.experts),
               "argmax_shares": shares(scores.argmax(1), run.experts), "by_domain": by_domain}
    save_json(out / "summary.json", summary)
    return summary
