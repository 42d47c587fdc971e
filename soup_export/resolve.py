"""Stage 2, resolve: Theta(h) = S + sum_j alpha_j E_j as a standard Hugging Face Llama directory.

alpha = coefficient MLP(h); then, tensor by tensor, the shared tensor and its expert bank are
read from the memory-mapped checkpoint, fused in fp32 with `soup_math.combine` (the one
definition of the soup math), cast to the output dtype and streamed into `model.safetensors`.
Peak memory is about one tensor times (n + 1), never the model.

`resolve_batch` is tensor-major: each bank tensor is read once and written for every mix.
Output (`resolve`): config.json, model.safetensors, generation_config.json, tokenizer files,
and soup_spec.json (mix, alpha, checkpoint hash) so the directory says what made it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import re
import struct
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from soup_export.errors import ExportInputError
from soup_export.files import file_sha256, read_json
from soup_export.mix import Mix
from soup_train.stream import SafetensorsWriter
from soup_train.checkpoint import CHECKSUMS, CheckpointInfo, read_info, recorded_checksum, resolve_checkpoint
from soup_train.config import ModelConfig, SoupConfig
from soup_train.errors import CheckpointError
from soup_train.model.soup import CoefficientMLP
from soup_train.model.soup_math import COEF_PREFIX, EXPERTS_PREFIX, SHARED_PREFIX, combine_many, expert_keys, instantiate

T = TypeVar("T")
log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPEC_FILE = "soup_spec.json"


@dataclass(frozen=True)
class Bank:
    """A checkpoint opened for fusion: its info, path, hash and dense tensor shapes."""

    path: Path
    info: CheckpointInfo
    sha256: str
    shapes: dict[str, tuple[int, ...]]  # dense name -> shape, in checkpoint order

    @classmethod
    def open(cls, path: Path, verify: bool = False) -> "Bank":
        """The checkpoint (or a run's latest) at `path`, its completeness checked (nothing read but
        headers). Its SHA-256 is the one recorded when it was written; `verify` hashes the weights and
        compares (a full read of the bank). A checkpoint with no record is hashed once (cached)."""
        ckpt = resolve_checkpoint(Path(path))
        info = read_info(ckpt)
        weights = ckpt / "model.safetensors"
        header = safetensors_header(weights)[0]
        other = sorted({e["dtype"] for e in header.values()} - set(BANK_DTYPES))
        if other:
            raise CheckpointError(f"{weights} holds {', '.join(other)} tensors; export reads fp32, bf16 and fp16 "
                                  "checkpoints: convert it to one of those")
        stored = {k: tuple(entry["shape"]) for k, entry in header.items()}
        check_complete(ckpt, info, stored)
        if not (ckpt / "tokenizer.json").is_file():
            raise CheckpointError(f"{ckpt} has no tokenizer.json; the checkpoint is incomplete: copy it again")
        shapes = {k[len(SHARED_PREFIX):]: s for k, s in stored.items() if k.startswith(SHARED_PREFIX)}
        return cls(ckpt, info, weights_sha256(weights, verify), shapes)

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    def alpha(self, h: np.ndarray) -> torch.Tensor:
        """alpha = w(h) with the checkpoint's coefficient MLP (fp32)."""
        with torch.no_grad():
            return self.coefficient_mlp(torch.as_tensor(h, dtype=torch.float32)).float()

    @cached_property
    def coefficient_mlp(self) -> CoefficientMLP:
        """The checkpoint's coefficient MLP, read once per opened bank (a batch asks it for every mix)."""
        mlp = CoefficientMLP(len(self.info.domains), self.info.run.soup)
        mapped = self.map()
        mlp.load_state_dict({k[len(COEF_PREFIX):]: mapped[k] for k in mapped.header if k.startswith(COEF_PREFIX)})
        return mlp.eval()

    def tensors(self, names: list[str] | None = None, progress: bool = False,
                mapped: "MappedSafetensors | None" = None) -> Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Tensor-major: (dense name, shared tensor in fp32, its expert tensors as stored) as views of
        the memory-mapped checkpoint (no copy; a 16-bit shared tensor is converted, one tensor), one
        tensor at a time, in checkpoint order or the order of `names`; through `mapped` (a map of this
        bank's weights) or a new map. A 16-bit bank stays 16-bit: `combine` converts it a block at a
        time (a 128-expert embedding bank is 12.6 GB in fp32)."""
        tensors = self.map() if mapped is None else mapped
        names = list(self.shapes) if names is None else names
        for i, name in enumerate(tqdm(names, desc="fuse", unit="tensor", disable=not progress, leave=False)):
            tensors.prefetch([self.keys(n) for n in names[i:i + 2]])  # the disk reads ahead while this one is fused
            shared, *experts = (tensors[k] for k in self.keys(name))
            yield name, _fp32(shared), tuple(experts)

    def skeleton(self):
        """The instantiated model's modules on the meta device (structure only, nothing allocated)."""
        from soup_train.model.soup import meta_soup

        run = self.info.run
        return meta_soup(run.model, run.soup, len(self.info.domains)).shared

    def instantiate(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Theta at coefficients alpha as a dense state dict (tied head once), by `combine` tensor by
        tensor in one pass over the mapped bank: the specialist's size in memory, never the soup's."""
        return instantiate(self.tensors(), alpha)

    def soup_logits(self, h: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
        """The soup's own forward at h, logits (B, T, vocab), holding one layer of Theta(h) at a time:
        each part of the model is instantiated from the mapped bank with `combine` (the function
        training's `SoupModel.instantiate` uses) when it runs, and dropped after (the tied embedding
        is kept for the head). Works for banks larger than memory; the result is `SoupModel.forward`'s."""
        from soup_train.model.llama import forward_by_parts

        run = self.info.run
        skeleton = self.skeleton()
        alpha, mapped, kept = self.alpha(h), self.map(), {}

        def weights(prefix: str) -> dict[str, torch.Tensor]:
            if prefix == "lm_head" and run.model.tie_embeddings:
                return kept.pop("weight")
            names = [n for n in self.shapes if n.startswith(prefix + ".")]
            part = {n[len(prefix) + 1:]: t for n, t in instantiate(self.tensors(names, mapped=mapped), alpha).items()}
            if prefix == "model.embed_tokens" and run.model.tie_embeddings:
                kept["weight"] = part
            return part

        with torch.no_grad():
            return forward_by_parts(skeleton, weights, input_ids)

    def keys(self, name: str) -> list[str]:
        """The checkpoint keys that dense tensor `name` is fused from (shared, then its experts)."""
        return [SHARED_PREFIX + name, *expert_keys(name, self.shapes[name], self.info.run.soup.expert_rank)]

    def map(self) -> "MappedSafetensors":
        """A new zero-copy map of the bank's weights (its header parsed once)."""
        return MappedSafetensors(self.weights)

    def workspace(self, mixes: int, names: list[str] | None = None) -> torch.Tensor:
        """Memory for `mixes` fused copies of the largest of these tensors (see `fused`)."""
        return torch.empty(mixes * max((math.prod(self.shapes[n]) for n in names or self.shapes), default=0))

    def fused(self, alphas: list[torch.Tensor], progress: bool = False,
              names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensor-major: (dense name, Theta_m[name] stacked over the alphas m: (mixes, *shape)) in fp32,
        one tensor at a time, in checkpoint order or the order of `names`. Each yielded tensor lives in
        one reused workspace (fresh memory for every tensor cost as much as the fusion itself): it is
        valid until the next one is asked for."""
        workspace = self.workspace(len(alphas), names)
        for name, shared, experts in self.tensors(names, progress):
            yield name, combine_many(shared, experts, alphas, workspace=workspace)  # the bank is read once for all mixes


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32; an fp32 tensor as it is, without a torch call (each releases and retakes the GIL,
    which export's writer threads hold in turn)."""
    return t if t.dtype == torch.float32 else t.float()


@lru_cache(maxsize=8)
def expected_shapes(model: ModelConfig, soup_cfg: SoupConfig, n_domains: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a soup of these (frozen, hashable) configs holds, by building it on the meta
    device; cached, as many exports in one process open checkpoints of the same configs."""
    from soup_train.model.soup import meta_soup

    return {name: tuple(p.shape) for name, p in meta_soup(model, soup_cfg, n_domains).named_parameters()}


def check_complete(ckpt: Path, info: CheckpointInfo, stored: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the checkpoint's config implies is present with its shape, and nothing else is
    (nothing allocated)."""
    expected = expected_shapes(info.run.model, info.run.soup, len(info.domains))
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or wrong or extra:
        detail = " ".join(f"{what} {names[:3]}" for what, names in
                          (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong)) if names)
        raise CheckpointError(f"{ckpt}/model.safetensors does not match its config.json ({detail.strip()}); "
                              "the checkpoint is corrupt or its config was edited")


class MappedSafetensors:
    """Zero-copy tensors of a safetensors file: views of one read-only memory map.

    `safe_open(...).get_tensor` copies every tensor out of the map; fusion reads each bank tensor
    exactly once, so the copy would double the memory traffic of the whole export. The map is
    shared and read-only: the kernel charges none of it against the process's memory (a private,
    writable map of a bank larger than memory is refused), and the pages it reads are page cache
    that the kernel drops under pressure. A view must never be written to (the process would get
    SIGSEGV); fusion only reads them. bf16 and fp16 tensors are views too (reinterpreted from their
    16-bit words), converted to fp32 by whoever fuses them, a block at a time.
    """

    _NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "I8": np.int8}

    def __init__(self, path: Path) -> None:
        self.header, self.base = safetensors_header(path)
        self.path = path
        self._prefetched: set[str] = set()
        self._ahead: queue.SimpleQueue | None = None  # (offset, length) ranges for the read-ahead thread
        # a plain ndarray over the map (which it keeps open): slicing np.memmap runs a Python hook per view
        self.map = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)

    def prefetch(self, groups: list[list[str]]) -> None:
        """Ask the kernel to read these tensors' bytes ahead (posix_fadvise WILLNEED, in the order
        given, on one background thread: asking blocks while the device is busy), so that a bank
        read from disk arrives while the tensor before is fused. Each tensor is asked for once, and
        only if its bytes are not already in the page cache (`_cached`: a warm bank pays no thread
        and no system calls; on a page-cached 43 MB bank they had made a 16-mix pass take 0.019 s
        instead of 0.010). A no-op where the system has no fadvise."""
        wanted = [k for group in groups for k in group if k not in self._prefetched]
        if not wanted or not hasattr(os, "posix_fadvise"):
            return
        self._prefetched.update(wanted)
        wanted = [k for k in wanted if not self._cached(k)]
        if not wanted:
            return
        if self._ahead is None:  # a daemon thread: an export that stops does not wait for its read-ahead
            self._ahead = queue.SimpleQueue()
            threading.Thread(target=_read_ahead, args=(self.path, self._ahead), daemon=True,
                             name="soup-export-read-ahead").start()
            weakref.finalize(self, self._ahead.put, None)  # the map gone: the thread ends
        for k in wanted:
            for offset, length in self._read_order(k):
                self._ahead.put((offset, length))

    def _cached(self, key: str) -> bool:
        """Whether a tensor's bytes look resident: a one-byte read that must not wait for the disk
        (RWF_NOWAIT) at its first, middle and last byte. False where that cannot be asked."""
        start, end = (self.base + o for o in self.header[key]["data_offsets"])
        if end <= start or not hasattr(os, "RWF_NOWAIT"):
            return end <= start
        byte = bytearray(1)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for offset in (start, (start + end) // 2, end - 1):
                os.preadv(fd, [byte], offset, os.RWF_NOWAIT)
            return True
        except OSError:  # EAGAIN: on disk; EOPNOTSUPP: the file system cannot say
            return False
        finally:
            os.close(fd)

    def _read_order(self, key: str) -> list[tuple[int, int]]:
        """(offset, length) pieces of a tensor's bytes in the order fusion reads them: an expert bank
        (n, ...) window by window of every expert (the kernel sums the experts' rows side by side),
        anything else front to back."""
        start, end = (self.base + o for o in self.header[key]["data_offsets"])
        shape = self.header[key]["shape"]
        if not key.startswith(EXPERTS_PREFIX) or len(shape) < 2 or shape[0] < 2:
            return [(start, end - start)]
        stride = (end - start) // shape[0]
        return [(start + j * stride + w, min(READ_AHEAD, stride - w))
                for w in range(0, stride, READ_AHEAD) for j in range(shape[0])]

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        if entry["dtype"] not in self._NUMPY:
            raise CheckpointError(f"{self.path}: tensor {key} is stored as {entry['dtype']}; export reads "
                                  f"{', '.join(self._NUMPY)} (write the checkpoint in fp32 or bf16)")
        start, end = (self.base + o for o in entry["data_offsets"])
        array = self.map[start:end].view(self._NUMPY[entry["dtype"]]).reshape(entry["shape"])
        with warnings.catch_warnings():  # "not writable": by design, see the class docstring
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor


def weights_sha256(weights: Path, verify: bool) -> str:
    """The bank's SHA-256: the one recorded by the checkpoint's writer while the file is as recorded
    (same size and modification time; `cp -p`, `rsync -a` and tar keep both), else computed once and
    cached (`cached_sha256`). With `verify`, the file is hashed and must match the record."""
    entry, stat = recorded_checksum(weights), weights.stat()
    if verify:
        return verified_sha256(weights, entry)
    if entry is not None and entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    if entry is not None:
        log.info("%s changed (or was copied without its times) since its SHA-256 was recorded: hashing it once",
                 weights)
    return cached_sha256(weights)


def verified_sha256(weights: Path, entry: dict | None) -> str:
    """The SHA-256 of `weights`, read in full, which must equal the one recorded when they were written."""
    if entry is None:
        raise CheckpointError(f"{weights} has no recorded SHA-256 to verify ({weights.parent / CHECKSUMS} is "
                              "missing: a checkpoint from an older soup-train); run without --verify-checkpoint")
    actual = file_sha256(weights)
    if actual != entry["sha256"]:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded when it was written "
                              f"({actual[:12]}... vs {entry['sha256'][:12]}...): the file is corrupt or was changed; "
                              "copy the checkpoint again")
    return actual


READ_AHEAD = 4 << 20  # bytes asked for per fadvise call (per expert, in an expert bank's windows)


def _read_ahead(path: Path, ranges: queue.SimpleQueue) -> None:
    """posix_fadvise(WILLNEED) over each (offset, length) taken from `ranges`, READ_AHEAD bytes at a
    time, until None. Best effort: an error only loses the read-ahead."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        while (item := ranges.get()) is not None:
            offset, length = item
            for start in range(offset, offset + length, READ_AHEAD):
                os.posix_fadvise(fd, start, min(READ_AHEAD, offset + length - start), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def safetensors_header(path: Path) -> tuple[dict, int]:
    """({tensor name: {dtype, shape, data_offsets}}, offset of the data) of a safetensors file, read
    from its first bytes without mapping it (safetensors' own reader maps the whole file privately,
    which a bank larger than memory is refused). A file too short for its header, or whose tensors
    lie past its end, is a one-line CheckpointError."""
    def corrupt(detail: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: {detail}; the checkpoint is missing or corrupt (copy it again)")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            (n,) = struct.unpack("<Q", fh.read(8)) if size >= 8 else (-1,)
            if not 0 < n <= min(size - 8, 100 << 20):
                raise corrupt("no safetensors header")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise corrupt(exc.strerror or str(exc)) from None
    except (ValueError, UnicodeDecodeError):
        raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a mapping")
    header.pop("__metadata__", None)
    try:
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        valid = all(isinstance(e["shape"], list) and isinstance(e["dtype"], str) for e in header.values())
    except (KeyError, TypeError, ValueError, IndexError):
        raise corrupt("its header is malformed") from None
    if not valid or 8 + n + end > size:
        raise corrupt(f"it is truncated ({size} bytes, its header names {8 + n + end})")
    for key, e in header.items():
        width = DTYPE_BYTES.get(e["dtype"])
        if width is not None and e["data_offsets"][1] - e["data_offsets"][0] != width * math.prod(e["shape"]):
            raise corrupt(f"tensor {key}'s bytes do not match its shape {e['shape']} and dtype {e['dtype']}")
    return header, 8 + n


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
BANK_DTYPES = ("F32", "BF16", "F16")  # what export fuses (in fp32)


def cached_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, cached in ~/.cache/soup/sha256 keyed by its absolute path,
    size and mtime_ns: checkpoints are written once, and hashing a large bank on every export
    would cost more than the export itself. The checkpoint directory is never written to."""
    stat = path.stat()
    cache = user_cache("sha256") / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    def make() -> str:
        log.info("hashing %s (no SHA-256 recorded for it as it is now); the digest is cached for later exports", path)
        return file_sha256(path)

    return cached_json(cache, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, make,
                       lambda digest: isinstance(digest, str) and len(digest) == 64)


def cached_json(cache: Path, key: dict, make: Callable[[], T], valid: Callable[[object], bool] = lambda value: True) -> T:
    """The JSON value saved in `cache` for this `key` (JSON types only), or `make()`, saved there for
    next time (written to a temporary name and renamed; an unwritable cache is skipped, and an
    unreadable or invalid entry is made again)."""
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key and valid(saved["value"]):
            return saved["value"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable
        pass
    value = make()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}) + "\n")
        tmp.replace(cache)
    except OSError:  # no writable cache: made every time
        pass
    return value


