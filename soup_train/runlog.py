"""Run logs: a JSONL file (one record per log/eval event) and optional TensorBoard events.

Only rank 0 writes. On resume, records after the checkpoint's step are dropped first, so the
log of a resumed run reads like the log of an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool) -> None:
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        kept = [r for r in read_log(path) if resume_step is not None and r["step"] <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        if tensorboard:
            self.tb = self._tensorboard(path.parent / "tensorboard")

    @staticmethod
    def _tensorboard(directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("train.tensorboard=true but the tensorboard package is not installed; "
                        "logging to JSONL only (pip install tensorboard)")
            return None
        return SummaryWriter(str(directory))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
        for domain, losses in record.get("domains", {}).items():
            for setting in ("own", "natural"):
                self.tb.add_scalar(f"eval_{setting}/{domain}", losses[setting], step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
