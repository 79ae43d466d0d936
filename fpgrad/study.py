"""Studies: a grid of configurations mapped over a run function, each finished row stored at once.

A study can be interrupted and resumed: rows live in `<out>/rows.jsonl` (one JSON line per finished
configuration, flushed and fsynced), keyed by a hash of the configuration; rerunning skips finished
keys. Executors: `LocalExecutor` (in-process, or a pool of processes) by default; `RayExecutor`
(`fpgrad.distributed`, one Ray task per configuration) with the same `map` interface. Whatever the executor,
the driver is the one writer of the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import importlib
import json
import os
import platform
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from ._io import json_default
from .errors import FPGradError

Config = dict[str, Any]
Row = dict[str, Any]


@dataclass(frozen=True)
class Study:
    """A named study: `grid(quick)` lists configs, `run(config)` makes one row, `finalize(rows, out_dir,
    meta)` writes tables, figures and the written reading from the rows (never recomputing them)."""

    name: str
    description: str
    grid: Callable[[bool], list[Config]]
    run: Callable[[Config], Row]
    finalize: Callable[[list[Row], Path, dict], None]
    module: str = ""
    defaults: dict = field(default_factory=dict)


class StudyTaskError(FPGradError, RuntimeError):
    """One configuration of a study failed on a worker (it raised, or its worker process died more often than
    the executor retries). `config` is the configuration; the worker's error is the `__cause__`."""

    def __init__(self, message: str, *, study: str, config: Config):
        super().__init__(message)
        self.study = study
        self.config = config


class RowStoreError(FPGradError, ValueError):
    """A line of a row store is valid JSON but not a row (names the file and the line)."""


class OutputLockedError(FPGradError, RuntimeError):
    """Another fpgrad run holds the output folder (its pid, host and start time are in the message)."""


