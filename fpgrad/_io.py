"""Writing files: atomically (a file or a whole folder appears complete or not at all; a failed write leaves
the old one) and as standard JSON (NaN / Inf as the strings 'nan' / 'inf' / '-inf', tensors and numpy values as
plain numbers). Imports neither torch nor plotting at module level, so that any part of fpgrad can use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else by set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and os.replace (all or nothing).

    The file gets the mode an ordinary open() would give it (0o666 less the umask), or the mode of the
    file it replaces. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = (path.stat().st_mode & 0o7777) if path.is_file() else (0o666 & ~_umask())
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (temporary file + os.replace); see `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(out_dir: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder in a temporary sibling and put it in place of `out_dir` only if the block succeeds.

        with atomic_directory("reports/spectral") as tmp:
            (tmp / "report.md").write_text(...)

    Yields the temporary folder (`out_dir.parent / ".tmp-<name>-<random>"`). On success an existing
    `out_dir` is renamed to a backup, the new folder renamed into place, and the backup removed; on any
    exception the temporary folder is removed and an existing `out_dir` is left as it was.
    Raises FileExistsError if `out_dir` exists and `overwrite` is False (checked before and after the
    block), or if `out_dir` exists and is not a folder (a file is never replaced by a folder).
    """
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):
        out_dir = out_dir.resolve()
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0o700; give the folder an ordinary mode
        _check_target(out_dir, overwrite)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it or choose another folder")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; remove it or choose another folder")


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`, moving an existing `out_dir` aside first and restoring it if the rename fails."""
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    backup = out_dir.parent / f".bak-{out_dir.name}-{secrets.token_hex(4)}"
    os.rename(out_dir, backup)
    try:
        os.rename(new, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ---- JSON ---------------------------------------------------------------------------------------------------

def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: mappings (keys as str), lists, tuples, tensors (a one-element tensor as its
    number), numpy arrays and scalars; NaN / Inf as the strings 'nan' / 'inf' / '-inf' (standard JSON has
    neither); complex as {"real", "imag"}; anything else as its str()."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, complex):
        return {"real": jsonable(obj.real), "imag": jsonable(obj.imag)}
    if isinstance(obj, Real):                                   # numpy scalars
        return jsonable(int(obj) if isinstance(obj, Integral) else float(obj))
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):       # a torch.Tensor
        t = obj.detach().cpu()
        return jsonable(t.item() if t.numel() == 1 else t.tolist())
    if hasattr(obj, "tolist") and callable(obj.tolist):          # numpy arrays and scalars
        return jsonable(obj.tolist())
    return str(obj)


def from_jsonable(obj: Any) -> Any:
    """Undo `jsonable`'s NaN / Inf strings: 'nan', 'inf', '-inf' back to floats, in nested dicts and lists."""
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def json_default(obj: Any) -> Any:
    """`default=` for json.dumps: a tensor as its list, anything with .item() (numpy, 0-dim tensors) as its
    number, anything else as its str()."""
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):       # a torch.Tensor
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def write_json(path: PathLike, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """`jsonable(obj)` written atomically to `path` as standard JSON (no NaN / Inf literals), newline-terminated."""
    text = json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return atomic_write_text(path, text + "\n")


# ---- JSON Lines (append-only rows) ----------------------------------------------------------------------------

def _drop_torn_tail(path: Path) -> int:
    """Cut a last line left without its newline by a kill mid-write (it is not a complete row), with a warning;
    returns the bytes dropped. Only the tail can be torn: every append writes one whole line."""
    import warnings
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        chunk, keep = 1 << 16, 0
        pos = size
        while pos > 0:                           # find the last newline, reading backwards
            start = max(0, pos - chunk)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.seek(keep)
        tail = f.read(min(size - keep, 60))
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    warnings.warn(f"{path}: dropped a torn last line ({size - keep} bytes, {tail!r}...) left by a write cut short "
                  "(a killed run); the rows before it are kept", stacklevel=3)
    return size - keep


def append_jsonl(path: PathLike, row: Mapping[str, Any]) -> Path:
    """Append `row` (as `jsonable`) as one line to the JSON Lines file `path` (created with its folder if
    missing): one O_APPEND write, fsync'd before returning, so a row is on disk whole or not at all. A last line
    torn by an earlier kill is dropped first, with a warning (as fpgrad.study's RowStore.repair)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(jsonable(row), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _drop_torn_tail(path)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_jsonl(path: PathLike) -> list[dict]:
    """The complete rows of a JSON Lines file. A torn last line (no newline, not valid JSON: a kill mid-write) is
    skipped with a warning; an invalid line elsewhere raises ValueError naming the file and line."""
    import warnings
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) and not data.endswith(b"\n"):
                warnings.warn(f"{path}: skipped a torn last line ({line[:60]!r}...) left by a write cut short; "
                              "the next append drops it", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON ({line[:60]!r}); each line must be one "
                             "row: remove or fix that line") from None
    return rows
