"""Small pieces the studies share: timing, thread settings, CSV and provenance text.

Nothing here computes a study's numbers; it runs or writes what a study asks for.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ._io import atomic_write_text
from .forward import Iterate
from .maps import Map

# the weights through which slot attention's next state depends on its current one
RECURRENT_WEIGHTS = ("gru.weight_hh", "to_q.weight", "mlp.2.weight")


def exact_iterations(T: int) -> Iterate:
    """A forward pass of exactly T plain iterations returning z_T: `Iterate.exactly(T)` (the studies call that
    directly; this name stays for callers of the earlier helper)."""
    return Iterate.exactly(int(T))


def scale_recurrent_weights(m: Map, scale: float, keys: Sequence[str] = RECURRENT_WEIGHTS) -> Map:
    """The slot attention map with the recurrent weights (GRU hidden, query, last MLP layer) times `scale`.

    scale < 1 shrinks those weights' share of J = df/dz and usually lowers rho(J); it does not bound it (the
    GRU's gated carry-over of the previous slots is not scaled): measure rho(J) with fpgrad.spectral.
    """
    params = {k: (v * scale if k in keys else v) for k, v in m.params.items()}
    return m.with_params(params)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block, the previous value restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int = 3,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds (time.perf_counter) of each named call, `repeats` times, the calls taking turns (so a
    slow spell of a shared machine hits all of them alike), after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV of `rows` restricted to `columns` (floats at full precision; None and missing keys empty;
    lists joined with ';')."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            if v is None:
                cells.append("")
            elif isinstance(v, (list, tuple)):
                cells.append(";".join(repr(x) if isinstance(x, float) else str(x) for x in v))
            elif isinstance(v, float):
                cells.append(repr(v))
            else:
                cells.append(str(v))
        writer.writerow(cells)
    return buffer.getvalue()


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """`csv_text(rows, columns)` written atomically to `path`."""
    return atomic_write_text(path, csv_text(rows, columns))


def provenance_markdown(meta: Mapping[str, Any], compute_seconds: float | None = None) -> str:
    """The 'how this was made' block of a study README: the command and the versions from the runner's meta;
    compute_seconds: the run time summed over the stored rows, if the study records it."""
    versions = ", ".join(f"{name} {meta[key]}" for name, key in
                         (("Python", "python"), ("torch", "torch"), ("NumPy", "numpy"), ("SciPy", "scipy"))
                         if meta.get(key))
    lines = ["Made by:", "", "```", str(meta.get("command", "")), "```", "",
             f"- versions: {versions}; fpgrad {_fpgrad_version()}",
             f"- machine: {meta.get('platform', '?')} ({meta.get('processor', '?')})",
             f"- seed: {meta.get('seed')}; quick setting: {'yes' if meta.get('quick') else 'no'}; "
             f"configurations: {meta.get('configs', '?')}"]
    seconds = meta.get("seconds_this_run")
    if isinstance(seconds, (int, float)):
        lines.append(f"- wall time of the last invocation: {seconds:.0f} s (rows already stored by an earlier "
                     "invocation are not recomputed and not counted)")
    if compute_seconds is not None:
        lines.append(f"- compute time summed over the stored rows: {compute_seconds:.0f} s")
    return "\n".join(lines)


def _fpgrad_version() -> str:
    from . import __version__
    return __version__
