"""Stage 6, parity: four staged checks, each a hard error with its numbers.

(a) soup at h vs the fused dense PyTorch model (transformers): max|d logits| <= soup_tol (1e-5)
(b) dense PyTorch vs ONNX fp32 in onnxruntime: prefill of a left-padded batch of 2, then two
    decode steps with the KV cache: max|d logits| over real tokens <= onnx_tol (1e-4)
(c) quantized ONNX vs ONNX fp32 on held-out text of the customer's mix (or their own texts):
    perplexity change, mean KL(fp32 || quantized) per token, top-1 agreement; the tier's dPPL
    threshold is enforced (quantized logits legitimately differ by O(1) in max-abs, so they are
    judged by NLL, KL and top-1, never by a logit tolerance)
(d) greedy generation of `greedy_tokens` tokens: ONNX fp32 identical to transformers' generate.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from soup_export.errors import ParityError

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@dataclass(frozen=True)
class ParityConfig:
    soup_tol: float = 1e-5  # (a) max |d logits|, soup vs fused dense
    onnx_tol: float = 1e-4  # (b) max |d logits|, PyTorch vs ONNX fp32
    fp16_dppl: float = 0.005  # (c) max relative perplexity change per tier
    int8_dppl: float = 0.01
    mixed_dppl: float = 0.05
    int4_dppl: float = 0.05
    eval_windows: int = 16  # (c) held-out windows
    window: int = 128  # (c) tokens per window (capped by the model's context)
    greedy_tokens: int = 32  # (d)

    def max_dppl(self, tier: str) -> float:
        return getattr(self, f"{tier}_dppl", 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def _fail(stage: str, message: str) -> None:
    raise ParityError(f"parity ({stage}) failed: {message}")


def soup_vs_dense(bank, h: np.ndarray, hf_dir: Path, ids: np.ndarray, tol: float) -> dict:
    """(a) The soup's own forward at h (`Bank.soup_logits`: `combine` on the mapped bank, one layer
    at a time, never the whole soup) against the resolved HF model in transformers."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    x = torch.as_tensor(ids, dtype=torch.long)
    dense = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        reference = dense(x).logits
    del dense  # the soup's layers come next: one model in memory at a time
    diff = (bank.soup_logits(h, x) - reference).abs().max().item()
    if not diff <= tol:
        _fail("a", f"soup at h vs fused dense model: max|d logits| = {diff:.3g} > {tol:g}")
    return {"max_abs_logit_diff": diff, "tolerance": tol, "tokens": int(x.numel()), "streamed": True}


def torch_vs_onnx(hf_dir: Path, onnx_dir: Path, ids: np.ndarray, tol: float) -> dict:
    """(b) transformers vs ONNX fp32: padded prefill, then decode with the cache."""
    from transformers import AutoModelForCausalLM

    from soup_export.ort_model import OrtDecoder

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, use_safetensors=True).eval()
    ort = OrtDecoder(onnx_dir)
    ids = np.resize(ids, (2, ids.shape[1]))  # two rows even from one window
    n = min(12, ids.shape[1] - 2, ort.arch.max_pos - 2)  # prefill length: 2 decode steps must fit the context
    if n < 2:
        _fail("b", f"needs at least 4 tokens and a context of 4; got {ids.shape[1]} tokens, context {ort.arch.max_pos}")
    pad = min(3, n - 1)
    x = torch.as_tensor(ids[:2, :n], dtype=torch.long)
    mask = torch.ones_like(x)
    mask[1, :pad] = 0  # left padding on the second row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, past = ort.forward(x.numpy(), mask.numpy(), pos.numpy())
    real = mask.bool().numpy()
    prefill = float(np.abs(logits - ref.logits.numpy())[real].max())
    decode, cache, ort_past = 0.0, ref.past_key_values, past
    for step in range(2):  # two decode steps of one token each, with the cache, on the padded batch
        nxt = torch.as_tensor(ids[:2, n + step:n + step + 1], dtype=torch.long)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        with torch.no_grad():
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits_step, ort_past = ort.forward(nxt.numpy(), mask.numpy(), pos.numpy(), ort_past)
        decode = max(decode, float(np.abs(logits_step - out.logits.numpy()).max()))
    if not max(prefill, decode) <= tol:
        _fail("b", f"PyTorch vs ONNX fp32: prefill max|d| = {prefill:.3g}, decode {decode:.3g} > {tol:g}")
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "tolerance": tol,
            "batch": 2, "prefill": n, "left_padding": pad}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def target_log_probs(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logp (..., S, V), targets (..., S) -> (..., S): the log-probability of every next token."""
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def quantized_vs_fp32(fp32_dir: Path, quant_dir: Path, tier: str, windows: np.ndarray, max_dppl: float) -> dict:
    """(c) dPPL, mean KL and top-1 agreement of the quantized model against fp32."""
    from soup_export.ort_model import OrtDecoder

    ref, q = OrtDecoder(fp32_dir), OrtDecoder(quant_dir)
    nll_f, nll_q, kl, agree, n = 0.0, 0.0, 0.0, 0, 0
    for row in windows:
        x, y = row[None, :-1], row[1:]
        lf, lq = log_softmax(ref.logits(x)[0]), log_softmax(q.logits(x)[0])
        nll_f -= target_log_probs(lf, y).sum()
        nll_q -= target_log_probs(lq, y).sum()
        kl += (np.exp(lf) * (lf - lq)).sum()
        agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        n += len(y)
    ppl_f, ppl_q = float(np.exp(nll_f / n)), float(np.exp(nll_q / n))
    report = {"tier": tier, "tokens": n, "ppl_fp32": ppl_f, "ppl_quantized": ppl_q,
              "dppl": ppl_q / ppl_f - 1.0, "mean_kl": float(kl / n), "top1_agreement": agree / n,
              "max_dppl": max_dppl}
    if not report["dppl"] <= max_dppl:
        _fail("c", f"{tier} perplexity {ppl_q:.4f} vs fp32 {ppl_f:.4f}: dPPL {100 * report['dppl']:+.2f}% > "
                   f"{100 * max_dppl:.2f}% (mean KL {report['mean_kl']:.4f}, top-1 {report['top1_agreement']:.3f}); "
                   "choose a higher-precision tier or raise the threshold")
    return report


def greedy_match(hf_dir: Path, onnx_dir: Path, prompt: list[int], new_tokens: int) -> dict:
    """(d) Greedy tokens of ONNX fp32 vs transformers' generate (no early stop at EOS)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from soup_export.ort_model import OrtDecoder

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, use_safetensors=True).eval()
    ort = OrtDecoder(onnx_dir)
    new_tokens = min(new_tokens, ort.arch.max_pos - len(prompt))
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=gen)[0, len(prompt):].tolist()
    got = ort.greedy(prompt, new_tokens)
    if got != ref:
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        _fail("d", f"ONNX greedy tokens differ from PyTorch at position {first} of {new_tokens}")
    return {"tokens": new_tokens, "identical": True, "distinct_tokens": len(set(got)), "generated": got}


def greedy_agreement(fp32_dir: Path, quant_dir: Path, prompt: list[int], new_tokens: int) -> dict:
    """Informational: how long the quantized model's greedy output follows fp32's."""
    from soup_export.ort_model import OrtDecoder

    a = OrtDecoder(fp32_dir).greedy(prompt, new_tokens)
    b = OrtDecoder(quant_dir).greedy(prompt, new_tokens)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"common_prefix": same, "tokens": len(b), "distinct_tokens": len(set(b))}
