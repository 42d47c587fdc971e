"""`soup-export mixture`: a SmallTalk run's routers and experts as ONNX models under one size budget.

Layout of a mixture directory:
    manifest.json          kind "smalltalk-mixture": prefix length, tier, every model (its
                           directory, bytes, parity), the total against the budget, routing
                           parity, and the SHA-256 and bytes of every file below
    routers/router_EE/     one export directory per router ...
    experts/expert_EE/     ... and per expert: onnx/ (the model), hf/ (unless --no-hf) and a
                           manifest.json of its own, the layout `soup-export build` writes, so
                           `soup-run` runs any one of them alone
`soup-run generate DIR` on the mixture scores the prompt's prefix under every router and
generates with the best router's expert (docs/method.md section 4).

Choices:
- One tier for every model, counted over the whole mixture: `auto` picks the highest precision
  whose total (routers + experts, graph + data) fits `--max-size`; a named tier is checked.
- Parity per model, stages (b)-(d) of `soup-export build` (stage (a) is soup-only), on held-out
  windows of the run's data: a router on the test split's prefixes (its whole context), an expert
  on the test windows its PyTorch routers send it (all test windows if they send it none).
- Routing parity: the exported routers route the held-out windows; the share that reaches the
  same expert as under the PyTorch routers is recorded and must be >= MIN_ROUTE_AGREEMENT (0.9).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from soup_export import budget as budget_mod
from soup_export.build import ExportSpec
from soup_export.cache import file_sha256
from soup_export.check import dense_parity
from soup_export.compile import write_tier
from soup_export.errors import BudgetError, ExportInputError, ParityError
from soup_export.files import human
from soup_export.layout import HF_WEIGHTS, MIXTURE_KIND, Arch, hf_dir, hf_side_files, member_dir, onnx_dir, \
    write_files, write_manifest
from soup_export.output import check_output_path, staged_output
from soup_train.config import ModelConfig
from soup_train.errors import DataError
from soup_train.smalltalk.run import SmallTalkRun

log = logging.getLogger(__name__)
KIND = MIXTURE_KIND
MIN_ROUTE_AGREEMENT = 0.9  # exported routers vs PyTorch routers, on held-out windows
HELD_OUT_PER_DOMAIN = 16  # test windows per named domain for parity and routing agreement


@dataclass(frozen=True)
class Member:
    """One model of the mixture: where it comes from and where it goes."""

    kind: str  # router | expert
    index: int
    source: Path  # the run's safetensors file
    config: ModelConfig

    @property
    def rel(self) -> str:
        return member_dir(self.kind, self.index)

    @property
    def arch(self) -> Arch:
        return Arch.from_hf(self.config.to_hf())


def members(run: SmallTalkRun) -> list[Member]:
    """Every router then every expert of a finished run (a clear error for an unfinished one)."""
    run.require_routers()
    run.require_experts()
    cfg = run.config
    return ([Member("router", e, run.router_file(e), cfg.router) for e in range(run.experts)]
            + [Member("expert", e, run.expert_file(e), cfg.expert) for e in range(run.experts)])


def choose_tier(models: list[Member], quant: str, max_size: int | None, params: dict | None) -> tuple[str, dict]:
    """The tier of the whole mixture and every tier's predicted total (bytes of all models)."""
    tier, preds = budget_mod.choose_tier({m.rel: m.arch for m in models}, quant, max_size, params)
    return tier, {t: p.total for t, p in preds.items()}


def write_hf_dir(member: Member, tokenizer: Path, out: Path) -> None:
    """A plain HF Llama directory of one router or expert (its weights re-saved with HF metadata)."""
    from soup_train.checkpoint import read_tensors

    out.mkdir(parents=True, exist_ok=True)
    save_file(read_tensors(member.source), str(out / HF_WEIGHTS), metadata={"format": "pt"})
    write_files(out, hf_side_files(member.config, tokenizer, "float32"))


