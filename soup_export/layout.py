"""The export format, owned here: every path and file of an export directory, and how each is
written and read. Everything else asks this module; the device runtime keeps its own torch-free
copy of the contract (`runtimes/python/soup_run/contract.py`), and a test checks the two agree.

An export directory (`soup-export build`; one per customer of a `batch`, beside `batch.json`):

    manifest.json   what was built, from what, how (spec, engine), how well (parity), how the mix
                    was chosen on the customer's held-out text (`mix_choice`, with --from-texts or
                    --eval-texts), and the SHA-256 and bytes of every file below (paths relative to
                    the directory)
    onnx/           the shippable specialist
        model.onnx          the graph (the same bytes for every customer of an architecture and tier)
        model.onnx.data     every weight, 64-byte aligned, in the graph's storage order
        genai_config.json   onnxruntime-genai's config (I/O names, shapes, token ids)
        export.json         the tier and the storage plan as applied
        config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
        special_tokens_map.json   as transformers and optimum read them
        soup_spec.json      the mix, alpha, the checkpoint's SHA-256 and the dtype
        model.ort           onnxruntime mobile's format (with --ort-format)
    hf/             the resolved dense model, a Hugging Face Llama directory (unless --no-hf):
                    model.safetensors and the same side files and spec

The decoder's I/O (`io_names`): input_ids (B, S), attention_mask (B, P+S), position_ids (B, S)
int64, past_key_values.{i}.key|value (B, KV, P, head) -> logits (B, S, V), present.{i}.key|value
(B, KV, P+S, head), float32. A SmallTalk mixture holds one export directory per model
(`member_dir`) and a manifest of kind "smalltalk-mixture".
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from soup_export.cache import cached_json, file_sha256, user_cache
from soup_export.errors import ExportInputError
from soup_export.files import read_json
from soup_export.meter import section

if TYPE_CHECKING:
    from soup_train.config import ModelConfig

FORMAT = "soup-export-v1"
MANIFEST = "manifest.json"
MIX_CHOICE = "mix_choice"  # the manifest's record of how the mix was chosen (`choose_mix`): candidates, gain, cost
BATCH_FILE = "batch.json"
ONNX_DIR, HF_DIR = "onnx", "hf"
MODEL_FILE, DATA_FILE, ORT_FILE = "model.onnx", "model.onnx.data", "model.ort"
GENAI_CONFIG, EXPORT_FILE, SPEC_FILE = "genai_config.json", "export.json", "soup_spec.json"
HF_WEIGHTS, HF_CONFIG, GENERATION_CONFIG = "model.safetensors", "config.json", "generation_config.json"
TOKENIZER = "tokenizer.json"
SIDE_FILES = (HF_CONFIG, GENERATION_CONFIG, TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", SPEC_FILE)
MIXTURE_KIND = "smalltalk-mixture"

INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"
PAST = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT = "present.%d.key", "present.%d.value"


def io_names(layers: int) -> dict[str, list[str]]:
    """The decoder's input and output names, in graph order."""
    return {"inputs": [*INPUTS, *(p % i for i in range(layers) for p in PAST)],
            "outputs": [LOGITS, *(p % i for i in range(layers) for p in PRESENT)]}


