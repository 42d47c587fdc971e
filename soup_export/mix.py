"""Stage 1, mix: a customer's domain weights h, validated against the checkpoint's domains.

Forms: `--mix fiction=0.7,code=0.3`, a JSON/YAML file ({domain: weight} or {"mix": {...}}),
or estimated from the customer's texts (Algorithm 3 with the checkpoint's centroids and
embedder). Unlisted domains get 0. Weights must be finite, non-negative and not all zero; they
are normalised to sum to 1 and the fact is recorded (mergekit users were confused by silent
normalisation).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soup_export.errors import MixError
from soup_train.errors import SoupError

SUM_TOL = 1e-6


@dataclass(frozen=True)
class Mix:
    """Validated domain weights in the checkpoint's domain order."""

    domains: tuple[str, ...]
    weights: tuple[float, ...]  # h, sums to 1
    given: dict[str, float] = field(default_factory=dict)  # as given (or estimated), before normalising
    normalised: bool = False  # True when the given weights did not sum to 1
    source: str = "weights"  # weights | file:NAME | texts:N files
    name: str = "specialist"

    @property
    def h(self) -> np.ndarray:
        return np.asarray(self.weights, dtype=np.float64)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "normalised": self.normalised,
                "given": self.given, "weights": dict(zip(self.domains, self.weights))}

    def describe(self) -> str:
        return ",".join(f"{d}={w:.2f}" for d, w in zip(self.domains, self.weights) if w > 0)


def parse_mix(text: str) -> dict[str, float]:
    """`a=0.7,b=0.3` -> {a: 0.7, b: 0.3}."""
    given: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise MixError(f"mix item {item!r} is not DOMAIN=WEIGHT (e.g. --mix austen=0.7,python-code=0.3)")
        if name.strip() in given:
            raise MixError(f"domain {name.strip()!r} is given twice in --mix {text!r}; give each domain once")
        try:
            given[name.strip()] = float(value)
        except ValueError:
            raise MixError(f"weight of {name.strip()!r} is {value!r}, not a number") from None
    return given


def read_mix_file(path: Path) -> object:
    """The parsed content of a JSON or YAML file. A key given twice in one mapping is an error (both
    parsers would keep the last silently: a customer or a weight dropped without a word)."""
    if not path.is_file():
        raise MixError(f"mix file {path} does not exist; pass a JSON or YAML file like {{\"austen\": 0.7}}")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            return _load_yaml(text)
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise MixError(f"mix file {path}: {exc}; give each key once") from None
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise MixError(f"cannot parse mix file {path}: {_one_line(exc)}; fix the file") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice in one mapping")
        out[key] = value
    return out


def _load_yaml(text: str) -> object:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice in one mapping (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def _one_line(exc: Exception) -> str:
    """A parser's error in one line: YAML's problem and where it is, JSON's message as it is."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


@contextlib.contextmanager
def errors_in(where: str):
    """User errors raised inside are raised again (same class) with `where` first, e.g.
    `customers.yaml: customer 'acme': unknown domain(s) ...`."""
    try:
        yield
    except SoupError as exc:
        raise type(exc)(f"{where}: {exc.message}") from None


def mix_from_mapping(data: object, domains: list[str], source: str, name: str = "specialist") -> Mix:
    """{domain: weight} or {"mix": {domain: weight}} from a file; `source` is recorded in the Mix
    (callers say where the mapping came from in errors, with `errors_in`)."""
    if isinstance(data, dict) and isinstance(data.get("mix"), dict):
        data = data["mix"]
    if not isinstance(data, dict):
        raise MixError(f"expected a mapping of domain to weight, got {type(data).__name__}")
    given = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MixError(f"weight of {k!r} is {v!r}, not a number")
        if str(k) in given:  # e.g. YAML's 1 and '1'
            raise MixError(f"domain {str(k)!r} is given twice; give each domain once")
        given[str(k)] = float(v)
    return validate(given, domains, source, name)


def validate(given: dict[str, float], domains: list[str], source: str = "weights", name: str = "specialist") -> Mix:
    """Known domains, finite, non-negative, not all zero; normalised to sum 1 (recorded)."""
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise MixError(f"unknown domain(s) {', '.join(map(repr, unknown))}; the checkpoint's domains are "
                       f"{', '.join(domains)}")
    bad = [k for k, v in given.items() if not math.isfinite(v)]
    if bad:
        raise MixError(f"weight of {bad[0]!r} is not finite; give numbers >= 0")
    negative = [k for k, v in given.items() if v < 0]
    if negative:
        raise MixError(f"weight of {negative[0]!r} is negative ({given[negative[0]]}); weights must be >= 0")
    total = sum(given.values())
    if total <= 0:
        raise MixError("all weights are zero; give at least one domain a positive weight")
    weights = tuple(given.get(d, 0.0) / total for d in domains)
    return Mix(tuple(domains), weights, dict(given), abs(total - 1.0) > SUM_TOL, source, name)


def mix_from_texts(ckpt: Path, paths: list[Path], domains: list[str], view: str, name: str = "specialist") -> Mix:
    """Algorithm 3 with the checkpoint's own centroids and embedder."""
    from soup_train.data.domains import DomainMap
    from soup_train.textfiles import read_texts

    texts = read_texts(paths)
    dm = DomainMap.load(ckpt)
    if dm.view_names(view) != list(domains):
        raise MixError(f"{ckpt}: the domain map's {view} view does not match the checkpoint's domains")
    h = dm.histogram(texts, view)
    given = {d: round(float(w), 6) for d, w in zip(domains, h) if w > 0}
    mix = validate(given, domains, f"texts:{len(texts)} files", name)
    return Mix(mix.domains, tuple(float(x) for x in h), given, False, mix.source, name)
