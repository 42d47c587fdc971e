"""Stage 3, graph: an ONNX Llama decoder with a KV cache, built straight from the architecture.

No tracing. The graph depends only on (architecture, storage plan): weights live in one external
data file whose layout (names, dtypes, shapes, offsets) is also a function of those two, so a
batch export emits `model.onnx` once and writes only `model.onnx.data` per customer.

I/O (Hugging Face / onnxruntime-genai names):
    input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
    past_key_values.{i}.key|value (B, KV, P, hd) float32
    -> logits (B, S, V) float32, present.{i}.key|value (B, KV, P+S, hd) float32

One decoder layer (x: (B, S, d)), with the residual sums carried by the fused norms:

    (x, branch) ─ SkipRMSNorm ─┬─ h ─ q/k/v proj ─ GroupQueryAttention(RoPE, past, padding bias) ─ o_proj ─ branch'
                               └─ x' = x + branch  (carried to the next SkipRMSNorm)
    (x', branch') ─ SkipRMSNorm ─ h' ─ down_proj(silu(gate_proj(h')) * up_proj(h')) ─ branch''

onnxruntime's fused kernels do the work: com.microsoft SkipSimplifiedLayerNormalization (the
residual add and the RMSNorm in one node; the first norm is emitted as the pattern onnxruntime
fuses into SimplifiedLayerNormalization), GroupQueryAttention, MatMulNBits for the quantized
tiers. Fewer nodes per layer matter on a device: each node is a kernel launch and, with a thread
pool, a synchronisation. RoPE: when head_size is a multiple of 16 it runs inside
GroupQueryAttention, which rotates each new key and query at its cache slot (RoPE is relative,
so a left-padded row, shifted by its padding, gets the same attention as transformers gives it
at its position_ids). Otherwise (the kernel's restriction) a com.microsoft RotaryEmbedding node
rotates q and k at position_ids. Padding reaches the attention as a bias.

The cache can be fed as separate past / present tensors (P and P+S positions) or as one shared
(B, KV, context, head) buffer bound as both, written in place (see runtimes/README.md).
GroupQueryAttention's one restriction: with a past, a batch of more than one row must feed one
new token per step. Prefill, and one token per step after it, is what every runner does.

Mask: key j is visible to query i (absolute position P + i) iff j <= P + i and attention_mask[b, j] = 1;
hidden entries get float32's lowest value (as transformers does). Node names are hierarchical
(`/model/layers.3/mlp/up_proj/MatMul`); constants are deduplicated; opset 21, IR version 10.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from soup_export.layout import DATA_FILE, INPUTS, LOGITS, PAST, PRESENT, Arch
from soup_export.quantize import Plan, Rep, make_plan, nbits_specs

OPSET, IR_VERSION, ALIGN = 21, 10, 64


@dataclass(frozen=True)
class Stored:
    """One initializer in the external data file: which weight it encodes and how."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    weight: str  # HF tensor name, or "@rotary.cos" / "@rotary.sin"
    how: str  # float-linear | float-gather | int8-channel | nbits-linear | nbits-gather | raw
    rep: Rep
    part: str  # key of the encoded dict

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class DecoderGraph:
    """Builds the nodes; `model()` returns the ModelProto and `stored` the external layout."""

    def __init__(self, arch: Arch, plan: Plan) -> None:
        self.arch, self.plan = arch, plan
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[tuple, str] = {}
        self.const_protos: list[TensorProto] = []
        self.stored: list[Stored] = []
        self._offsets: tuple[list[int], int] = ([], 0)  # offsets() of the first n stored tensors
        self.uses_ms = False
        embed_ok = plan.embed.kind != "nbits" or arch.hidden % plan.embed.block == 0
        self.embed_rep = plan.embed if embed_ok else Rep("float", "float16")
        self.lm_rep = self.embed_rep if arch.tie else plan.lm_head
        self.notes = [] if embed_ok else [f"hidden size {arch.hidden} is not a multiple of block {plan.embed.block}: "
                                          "the embedding is stored fp16 (GatherBlockQuantized needs whole blocks)"]
        if arch.tie and self.lm_rep != plan.lm_head:
            self.notes.append(f"tied embeddings: the LM head shares the embedding's storage ({self.lm_rep.describe()})")
        self._build()

    def storage(self) -> dict:
        """The plan as actually applied (fallbacks and tied sharing included), for export.json and manifests."""
        from dataclasses import replace

        used = replace(self.plan, embed=self.embed_rep, lm_head=self.lm_rep).to_dict()
        return {**used, "requested": self.plan.to_dict(), "notes": self.notes}

    # ------------------------------------------------------------------ primitives
    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, outputs: list[str] | None = None,
             domain: str = "", **attrs) -> list[str]:
        """The one choke point that creates nodes."""
        outputs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        self.uses_ms |= domain == "com.microsoft"
        return outputs

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            label = np.array2string(arr.reshape(-1), separator=",", threshold=8).replace(" ", "")
            name = f"/model/constants/{arr.dtype.name}/{list(arr.shape)}/{label}"
            self.consts[key] = name
            self.const_protos.append(numpy_helper.from_array(arr, name))
        return self.consts[key]

    def store(self, name: str, dtype, shape, weight: str, how: str, rep: Rep, part: str = "") -> str:
        self.stored.append(Stored(name, np.dtype(dtype), tuple(int(s) for s in shape), weight, how, rep, part))
        return name

    # ------------------------------------------------------------------ weights as graph values
    def linear(self, x: str, weight: str, out_features: int, in_features: int, prefix: str,
               rep: Rep | None = None, output: str | None = None) -> str:
        """x (..., in) @ W^T for W (out, in) stored per `rep`."""
        rep = rep or self.plan.body
        outs = [output] if output else None
        if rep.kind == "float":
            w = self.store(f"{weight}.T", rep.dtype, (in_features, out_features), weight, "float-linear", rep)
            if rep.dtype != "float32":
                w = self.node("Cast", [w], f"{prefix}/Cast", to=TensorProto.FLOAT)[0]
            return self.node("MatMul", [x, w], f"{prefix}/MatMul", outputs=outs)[0]
        if rep.kind == "int8-channel":
            q = self.store(f"{weight}.T.int8", np.int8, (in_features, out_features), weight, "int8-channel", rep, "q")
            s = self.store(f"{weight}.scale", np.float32, (out_features,), weight, "int8-channel", rep, "scale")
            w = self.node("DequantizeLinear", [q, s], f"{prefix}/DequantizeLinear", axis=1)[0]
            return self.node("MatMul", [x, w], f"{prefix}/MatMul", outputs=outs)[0]
        specs = nbits_specs(out_features, in_features, rep)
        q = self.store(f"{weight}.q{rep.bits}", *specs["q"], weight, "nbits-linear", rep, "q")
        s = self.store(f"{weight}.scales", *specs["scales"], weight, "nbits-linear", rep, "scales")
        zp = self._zero_points(weight, specs, "nbits-linear", rep)
        return self._matmul_nbits(x, [q, s, *zp], out_features, in_features, rep, prefix, outs)

    def _zero_points(self, weight: str, specs: dict, how: str, rep: Rep) -> list[str]:
        """The stored zero points of an asymmetric tensor ([] when symmetric: both ops' default)."""
        if "zero_points" not in specs:
            return []
        return [self.store(f"{weight}.zero_points", *specs["zero_points"], weight, how, rep, "zero_points")]

    def _matmul_nbits(self, x, quantized: list[str], n, k, rep, prefix, outs) -> str:
        """x @ W^T for W stored as [q, scales(, zero_points)]."""
        return self.node("MatMulNBits", [x, *quantized], f"{prefix}/MatMulNBits", outputs=outs, domain="com.microsoft",
                         K=k, N=n, bits=rep.bits, block_size=rep.block, accuracy_level=rep.accuracy_level)[0]

    def embedding(self, ids: str) -> str:
        a, rep, w = self.arch, self.embed_rep, "model.embed_tokens.weight"
        prefix = "/model/embed_tokens"
        if rep.kind == "nbits":
            specs = nbits_specs(a.vocab, a.hidden, rep)
            blob = specs["q"][1][1] * specs["q"][1][2]
            q = self.store(f"{w}.q{rep.bits}", np.uint8, (a.vocab, blob), w, "nbits-gather", rep, "q")
            s = self.store(f"{w}.scales", *specs["scales"], w, "nbits-gather", rep, "scales")
            zp = self._zero_points(w, specs, "nbits-gather", rep)
            self.embed_stored = (q, s, *zp)
            return self.node("GatherBlockQuantized", [q, ids, s, *zp], f"{prefix}/GatherBlockQuantized", domain="com.microsoft",
                             gather_axis=0, quantize_axis=1, block_size=rep.block, bits=rep.bits)[0]
        table = self.store(w, rep.dtype, (a.vocab, a.hidden), w, "float-gather", rep)
        self.embed_stored = (table,)
        x = self.node("Gather", [table, ids], f"{prefix}/Gather")[0]
        return self.node("Cast", [x], f"{prefix}/Cast", to=TensorProto.FLOAT)[0] if rep.dtype != "float32" else x

    def lm_head(self, x: str) -> str:
        a, prefix = self.arch, "/lm_head"
        if not a.tie:
            return self.linear(x, "lm_head.weight", a.vocab, a.hidden, prefix, self.lm_rep, output=LOGITS)
        rep = self.embed_rep  # tied: the head reads the embedding's bytes
        if rep.kind == "nbits":
            q, *rest = self.embed_stored  # scales (and zero points) are laid out alike for both ops
            shape = nbits_specs(a.vocab, a.hidden, rep)["q"][1]
            q3 = self.node("Reshape", [q, self.const(shape)], f"{prefix}/Reshape")[0]
            return self._matmul_nbits(x, [q3, *rest], a.vocab, a.hidden, rep, prefix, [LOGITS])
        w = self.embed_stored[0]
        if rep.dtype != "float32":
            w = self.node("Cast", [w], f"{prefix}/Cast", to=TensorProto.FLOAT)[0]
        wt = self.node("Transpose", [w], f"{prefix}/Transpose", perm=[1, 0])[0]
        return self.node("MatMul", [x, wt], f"{prefix}/MatMul", outputs=[LOGITS])[0]

    # ------------------------------------------------------------------ blocks
    def rms_norm(self, x: str, weight: str, prefix: str) -> str:
        """weight * x / sqrt(mean(x^2) + eps), in fp32 (as transformers' LlamaRMSNorm); emitted in the
        pattern onnxruntime fuses into SimplifiedLayerNormalization (a standard-ops graph stays checker-clean)."""
        w = self.store(weight, np.float32, (self.arch.hidden,), weight, "raw", Rep("float"))
        sq = self.node("Pow", [x, self.const(2.0, np.float32)], f"{prefix}/Pow")[0]
        mean = self.node("ReduceMean", [sq, self.const([-1])], f"{prefix}/ReduceMean", keepdims=1)[0]
        var = self.node("Add", [mean, self.const(self.arch.eps, np.float32)], f"{prefix}/Add")[0]
        std = self.node("Sqrt", [var], f"{prefix}/Sqrt")[0]
        normed = self.node("Div", [x, std], f"{prefix}/Div")[0]
        return self.node("Mul", [normed, w], f"{prefix}/Mul")[0]

    def residual_norm(self, x: str, branch: str, weight: str, prefix: str) -> tuple[str, str]:
        """(RMSNorm(x + branch), x + branch) in one com.microsoft SkipSimplifiedLayerNormalization."""
        w = self.store(weight, np.float32, (self.arch.hidden,), weight, "raw", Rep("float"))
        out = self.node("SkipSimplifiedLayerNormalization", [x, branch, w], f"{prefix}/SkipLayerNorm",
                        outputs=[f"{prefix}/output_0", "", "", f"{prefix}/output_3"], domain="com.microsoft",
                        epsilon=self.arch.eps)
        return out[0], out[3]

    def attention(self, x: str, i: int, rotary: tuple[str, str], bias: str, lengths: tuple[str, str]) -> str:
        """onnxruntime's GroupQueryAttention: one fused kernel for RoPE (when head_size allows: at each
        token's cache slot, see the module docstring; otherwise RotaryEmbedding nodes at position_ids run
        first), QK^T, the padding bias, softmax, V and the cache."""
        a, p = self.arch, f"/model/layers.{i}/self_attn"
        w = f"model.layers.{i}.self_attn"
        q = self.linear(x, f"{w}.q_proj.weight", a.heads * a.head_dim, a.hidden, f"{p}/q_proj")  # (B, S, H*hd)
        k = self.linear(x, f"{w}.k_proj.weight", a.kv_heads * a.head_dim, a.hidden, f"{p}/k_proj")
        v = self.linear(x, f"{w}.v_proj.weight", a.kv_heads * a.head_dim, a.hidden, f"{p}/v_proj")
        fused_rope = a.head_dim % 16 == 0  # the kernel's RoPE needs it; otherwise RoPE is its own node
        if not fused_rope:
            q, k = (self.node("RotaryEmbedding", [t, INPUTS[2], *rotary], f"{p}/{n}_rotary/RotaryEmbedding",
                              domain="com.microsoft", interleaved=0, num_heads=h)[0]
                    for t, n, h in ((q, "q", a.heads), (k, "k", a.kv_heads)))
        seqlens, total = lengths
        rope_inputs = [*rotary, ""] if fused_rope else ["", "", ""]
        y = self.node("GroupQueryAttention",
                      [q, k, v, PAST[0] % i, PAST[1] % i, seqlens, total,
                       *rope_inputs, bias],
                      f"{p}/GroupQueryAttention", outputs=[f"{p}/GroupQueryAttention/output_0", PRESENT[0] % i, PRESENT[1] % i],
                      domain="com.microsoft", num_heads=a.heads, kv_num_heads=a.kv_heads,
                      scale=1.0 / math.sqrt(a.head_dim), do_rotary=int(fused_rope), rotary_interleaved=0)[0]
        return self.linear(y, f"{w}.o_proj.weight", a.hidden, a.heads * a.head_dim, f"{p}/o_proj")

    def mlp(self, x: str, i: int) -> str:
        a, p, w = self.arch, f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
        gate = self.linear(x, f"{w}.gate_proj.weight", a.ff, a.hidden, f"{p}/gate_proj")
        up = self.linear(x, f"{w}.up_proj.weight", a.ff, a.hidden, f"{p}/up_proj")
        act = self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{p}/act_fn/Sigmoid")[0]], f"{p}/act_fn/Mul")[0]
        h = self.node("Mul", [act, up], f"{p}/Mul")[0]
        return self.linear(h, f"{w}.down_proj.weight", a.hidden, a.ff, f"{p}/down_proj")

    def rotary(self) -> tuple[str, str]:
        """The cos / sin caches (max_pos, hd/2) that the RoPE kernels index (by position_ids or cache slot)."""
        shape = (self.arch.max_pos, self.arch.head_dim // 2)
        return tuple(self.store(f"model.rotary_emb.{fn}_cache", np.float32, shape, f"@rotary.{fn}", "raw", Rep("float"))
                     for fn in ("cos", "sin"))

    def lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (B,) = total - 1 for every row (padding is in the bias) and total (scalar), int32."""
        p = "/model/attn_lengths"
        total = self.node("Gather", [self.node("Shape", [INPUTS[1]], f"{p}/Shape")[0], self.const(1)], f"{p}/Gather", axis=0)[0]
        batch = self.node("Gather", [self.node("Shape", [INPUTS[0]], f"{p}/Shape_1")[0], self.const([0])], f"{p}/Gather_1", axis=0)[0]
        last = self.node("Sub", [total, self.const(1)], f"{p}/Sub")[0]
        seqlens = self.node("Expand", [self.node("Reshape", [last, self.const([1])], f"{p}/Reshape")[0], batch], f"{p}/Expand")[0]
        return (self.node("Cast", [seqlens], f"{p}/Cast", to=TensorProto.INT32)[0],
                self.node("Cast", [total], f"{p}/Cast_1", to=TensorProto.INT32)[0])

    def mask_bias(self) -> str:
        """(B, 1, S, T): 0 where visible, float32 lowest where hidden."""
        p = "/model/attn_mask"
        s = self.node("Gather", [self.node("Shape", [INPUTS[0]], f"{p}/Shape")[0], self.const(1)], f"{p}/Gather", axis=0)[0]
        t = self.node("Gather", [self.node("Shape", [INPUTS[1]], f"{p}/Shape_1")[0], self.const(1)], f"{p}/Gather_1", axis=0)[0]
        past = self.node("Sub", [t, s], f"{p}/Sub")[0]
        q_pos = self.node("Unsqueeze", [self.node("Range", [past, t, self.const(1)], f"{p}/Range")[0], self.const([1])], f"{p}/Unsqueeze")[0]
        k_pos = self.node("Unsqueeze", [self.node("Range", [self.const(0), t, self.const(1)], f"{p}/Range_1")[0], self.const([0])], f"{p}/Unsqueeze_1")[0]
        causal = self.node("LessOrEqual", [k_pos, q_pos], f"{p}/LessOrEqual")[0]  # (S, T)
        pad = self.node("Unsqueeze", [INPUTS[1], self.const([1, 2])], f"{p}/Unsqueeze_2")[0]
        pad = self.node("Cast", [pad], f"{p}/Cast", to=TensorProto.BOOL)[0]  # (B, 1, 1, T)
        visible = self.node("And", [causal, pad], f"{p}/And")[0]
        lowest = self.const(np.finfo(np.float32).min, np.float32)
        return self.node("Where", [visible, self.const(0.0, np.float32), lowest], f"{p}/Where")[0]

    def _build(self) -> None:
        a = self.arch
        x = self.embedding(INPUTS[0])
        rotary, lengths = self.rotary(), self.lengths()
        bias = self.mask_bias()
        h = self.rms_norm(x, "model.layers.0.input_layernorm.weight", "/model/layers.0/input_layernorm")
        for i in range(a.layers):
            p = f"/model/layers.{i}"
            h, x = self.residual_norm(x, self.attention(h, i, rotary, bias, lengths),
                                      f"model.layers.{i}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
            last = i == a.layers - 1
            h, x = self.residual_norm(x, self.mlp(h, i), "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight",
                                      "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm")
        self.lm_head(h)

    # ------------------------------------------------------------------ model
    def offsets(self) -> list[int]:
        """Each stored tensor's offset in the data file (computed once per layout: exports ask per tensor)."""
        if self._offsets[1] != len(self.stored):
            out, pos = [], 0
            for s in self.stored:
                pos += -pos % ALIGN
                out.append(pos)
                pos += s.nbytes
            self._offsets = (out, len(self.stored))
        return list(self._offsets[0])

    def data_size(self) -> int:
        offs = self.offsets()
        return offs[-1] + self.stored[-1].nbytes if self.stored else 0

    def model(self, data_file: str = DATA_FILE) -> onnx.ModelProto:
        a = self.arch
        dyn = lambda *dims: dims  # noqa: E731 - readability of shapes below
        inputs = [helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, dyn("batch_size", "sequence_length")),
                  helper.make_tensor_value_info(INPUTS[1], TensorProto.INT64, dyn("batch_size", "total_sequence_length")),
                  helper.make_tensor_value_info(INPUTS[2], TensorProto.INT64, dyn("batch_size", "sequence_length"))]
        outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, dyn("batch_size", "sequence_length", a.vocab))]
        for i in range(a.layers):
            for past, present in zip(PAST, PRESENT):
                inputs.append(helper.make_tensor_value_info(past % i, TensorProto.FLOAT,
                                                            dyn("batch_size", a.kv_heads, "past_sequence_length", a.head_dim)))
                outputs.append(helper.make_tensor_value_info(present % i, TensorProto.FLOAT,
                                                             dyn("batch_size", a.kv_heads, "total_sequence_length", a.head_dim)))
        initializers = [external_tensor(s, off, data_file) for s, off in zip(self.stored, self.offsets())]
        graph = helper.make_graph(self.nodes, "soup_llama_decoder", inputs, outputs, self.const_protos + initializers)
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if self.uses_ms else [])
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="soup-export",
                                  producer_version="1")
        return model


