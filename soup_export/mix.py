"""Stage 1, mix: a customer's domain weights h, validated against the checkpoint's domains.

Forms: `--mix fiction=0.7,code=0.3`, a JSON/YAML file ({domain: weight} or {"mix": {...}}),
or estimated from the customer's texts (Algorithm 3 with the checkpoint's centroids and
embedder). Unlisted domains get 0. Weights must be finite, non-negative and not all zero; they
are normalised to sum to 1 and the fact is recorded (mergekit users were confused by silent
normalisation).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soup_export.errors import MixError

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
        try:
            given[name.strip()] = float(value)
        except ValueError:
            raise MixError(f"weight of {name.strip()!r} is {value!r}, not a number") from None
    return given


def read_mix_file(path: Path) -> object:
    """The parsed content of a JSON or YAML file."""
    if not path.is_file():
        raise MixError(f"mix file {path} does not exist; pass a JSON or YAML file like {{\"austen\": 0.7}}")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(path.read_text())
        return json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise MixError(f"cannot parse mix file {path}: {exc}") from None


def mix_from_mapping(data: object, domains: list[str], source: str, name: str = "specialist") -> Mix:
    if isinstance(data, dict) and isinstance(data.get("mix"), dict):
        data = data["mix"]
    if not isinstance(data, dict):
        raise MixError(f"{source}: expected a mapping of domain to weight, got {type(data).__name__}")
    given = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MixError(f"{source}: weight of {k!r} is {v!r}, not a number")
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