def held_out(run: SmallTalkRun) -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows of every named domain and the expert the PyTorch routers send each to."""
    from soup_train.smalltalk.mixture import test_windows

    if min(run.prefix_len, run.config.expert.max_seq_len) < 4:
        raise ExportInputError(f"parity runs the models on at least 4 tokens; this run's prefix is {run.prefix_len} "
                               "tokens: pass --no-parity")
    try:
        windows, _ = test_windows(run, per_domain=HELD_OUT_PER_DOMAIN)
    except DataError as exc:
        raise ExportInputError(f"{exc.message}; parity needs held-out text (or pass --no-parity)") from None
    return windows, _torch_routes(run, windows)


def _torch_routes(run: SmallTalkRun, windows: np.ndarray) -> np.ndarray:
    from soup_train.smalltalk.routing import prefix_scores, route

    return route(prefix_scores(run.load_routers(), windows, run.prefix_len))


def member_windows(member: Member, windows: np.ndarray, routes: np.ndarray) -> np.ndarray:
    """A router's prefixes, or the windows routed to an expert (all of them if none is), each cut to
    the model's context + 1 tokens (a router: the M + 1 tokens routing reads, M of them as inputs)."""
    if member.kind == "expert" and (routes == member.index).any():
        windows = windows[routes == member.index]
    return windows[:, :member.config.max_seq_len + 1]


def onnx_routes(directory: Path, run: SmallTalkRun, windows: np.ndarray) -> np.ndarray:
    """Route with the exported routers (onnxruntime), the same scoring as training."""
    from soup_export.ort_model import OrtDecoder
    from soup_export.parity import log_softmax, target_log_probs

    span = windows[:, :run.prefix_len + 1]
    x, y = span[:, :-1], span[:, 1:]
    scores = np.empty((len(windows), run.experts))
    for e in range(run.experts):
        logp = log_softmax(OrtDecoder(onnx_dir(directory / member_dir("router", e))).logits(x))
        scores[:, e] = target_log_probs(logp, y).mean(-1)
    return scores.argmax(1)