def external_tensor(s: Stored, offset: int, data_file: str) -> TensorProto:
    t = TensorProto(name=s.name, data_type=helper.np_dtype_to_tensor_dtype(s.dtype), dims=list(s.shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(s.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


@functools.lru_cache(maxsize=16)
def rotary_table(arch: Arch, fn: str) -> np.ndarray:
    """cos or sin of position * inv_freq, (max_pos, head_dim / 2), computed as transformers does (fp32).
    Cached per architecture (read-only): every export of a process writes the same table, and
    computing it is a noticeable part of a single build (measured: docs/internals.md)."""
    import torch

    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim))
    freqs = torch.arange(arch.max_pos).float()[:, None] * inv_freq[None, :]
    table = (freqs.cos() if fn == "cos" else freqs.sin()).numpy().astype(np.float32)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=32)
def _compiled(arch: Arch, tier: str, params: tuple) -> tuple[bytes, DecoderGraph]:
    g = DecoderGraph(arch, make_plan(tier, dict(params)))
    return g.model().SerializeToString(deterministic=True), g


def compile_graph(arch: Arch, plan: Plan) -> tuple[bytes, DecoderGraph]:
    """The serialized graph (deterministic) and its builder (for the data layout).

    Cached per (architecture, plan), the process's one graph cache: the graph depends on nothing
    else, so a batch, the budget's predictions, parity's fp32 reference and the export itself
    build it once."""
    return _compiled(arch, plan.tier, tuple(sorted(plan.params.items())))


def weight_order(g: DecoderGraph) -> list[str]:
    """Dense weights in the order the graph stores them (each once; rotary tables included, as
    "@rotary.cos" / "@rotary.sin")."""
    return list(dict.fromkeys(s.weight for s in g.stored))
