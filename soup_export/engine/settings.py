"""How an export's bank pass runs: one frozen `EngineSettings`, made once where a command starts
(from its flags and the environment), passed down, and recorded in every manifest it writes.

    executor   fast (default): the compiled int4 kernel, writer lanes, direct I/O, hard links;
               reference: plain torch, one file write at a time (the specification `fast` is held to)
    kernel     SOUP_NATIVE=0 turns the compiled kernel off (fast then quantizes with torch)
    reads      SOUP_NATIVE_READS=in-place|copy: how a batch's kernel reads the bank (default:
               measured once per machine, see `native.reads_in_place`)
    direct_io  SOUP_DIRECT_IO=0 writes data files through the page cache instead of O_DIRECT

The settings never change the format; `fast` and `reference` write the same bytes wherever they
sum in the same order (see `engine/__init__.py`).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from soup_train.errors import ConfigError

EXECUTORS = ("fast", "reference")
READS = ("auto", "in-place", "copy")
ENV = {"kernel": "SOUP_NATIVE", "reads": "SOUP_NATIVE_READS", "direct_io": "SOUP_DIRECT_IO"}


@dataclass(frozen=True)
class EngineSettings:
    executor: str = "fast"
    kernel: bool = True
    reads: str = "auto"
    direct_io: bool = True

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"engine {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.reads not in READS:
            raise ConfigError(f"{ENV['reads']}={self.reads!r}: expected one of in-place, copy, or unset it to use "
                              "the reads measured on this machine")

    @classmethod
    def from_env(cls, executor: str = "fast", environ: dict | None = None) -> "EngineSettings":
        """The settings the environment asks for (read here, once), with this executor."""
        env = os.environ if environ is None else environ
        return cls(executor=executor, kernel=_flag(env, ENV["kernel"]), reads=env.get(ENV["reads"]) or "auto",
                   direct_io=_flag(env, ENV["direct_io"]))

    def to_dict(self) -> dict:
        return asdict(self)


def _flag(env, name: str) -> bool:
    value = env.get(name, "1")
    if value not in ("0", "1", ""):
        raise ConfigError(f"{name}={value!r}: expected 0 (off) or 1 (on), or unset it")
    return value != "0"
