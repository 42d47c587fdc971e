"""Write and read ONNX specialist directories (the graph and quantize stages' files).

An ONNX directory holds `model.onnx` (graph only), `model.onnx.data` (every weight),
`genai_config.json` (onnxruntime-genai), `export.json` (tier and quantization plan), `config.json` + tokenizer files (optimum's
ORTModelForCausalLM, transformers' tokenizer), `generation_config.json` and `soup_spec.json`.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from soup_export.errors import ExportInputError
from soup_export.files import read_json
from soup_export.graph import DATA_FILE, Arch, DecoderGraph, encode
from soup_export.quantize import Plan
from soup_export.resolve import SPEC_FILE, json_bytes, write_files

MODEL_FILE = "model.onnx"
EXPORT_FILE = "export.json"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", SPEC_FILE)


def read_arch(directory: Path) -> tuple[Arch, dict]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ExportInputError(f"{directory} has no config.json; pass a directory written by `soup-export resolve` "
                               "or `soup-export graph`")
    config = read_json(path)
    if config.get("model_type") != "llama":
        raise ExportInputError(f"{path}: model_type {config.get('model_type')!r}, expected 'llama'")
    return Arch.from_hf(config), config


def graph_bytes(arch: Arch, plan: Plan) -> tuple[bytes, DecoderGraph]:
    """The serialized graph (deterministic) and its builder (for the data layout).

    Cached per (architecture, plan): the graph depends on nothing else, so a batch, the budget's
    predictions and the export itself build it once."""
    return _graph_cached(arch, plan.tier, tuple(sorted(plan.params.items())))


@functools.lru_cache(maxsize=32)
def _graph_cached(arch: Arch, tier: str, params: tuple) -> tuple[bytes, DecoderGraph]:
    from soup_export.quantize import make_plan

    g = DecoderGraph(arch, make_plan(tier, dict(params)))
    return g.model().SerializeToString(deterministic=True), g


def write_data(path: Path, g: DecoderGraph, weight: Callable[[str], np.ndarray]) -> int:
    """Stream every stored array into the external data file at its offset; returns bytes written."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        for (s, arr), offset in zip(encode(g.stored, weight, g.arch), g.offsets()):
            fh.write(b"\0" * (offset - fh.tell()))
            fh.write(np.ascontiguousarray(arr).tobytes())
        size = fh.tell()
    tmp.replace(path)
    return size


def write_onnx_dir(out: Path, model_bytes: bytes, g: DecoderGraph, weight: Callable[[str], np.ndarray],
                   side_dir: Path) -> None:
    """model.onnx, model.onnx.data, the side files copied from `side_dir`, and genai_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model_bytes)
    write_data(out / DATA_FILE, g, weight)
    copy_side_files(side_dir, out)
    write_runtime_configs(out, g)


def write_runtime_configs(out: Path, g: DecoderGraph) -> None:
    """genai_config.json (onnxruntime-genai) and export.json (tier and storage as applied)."""
    gen = read_json(out / "generation_config.json") if (out / "generation_config.json").is_file() else {}
    write_files(out, runtime_configs(g, gen))


def runtime_configs(g: DecoderGraph, generation: dict) -> dict[str, bytes]:
    """The bytes of genai_config.json and export.json for this graph and generation config."""
    return {"genai_config.json": json_bytes(genai_config(g.arch, generation)),
            EXPORT_FILE: json_bytes({"tier": g.plan.tier, "quantization": g.storage()})}


def read_tier(onnx_dir: Path) -> str:
    path = Path(onnx_dir) / EXPORT_FILE
    if not path.is_file() or not (Path(onnx_dir) / MODEL_FILE).is_file():
        raise ExportInputError(f"{onnx_dir} is not an ONNX specialist directory (no {MODEL_FILE} or {EXPORT_FILE}); "
                               "create one with `soup-export graph` or `soup-export quantize`")
    tier = read_json(path).get("tier")
    if tier is None:
        raise ExportInputError(f"{path} names no tier; rebuild the directory")
    return tier


def copy_side_files(src: Path, out: Path) -> None:
    """The side files (model config, tokenizer, soup spec) that `src` holds, into `out`."""
    if Path(src).resolve() != Path(out).resolve():
        write_files(out, {name: (src / name).read_bytes() for name in SIDE_FILES if (src / name).is_file()})


def genai_config(arch: Arch, gen: dict) -> dict:
    """onnxruntime-genai's config for this hand-built decoder (KV names, no shared past/present
    buffer); `gen`: the generation config (token ids)."""
    eos = gen.get("eos_token_id", 0)
    config = {
        "model": {
            "bos_token_id": gen.get("bos_token_id", eos), "context_length": arch.max_pos,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": arch.head_dim, "hidden_size": arch.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": arch.heads, "num_hidden_layers": arch.layers,
                "num_key_value_heads": arch.kv_heads,
            },
            "eos_token_id": eos, "pad_token_id": gen.get("pad_token_id", eos), "type": "llama",
            "vocab_size": arch.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": arch.max_pos, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    return config


def dense_weights(directory: Path) -> Callable[[str], np.ndarray]:
    """fp32 HF-layout weights by name, from an HF directory (safetensors) or an fp32 ONNX directory."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        from safetensors import safe_open

        handle = safe_open(str(directory / "model.safetensors"), framework="np")
        return lambda name: handle.get_tensor(name).astype(np.float32)
    if (directory / MODEL_FILE).is_file():
        return _onnx_fp32_weights(directory)
    raise ExportInputError(f"{directory} holds neither model.safetensors nor {MODEL_FILE}; pass a resolved or "
                           "fp32 ONNX specialist directory")


def _onnx_fp32_weights(directory: Path) -> Callable[[str], np.ndarray]:
    if not (directory / DATA_FILE).is_file():
        raise ExportInputError(f"{directory} has {MODEL_FILE} but no {DATA_FILE}; copy the whole directory")
    try:
        model = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise ExportInputError(f"{directory / MODEL_FILE} is not a readable ONNX model ({exc})") from None
    data = np.memmap(directory / DATA_FILE, dtype=np.uint8, mode="r")
    tensors = {}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if not info:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if dtype != np.float32:
            raise ExportInputError(f"{directory} is not an fp32 ONNX specialist ({t.name} is {dtype}); "
                                   "quantize from the fp32 export or from the resolved HF directory")
        off, n = int(info.get("offset", 0)), int(info["length"])
        arr = np.frombuffer(data[off:off + n], dtype=np.float32).reshape(tuple(t.dims))
        if t.name.endswith(".T"):
            tensors[t.name[:-2]] = arr.T
        else:
            tensors[t.name] = arr
    return lambda name: np.ascontiguousarray(tensors[name])