@contextlib.contextmanager
def output_lock(lock_path: os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock (fcntl.flock on `lock_path`) for the block; a second holder gets OutputLockedError.

    The lock file records pid, host and start time for the message, and is removed on exit. The OS drops the
    lock when its process dies (even by SIGKILL), so a held lock always means a live run. No-op where fcntl
    is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(lock_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputLockedError(f"{what}: another fpgrad run is writing here ({holder}); wait for it to "
                                    f"finish or choose another --out (lock file {path})") from None
        try:                             # the previous holder may have removed the file between open and flock
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
    os.fsync(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has just started"


def config_key(config: Config) -> str:
    """A stable key of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class RowStore:
    """Append-only JSON-lines store of finished rows: {"key", "config", "row"} per line.

    Each append is one write of a whole line, flushed and fsynced, so a killed run loses at most the row
    being computed. Reading skips a line torn by a kill mid-write; `repair()` (run_study calls it under its
    lock) drops such lines from the file with a warning. A valid JSON line that is not a row raises
    RowStoreError naming the file and line.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _scan(self) -> tuple[list[dict], list[int], list[bytes]]:
        """(records, numbers of torn lines, raw lines)."""
        if not self.path.exists():
            return [], [], []
        lines = self.path.read_bytes().split(b"\n")
        out, torn = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                torn.append(number)     # a line torn by a kill: its config will simply run again
                continue
            if not (isinstance(record, dict) and {"key", "config", "row"} <= record.keys()):
                raise RowStoreError(f"{self.path}, line {number}: valid JSON but not a row "
                                    f"(got {type(record).__name__}: {line[:60].decode(errors='replace')!r}); "
                                    'each line must be {"key", "config", "row"}: remove or fix that line')
            out.append(record)
        return out, torn, lines

    def records(self) -> list[dict]:
        """Every stored record {"key", "config", "row"}, skipping torn lines."""
        return self._scan()[0]

    def repair(self) -> int:
        """Drop torn lines (left by a run killed mid-write) from the file, atomically, with a warning; returns
        how many were dropped. Call only while no one appends (run_study holds its lock)."""
        _, torn, lines = self._scan()
        if torn:
            from ._io import atomic_write_bytes
            keep = [line for number, line in enumerate(lines, start=1) if number not in torn and line.strip()]
            atomic_write_bytes(self.path, b"".join(line + b"\n" for line in keep))
            warnings.warn(f"{self.path}: dropped {len(torn)} torn line(s) (line {', '.join(map(str, torn))}) left "
                          "by a run killed mid-write; their configurations run again", stacklevel=2)
        return len(torn)

    def done(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def append(self, config: Config, row: Row) -> None:
        line = json.dumps({"key": config_key(config), "config": config, "row": row}, sort_keys=True,
                          default=json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if f.tell() > 0 and not self._ends_with_newline():
                f.write("\n")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def _run_by_name(module: str, config: Config) -> Row:
    """Worker entry point: import the study's module and run one configuration."""
    study = importlib.import_module(module).STUDY
    return study.run(config)


class LocalExecutor:
    """Runs configurations in this process (workers=1) or in a pool of `workers` processes; yields
    (config, row) as each finishes."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

    def map(self, study: Study, configs: list[Config]) -> Iterator[tuple[Config, Row]]:
        if self.workers == 1 or len(configs) <= 1:
            for c in configs:
                yield c, study.run(c)
            return
        with cf.ProcessPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(_run_by_name, study.module, c): c for c in configs}
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()


def study_meta(study: Study, quick: bool, seed: int, command: str | None = None) -> dict:
    import numpy
    import scipy
    import torch
    return {"study": study.name, "quick": quick, "seed": seed,
            "command": command or f"fpgrad study {study.name}" + (" --quick" if quick else ""),
            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "platform": platform.platform(), "processor": platform.machine(),
            "threads": torch.get_num_threads()}


def run_study(study: Study, out_dir: os.PathLike, *, quick: bool = False, seed: int = 0,
              executor: Any | None = None, progress: bool = True, command: str | None = None,
              finalize: bool = True) -> list[Row]:
    """Run every configuration of the grid not already in `<out_dir>/rows.jsonl`, store each row as it
    finishes, then let the study write its tables and figures. Returns the rows in grid order.

    Holds a lock on `out_dir` for the whole run (a second run on it raises OutputLockedError naming the holder's
    pid, host and start time) and first drops any torn line a killed run left in the store (with a warning).
    """
    out = Path(out_dir)
    with output_lock(out / ".fpgrad.lock", f"study {study.name} in {out}"):
        return _run_study_locked(study, out, quick=quick, seed=seed, executor=executor, progress=progress,
                                 command=command, finalize=finalize)


def _run_study_locked(study: Study, out: Path, *, quick: bool, seed: int, executor: Any | None, progress: bool,
                      command: str | None, finalize: bool) -> list[Row]:
    configs = [{**c, "seed": c.get("seed", seed), "quick": quick} for c in study.grid(quick)]
    store = RowStore(out / "rows.jsonl")
    store.repair()
    done = store.done()
    todo = [c for c in configs if config_key(c) not in done]
    executor = executor or LocalExecutor()
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc=study.name, disable=not progress,
               unit="config", file=sys.stderr)
    t0 = time.perf_counter()
    for config, row in executor.map(study, todo):
        store.append(config, row)
        bar.update(1)
    bar.close()
    by_key = {r["key"]: r["row"] for r in store.records()}
    rows = [{**by_key[config_key(c)], "config": c} for c in configs if config_key(c) in by_key]
    if finalize:
        meta = study_meta(study, quick, seed, command)
        meta["seconds_this_run"] = time.perf_counter() - t0
        meta["configs"] = len(configs)
        study.finalize(rows, out, meta)
    return rows


def iter_rows(rows: Iterable[Row], **match) -> list[Row]:
    """Rows whose config matches every key=value given."""
    return [r for r in rows if all(r["config"].get(k) == v for k, v in match.items())]