def user_cache(name: str) -> Path:
    """soup's cache directory `name`: $XDG_CACHE_HOME/soup/name (~/.cache when unset or empty; the
    system's temporary directory when there is no home either)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory (some containers)
            base = str(Path(tempfile.gettempdir()) / f"soup-cache-{os.getuid() if hasattr(os, 'getuid') else 0}")
    return Path(base) / "soup" / name


def resolve(ckpt: Path, mix: Mix, out: Path, dtype: str = "float32", progress: bool = False) -> Path:
    """Write the HF Llama directory of Theta(h) into `out` (which must not exist)."""
    return resolve_batch(ckpt, [mix], [out], dtype, progress)[0]


def resolve_batch(ckpt: Path, mixes: list[Mix], outs: list[Path], dtype: str = "float32",
                  progress: bool = False) -> list[Path]:
    """One pass over the bank for many mixes; `outs[m]` receives mix m's HF directory."""
    if dtype not in DTYPES:
        raise ExportInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    bank = Bank.open(ckpt)
    for mix in mixes:
        if list(mix.domains) != list(bank.info.domains):
            raise ExportInputError(f"mix {mix.name!r} is over domains {list(mix.domains)}, the checkpoint's are "
                                   f"{bank.info.domains}")
    alphas = [bank.alpha(m.h) for m in mixes]
    torch_dtype = DTYPES[dtype]
    specs = [(name, torch_dtype, shape) for name, shape in bank.shapes.items()]
    writers = []
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        writers.append(SafetensorsWriter(out / "model.safetensors", specs, {"format": "pt"}))
    try:
        for name, tensors in bank.fused(alphas, progress):
            for writer, tensor in zip(writers, tensors):
                writer.write(name, tensor)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for out, mix, alpha in zip(outs, mixes, alphas):
        write_hf_files(bank, out, dtype)
        (out / SPEC_FILE).write_bytes(spec_bytes(bank, mix, alpha, dtype))
    return outs


