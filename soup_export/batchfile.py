"""The customers file of `soup-export batch`.

YAML or JSON:
    customers:
      acme:    {austen: 0.7, python-code: 0.3}      # explicit weights
      globex:  {texts: [globex_mail/]}              # estimated (paths relative to this file)
      initech: {mix: {bible: 1}}
A top-level mapping without `customers` is read as the customers mapping. A name given twice is
an error (YAML and JSON would keep the last), and an error in one customer's entry names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from soup_export.bank import Bank
from soup_export.errors import MixError
from soup_export.cache import file_sha256
from soup_export.files import read_json
from soup_export.layout import BATCH_FILE
from soup_export.mix import Mix, errors_in, mix_from_mapping, mix_from_texts, read_mix_file
from soup_train.data.local import NAME_RE


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` (0 <= index < count) of a customers file: the customers at positions
    index, index + count, index + 2 count, ... in the file's order. The same file gives every machine
    of a fleet the same split, whatever runs them (a Slurm array, a Kubernetes indexed Job)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, sep, count = text.partition("/")
        try:
            shard = cls(int(index), int(count)) if sep else None
        except ValueError:
            shard = None
        if shard is None or not 0 <= shard.index < shard.count:
            raise MixError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/8 for the first of "
                           "eight machines ($SLURM_ARRAY_TASK_ID/8, $JOB_COMPLETION_INDEX/8)")
        return shard

    def take(self, names: list[str]) -> list[str]:
        return names[self.index::self.count]

    def record(self, path: Path) -> dict:
        """What batch.json records of a shard: which part of which customers file (its SHA-256, so that
        `batch_status` can tell shards of another version of the file)."""
        return {"index": self.index, "count": self.count, "customers_file": Path(path).name,
                "customers_file_sha256": file_sha256(Path(path))}


def customer_entries(path: Path) -> dict[str, object]:
    """{name: entry} of a customers file, every name checked (unique, usable as a directory name);
    the entries themselves are read by `read_batch`."""
    data = read_mix_file(Path(path))
    customers = data.get("customers", data) if isinstance(data, dict) else None
    if not isinstance(customers, dict) or not customers:
        raise MixError(f"{path}: expected customers, a mapping of NAME to {{domain: weight}}, {{mix: {{...}}}} or "
                       "{texts: [...]}, under `customers:` or at the top level (see examples/customers.yaml)")
    entries: dict[str, object] = {}
    for name, entry in customers.items():
        name = str(name)
        if name in entries:  # e.g. YAML's 1 and '1'
            raise MixError(f"{path}: customer name {name!r} is given twice; give each customer once")
        if not NAME_RE.fullmatch(name) or name == BATCH_FILE:
            raise MixError(f"{path}: customer name {name!r} must be letters, digits, '.', '_' or '-' "
                           "(and not batch.json)")
        entries[name] = entry
    return entries


def read_batch(ckpt: Path, path: Path, shard: Shard = Shard()) -> list[Mix]:
    """The mixes of the customers of `shard` (all by default), in the file's order; texts are read
    for those customers only."""
    entries = customer_entries(path)
    bank = Bank.open(ckpt)
    mixes = []
    for name in shard.take(list(entries)):
        entry = entries[name]
        with errors_in(f"{path}: customer {name!r}"):
            paths = _texts(path, entry)
            if paths is not None:
                mixes.append(mix_from_texts(bank.path, list(paths), bank.info.domains, bank.info.view, name))
            else:
                mixes.append(mix_from_mapping(entry, bank.info.domains, f"file:{Path(path).name}#{name}", name))
    return mixes


def batch_texts(path: Path, shard: Shard = Shard()) -> dict[str, tuple[Path, ...]]:
    """{name: text paths} of the customers of `shard` given by their texts (their mix is chosen from them)."""
    entries = customer_entries(path)
    found = {name: _texts(path, entries[name]) for name in shard.take(list(entries))}
    return {name: paths for name, paths in found.items() if paths is not None}


def _texts(path: Path, entry: object) -> tuple[Path, ...] | None:
    """The text paths of a `{texts: [...]}` entry (relative to the customers file), None for weights."""
    if not (isinstance(entry, dict) and "texts" in entry):
        return None
    texts = entry["texts"] if isinstance(entry["texts"], list) else [entry["texts"]]
    return tuple(Path(path).parent / str(t) for t in texts)


def batch_status(path: Path, dirs: list[Path]) -> tuple[list[str], list[str], list[str]]:
    """(written, missing, unexpected) customer names of a customers file across batch directories
    (each shard's `--out`): a customer is written when some directory holds NAME/manifest.json and
    every file that manifest lists, with its size (`soup-run` checks their hashes when it loads them)."""
    from soup_export.layout import MANIFEST, read_manifest

    names, digest = list(customer_entries(path)), file_sha256(Path(path))
    found: set[str] = set()
    for d in dirs:
        if not (Path(d) / BATCH_FILE).is_file():
            raise MixError(f"{d} is not a batch directory (no batch.json); pass the --out of each `soup-export batch`")
        shard = read_json(Path(d) / BATCH_FILE).get("shard") or {}
        if shard.get("customers_file_sha256", digest) != digest:
            raise MixError(f"{d} is shard {shard.get('index')}/{shard.get('count')} of another version of {path} "
                           "(its SHA-256 differs): export that shard again from this file")
        for sub in Path(d).iterdir():
            if sub.is_dir() and not sub.name.startswith(".") and (sub / MANIFEST).is_file() and _complete(sub, read_manifest(sub)):
                found.add(sub.name)
    return [n for n in names if n in found], [n for n in names if n not in found], sorted(found - set(names))


def _complete(root: Path, manifest: dict) -> bool:
    files = manifest.get("files", {})
    return bool(files) and all((root / rel).is_file() and (root / rel).stat().st_size == f["bytes"]
                               for rel, f in files.items())