def decoder_feeds(ids, mask, positions, past: list) -> dict:
    """The decoder's inputs by name; `past`: 2 x layers arrays, each layer's key then value."""
    feeds = dict(zip(INPUTS, (ids, mask, positions)))
    for i in range(len(past) // 2):
        feeds[PAST[0] % i], feeds[PAST[1] % i] = past[2 * i], past[2 * i + 1]
    return feeds


def onnx_dir(root: Path) -> Path:
    return Path(root) / ONNX_DIR


def hf_dir(root: Path) -> Path:
    return Path(root) / HF_DIR


def member_dir(kind: str, index: int) -> str:
    """A SmallTalk mixture's directory of one model, relative to the mixture: routers/router_00, ..."""
    return f"{kind}s/{kind}_{index:02d}"


# ---------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class Arch:
    """The decoder's shape, read from an HF Llama config.json."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    max_pos: int
    rope_theta: float
    eps: float
    tie: bool

    @classmethod
    def from_hf(cls, c: dict) -> "Arch":
        heads = c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads,
                   c["intermediate_size"], c["max_position_embeddings"], float(c.get("rope_theta", 10000.0)),
                   float(c["rms_norm_eps"]), bool(c.get("tie_word_embeddings", False)))



def read_arch(directory: Path) -> tuple[Arch, dict]:
    """The architecture (and the whole config) of an HF or ONNX specialist directory."""
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        raise ExportInputError(f"{directory} has no {HF_CONFIG}; pass a directory written by `soup-export resolve` "
                               "or `soup-export graph`")
    config = read_json(path)
    if config.get("model_type") != "llama":
        raise ExportInputError(f"{path}: model_type {config.get('model_type')!r}, expected 'llama'")
    return Arch.from_hf(config), config


# ---------------------------------------------------------------------------- small files
def json_bytes(data: dict) -> bytes:
    """The bytes of a JSON file as export writes them (indented, a final newline)."""
    return (json.dumps(data, indent=2) + "\n").encode()


def write_files(out: Path, files: dict[str, bytes]) -> None:
    """Each {name: bytes} as out/name."""
    for name, data in files.items():
        (Path(out) / name).write_bytes(data)


def spec_bytes(mix, alpha, checkpoint: dict, dtype: str) -> bytes:
    """The SPEC_FILE of a resolved mix: its weights, alpha, the checkpoint (`bank.checkpoint_ref`), the dtype."""
    return json_bytes({"mix": mix.to_dict(), "alpha": [float(a) for a in alpha], "checkpoint": checkpoint,
                       "dtype": dtype})


def read_spec(directory: Path) -> dict:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise ExportInputError(f"{directory} is not a resolved specialist (no {SPEC_FILE}); "
                               "create one with `soup-export resolve CKPT --mix ... --out DIR`")
    return read_json(path)


def spec_mix(spec: dict):
    """The Mix a SPEC_FILE records."""
    from soup_export.mix import Mix

    m = spec["mix"]
    return Mix(tuple(m["weights"]), tuple(m["weights"].values()), m["given"], m["normalised"], m["source"], m["name"])


def runtime_files(arch: Arch, tier: str, storage: dict, generation: dict) -> dict[str, bytes]:
    """The bytes of genai_config.json and export.json of an ONNX specialist."""
    return {GENAI_CONFIG: json_bytes(genai_config(arch, generation)),
            EXPORT_FILE: json_bytes({"tier": tier, "quantization": storage})}


def read_tier(directory: Path) -> str:
    path = Path(directory) / EXPORT_FILE
    if not path.is_file() or not (Path(directory) / MODEL_FILE).is_file():
        raise ExportInputError(f"{directory} is not an ONNX specialist directory (no {MODEL_FILE} or {EXPORT_FILE}); "
                               "create one with `soup-export graph` or `soup-export quantize`")
    tier = read_json(path).get("tier")
    if tier is None:
        raise ExportInputError(f"{path} names no tier; rebuild the directory")
    return tier


def side_files_of(src: Path) -> dict[str, bytes]:
    """The side files (model config, tokenizer, soup spec) that `src` holds, by name."""
    return {name: (Path(src) / name).read_bytes() for name in SIDE_FILES if (Path(src) / name).is_file()}


def genai_config(arch: Arch, gen: dict) -> dict:
    """onnxruntime-genai's config for this hand-built decoder (KV names, no shared past/present
    buffer); `gen`: the generation config (token ids)."""
    eos = gen.get("eos_token_id", 0)
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", eos), "context_length": arch.max_pos,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": arch.head_dim, "hidden_size": arch.hidden,
                "inputs": {"input_ids": INPUTS[0], "attention_mask": INPUTS[1], "position_ids": INPUTS[2],
                           "past_key_names": PAST[0], "past_value_names": PAST[1]},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
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


# ---------------------------------------------------------------------------- HF side files
def hf_side_files(model: ModelConfig, tokenizer: Path, dtype: str) -> dict[str, bytes]:
    """The bytes of config.json, generation_config.json and the tokenizer files of an HF Llama
    directory, by name.

    The tokenizer files are made directly (tokenizer.json as it is, its config generated) rather
    than by loading and re-saving a transformers tokenizer: same files, a fraction of the time.
    """
    from soup_train.data.tokenizer import EOS

    tokenizer_bytes = Path(tokenizer).read_bytes()
    eos = next(t["id"] for t in added_tokens(tokenizer_bytes.decode()) if t["content"] == EOS)
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    token = {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    tok_cfg = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "model_input_names": ["input_ids", "attention_mask"], "model_max_length": model.max_seq_len,
               "added_tokens_decoder": {str(eos): token}}
    return {**hf_config_files(model, eos, dtype),
            "tokenizer.json": tokenizer_bytes,
            "tokenizer_config.json": json_bytes(tok_cfg),
            "special_tokens_map.json": json_bytes(special)}


def hf_config_files(model: ModelConfig, eos: int, dtype: str) -> dict[str, bytes]:
    """config.json and generation_config.json as transformers writes them (its LlamaConfig and
    GenerationConfig), cached in the user cache by their inputs and transformers' version: importing
    transformers costs seconds, which an export command that needs nothing else from it does not
    pay (measured: docs/internals.md)."""
    inputs = json.loads(json.dumps({"model": model.to_hf(), "eos": eos, "dtype": dtype,
                                    "transformers": library_version("transformers")}))
    name = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    files = cached_json(user_cache("hf-configs") / f"{name}.json", inputs,
                        lambda: {k: v.decode() for k, v in _hf_config_files(model, eos, dtype).items()},
                        lambda value: isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))
    return {k: v.encode() for k, v in files.items()}


def _hf_config_files(model: ModelConfig, eos: int, dtype: str) -> dict[str, bytes]:
    from transformers import GenerationConfig, LlamaConfig

    cfg = LlamaConfig(**model.to_hf(), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                      torch_dtype=dtype, architectures=["LlamaForCausalLM"])
    gen = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False,
                           max_length=model.max_seq_len)
    return {"config.json": cfg.to_json_string().encode(),  # what to_json_file writes
            "generation_config.json": gen.to_json_string().encode()}


_ADDED_TOKENS = re.compile(r'"added_tokens"\s*:\s*\[')


def added_tokens(tokenizer_json: str) -> list[dict]:
    """The `added_tokens` array of a tokenizer.json, decoded alone: parsing the whole file (half a
    MB of vocabulary and merges at 8k tokens) would be most of the side files' cost (measured:
    docs/internals.md). Falls back to the full parse when the array is not where a JSON key can be."""
    match = _ADDED_TOKENS.search(tokenizer_json)
    if match:
        try:
            added, _ = json.JSONDecoder().raw_decode(tokenizer_json, match.end() - 1)
            if isinstance(added, list) and all(isinstance(t, dict) and "content" in t and "id" in t for t in added):
                return added
        except ValueError:
            pass
    return json.loads(tokenizer_json).get("added_tokens", [])




# ---------------------------------------------------------------------------- manifest
@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{lib: library_version(lib) for lib in LIBRARIES}}


LIBRARIES = ("soup", "torch", "transformers", "tokenizers", "safetensors", "onnx", "onnxruntime",
             "onnxruntime-genai", "numpy")


@functools.lru_cache(maxsize=None)
def library_version(lib: str) -> str:
    """An installed distribution's version ("not installed" if absent), looked up once per process:
    each lookup parses the package's metadata (about 0.5 ms)."""
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "not installed"


