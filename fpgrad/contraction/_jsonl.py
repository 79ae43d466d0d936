"""Append-only JSON Lines: one fsync'd write per row, so a row is on disk whole or not at all."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Union

PathLike = Union[str, "os.PathLike[str]"]


def plain(obj: Any) -> Any:
    """Rows as plain JSON: tensors and numpy scalars as numbers / lists; NaN and Inf as 'nan' / 'inf' / '-inf'."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        obj = obj.detach().cpu()
        return plain(obj.item() if obj.numel() == 1 else obj.tolist())
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def append_jsonl(path: PathLike, row: Mapping[str, Any]) -> Path:
    """Append `row` as one line to the JSON Lines file `path` (created with its folder if missing).

    The line goes out in one O_APPEND write and is fsync'd before returning; a line cut short by an earlier
    crash is ended first (so every complete row stays readable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(plain(row), separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_jsonl(path: PathLike) -> list[dict]:
    """The complete rows of a JSON Lines file (a trailing partial line is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
