"""File helpers shared by the export stages, importable without torch or onnx (so that
`soup-export inspect` reads a specialist's or a batch's manifest in a tenth of a second, not after
importing both): a JSON object from a file a user pointed at, and a byte count for people."""
from __future__ import annotations

import json
from pathlib import Path

from soup_export.errors import ExportInputError


def read_json(path: Path) -> dict:
    """A JSON object from a file the user pointed at, with a clear error when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ExportInputError(f"{path} is not readable JSON ({exc}); the directory is corrupt: rebuild it") from None
    if not isinstance(data, dict):
        raise ExportInputError(f"{path} holds {type(data).__name__}, expected a JSON object; rebuild it")
    return data


def human(n: int) -> str:
    """Bytes in decimal units: 5.09 MB, 477.85 KB, 12 B."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