def file_table(root: Path, known: dict[str, tuple[str, int]] | None = None) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under root except root's own manifest
    (a mixture's table covers the manifests of its models). `known`: {relative path: (sha256,
    bytes)} of files hashed as they were written; each is used only if the file still has that size."""
    known = known or {}
    table = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p != Path(root) / MANIFEST:
            rel, size = p.relative_to(root).as_posix(), p.stat().st_size
            sha = known[rel][0] if rel in known and known[rel][1] == size else file_sha256(p)
            table[rel] = {"sha256": sha, "bytes": size}
    return table


def write_manifest(root: Path, record: dict, known: dict[str, tuple[str, int]] | None = None) -> dict:
    """Write root/manifest.json (the record, the file table, the library versions); returns it as
    JSON reads it back."""
    with section("manifest"):
        data = {"format": FORMAT, **record, "files": file_table(root, known), "versions": dict(versions())}
        text = json.dumps(data, indent=2) + "\n"
        (Path(root) / MANIFEST).write_text(text)
        return json.loads(text)


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ExportInputError(f"{root} has no {MANIFEST}; pass a directory written by `soup-export build` "
                               "(or one customer's directory of a `soup-export batch`)")
    data = read_json(path)
    if data.get("format") != FORMAT:
        raise ExportInputError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def verify_files(root: Path, manifest: dict | None = None) -> int:
    """Every file the manifest lists, checked against its size and SHA-256 (an ExportInputError
    naming the first that differs or is missing); returns how many were checked."""
    manifest = manifest if manifest is not None else read_manifest(root)
    files = manifest.get("files", {})
    for rel, entry in files.items():
        path = Path(root) / rel
        if not path.is_file():
            raise ExportInputError(f"{path} is listed in {Path(root) / MANIFEST} but missing; copy the whole export "
                                   "again or rebuild it")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise ExportInputError(f"{path} does not match {Path(root) / MANIFEST} (its SHA-256 or size changed after "
                                   "the export was written); copy the export again or rebuild it")
    return len(files)