def spec_bytes(bank: Bank, mix: Mix, alpha: torch.Tensor, dtype: str) -> bytes:
    """The SPEC_FILE of a resolved mix: its weights, alpha, the checkpoint and the dtype."""
    return json_bytes({"mix": mix.to_dict(), "alpha": [float(a) for a in alpha], "checkpoint": checkpoint_ref(bank),
                       "dtype": dtype})


def checkpoint_ref(bank: Bank) -> dict:
    return {"name": bank.path.name, "step": bank.info.step, "model_sha256": bank.sha256,
            "domains": bank.info.domains, "view": bank.info.view}


def write_hf_files(bank: Bank, out: Path, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer files of the soup's HF Llama directory."""
    write_hf_side_files(bank.info.run.model, bank.path / "tokenizer.json", out, dtype)


def write_hf_side_files(model: ModelConfig, tokenizer: Path, out: Path, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer files of an HF Llama directory."""
    write_files(out, hf_side_files(model, tokenizer, dtype))


def write_files(out: Path, files: dict[str, bytes]) -> None:
    """Each {name: bytes} as out/name."""
    for name, data in files.items():
        (out / name).write_bytes(data)


def json_bytes(data: dict) -> bytes:
    """The bytes of a JSON file as export writes them (indented, a final newline)."""
    return (json.dumps(data, indent=2) + "\n").encode()


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
    transformers took 2.6-3.4 s of every export command that needed nothing else from it."""
    from soup_export.manifest import library_version

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
    """The `added_tokens` array of a tokenizer.json, decoded alone: the whole file (half a MB of
    vocabulary and merges at 8k tokens) took 12 ms to parse, most of the side files' cost. Falls
    back to the full parse when the array is not where a JSON key can be."""
    match = _ADDED_TOKENS.search(tokenizer_json)
    if match:
        try:
            added, _ = json.JSONDecoder().raw_decode(tokenizer_json, match.end() - 1)
            if isinstance(added, list) and all(isinstance(t, dict) and "content" in t and "id" in t for t in added):
                return added
        except ValueError:
            pass
    return json.loads(tokenizer_json).get("added_tokens", [])


def read_spec(hf_dir: Path) -> dict:
    path = Path(hf_dir) / SPEC_FILE
    if not path.is_file():
        raise ExportInputError(f"{hf_dir} is not a resolved specialist (no {SPEC_FILE}); "
                               "create one with `soup-export resolve CKPT --mix ... --out DIR`")
    return read_json(path)