def export_member(member: Member, root: Path, tier: str, run: SmallTalkRun, spec: ExportSpec,
                  evaluation: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """One router or expert: hf/, onnx/ at the tier, parity, its own manifest; returns its summary."""
    write_hf_dir(member, run.tokenizer, hf_dir(root))
    params = dict(spec.quant_params) if spec.quant != "auto" else {}
    write_tier(hf_dir(root), onnx_dir(root), tier, params, spec.engine, member.arch)
    prediction = budget_mod.predict(member.arch, tier, params or None)
    size = budget_mod.verify(onnx_dir(root), prediction.total, None)
    parity: dict = {"skipped": True}
    if evaluation is not None:
        windows, routes = evaluation
        mine = member_windows(member, windows, routes)
        parity = {"eval_source": f"data:test split, {len(mine)} windows",
                  **dense_parity(hf_dir(root), onnx_dir(root), member.arch, tier, mine, "data", spec.parity_cfg,
                                 spec.engine)}
    if not spec.keep_hf:
        import shutil

        shutil.rmtree(hf_dir(root))
    source = {"run": run.path.name, "file": member.source.relative_to(run.path).as_posix(),
              "sha256": file_sha256(member.source)}
    write_manifest(root, {"kind": f"smalltalk-{member.kind}", "index": member.index, "source": source,
                          "tier": tier, "quantization": prediction_storage(member.arch, tier, params),
                          "size": size, "parity": parity, "spec": spec.to_dict(), "engine": spec.engine.to_dict()})
    return {"kind": member.kind, "index": member.index, "path": member.rel, "source": source,
            "bytes": size["actual"], "predicted": prediction.total, "parity": parity}


def export_mixture(run_path: Path, out: Path, spec: ExportSpec = ExportSpec(), force: bool = False,
                   progress: bool = True) -> dict:
    """Every router and expert of a finished SmallTalk run into one mixture directory; returns its manifest."""
    from tqdm import tqdm

    run = SmallTalkRun.open(run_path)
    check_output_path(out, force)  # before any slow work
    models = members(run)
    tier, totals = choose_tier(models, spec.quant, spec.max_size, dict(spec.quant_params) or None)
    evaluation = held_out(run) if spec.parity else None
    with staged_output(out, force) as tmp:
        rows = [export_member(m, tmp / m.rel, tier, run, spec, evaluation)
                for m in tqdm(models, desc="export", unit="model", disable=not progress)]
        total = sum(r["bytes"] for r in rows)
        if spec.max_size is not None and total > spec.max_size:
            raise BudgetError(f"the written mixture is {human(total)}, over the "
                              f"{human(spec.max_size)} budget; this is a bug in the size prediction")
        routing = _routing_parity(tmp, run, evaluation) if evaluation is not None else {"skipped": True}
        record = {"kind": KIND, "run": run.path.name, "experts": run.experts, "prefix_len": run.prefix_len,
                  "domains": run.domains, "tier": tier, "spec": spec.to_dict(), "models": rows,
                  "size": {"total": total, "budget": spec.max_size,
                           "headroom": None if spec.max_size is None else spec.max_size - total,
                           "predicted_by_tier": totals},
                  "routing_parity": routing, "engine": spec.engine.to_dict()}
        return write_manifest(tmp, record)


def _routing_parity(directory: Path, run: SmallTalkRun, evaluation: tuple[np.ndarray, np.ndarray]) -> dict:
    windows, routes = evaluation
    got = onnx_routes(directory, run, windows)
    agreement = float((got == routes).mean())
    report = {"sequences": int(len(windows)), "agreement": agreement, "min_agreement": MIN_ROUTE_AGREEMENT,
              "shares": np.bincount(got, minlength=run.experts).tolist()}
    if agreement < MIN_ROUTE_AGREEMENT:
        raise ParityError(f"parity (routing) failed: the exported routers send {100 * agreement:.1f}% of "
                          f"{len(windows)} held-out sequences to the same expert as the PyTorch routers "
                          f"(< {100 * MIN_ROUTE_AGREEMENT:.0f}%); choose a higher-precision --quant")
    return report


def summary(m: dict) -> str:
    """A few lines for the CLI: tier, total size against the budget, per-model bytes and parity."""
    human = budget_mod.human
    size = m["size"]
    lines = [f"mixture of {m['experts']} experts ({m['run']}): tier {m['tier']}, {human(size['total'])}"
             + (f", budget {human(size['budget'])}, headroom {human(size['headroom'])}" if size["budget"] else "")
             + f"; prefix {m['prefix_len']} tokens"]
    for r in m["models"]:
        p = r["parity"]
        line = f"  {r['path']:<18} {human(r['bytes']):>10}"
        if not p.get("skipped"):
            b = p["b_torch_vs_onnx"]
            line += f"  (b) {max(b['prefill_max_abs_diff'], b['decode_max_abs_diff']):.2g}"
            if "c_quantized_vs_fp32" in p:
                line += f"  (c) dPPL {100 * p['c_quantized_vs_fp32']['dppl']:+.2f}%"
            line += f"  (d) {p['d_greedy']['tokens']} tokens identical"
        lines.append(line)
    rp = m["routing_parity"]
    if not rp.get("skipped"):
        lines.append(f"  routing: {100 * rp['agreement']:.1f}% of {rp['sequences']} held-out sequences reach "
                     f"the PyTorch routers' expert; shares {rp['shares']}")
    return "\n".join(lines)


def prediction_storage(arch: Arch, tier: str, params: dict) -> dict:
    """The storage plan as applied to this architecture (export.json's `quantization`)."""
    from soup_export.graph import compile_graph
    from soup_export.quantize import make_plan

    return compile_graph(arch, make_plan(tier, params or None))[1].storage()
