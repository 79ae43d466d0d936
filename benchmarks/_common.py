"""What every benchmark shares: the run's record (machine, versions, seeds, threads, load), timing, the tanh
maps tuned to a spectral radius, and tables. The Jacobian at z* (counted products), the relative error and the
cosine, the CostRecord counters and the atomic JSON writer are the library's (fpgrad.jacobian, fpgrad.compare,
fpgrad.estimators, fpgrad._io).

Numbers flow one way: a benchmark computes its rows and its targets, `save` writes them to
`reports/benchmarks/NAME.json`, and `benchmarks.targets` turns the JSON files into the README.

dtype: maps are built, tuned and referenced in float64 (DTYPE). A benchmark that takes `--dtype` (see
`parser(..., dtype=True)`) casts its maps, inputs and peers' inputs to `Run.dtype` with `TunedMap.to` /
`cast_map` and compares the result against the float64 references; a float32 run writes
`reports/benchmarks/float32/NAME.json` by default and its JSON's "dtype" says which it was.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fpgrad._io import atomic_write_text, write_json
from fpgrad.jacobian import Jacobian

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports" / "benchmarks"
DTYPE = torch.float64                 # the references' dtype (tuning, dense solves, exact gradients)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    """The dtype a run computes in: --dtype where the benchmark takes it, float64 otherwise."""
    return DTYPES[getattr(args, "dtype", None) or "float64"]


def out_dir(dtype: torch.dtype = DTYPE) -> Path:
    """Where a run in `dtype` writes by default: reports/benchmarks (float64), reports/benchmarks/float32."""
    return REPORTS if dtype == torch.float64 else REPORTS / dtype_name(dtype)


# ---- the run's record -------------------------------------------------------------------------------

def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:   # noqa: BLE001 - not installed, or no metadata
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """Machine, versions and threading of this run (recorded in every JSON)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": {name: _version(name) for name in
                     ("fpgrad", "torch", "numpy", "scipy", "torchdeq", "torchopt", "optree")},
        "git": _git(),
        "load_average_start": load_average(),
    }


def setup(threads: int = 1) -> None:
    """One thread for timing (stated in every JSON), deterministic algorithms where torch has them."""
    torch.set_num_threads(threads)


@dataclass
class Run:
    """A benchmark run: its name, arguments, seeds and start time; `save` writes it with its results."""

    name: str
    args: argparse.Namespace
    started: float = field(default_factory=time.perf_counter)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        setup(self.args.threads)
        WRITE_CACHE["on"] = not self.args.quick
        self.info = machine_info(self.args.threads)

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.args)

    def save(self, results: Mapping[str, Any], targets: Sequence[Mapping[str, Any]] = ()) -> Path:
        """Write reports/benchmarks[/float32]/NAME.json atomically: run record + results + targets."""
        self.info["load_average_end"] = load_average()
        payload = {
            "benchmark": self.name,
            "command": f"python -m benchmarks.{self.name} " + " ".join(sys.argv[1:]),
            "quick": bool(self.args.quick),
            "seed": self.args.seed,
            "dtype": dtype_name(self.dtype),
            "threads": self.args.threads,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self.started, 1),
            "machine": self.info,
            "targets": list(targets),
            "results": results,
        }
        out = Path(self.args.out) if self.args.out else out_dir(self.dtype) / f"{self.name}.json"
        write_json(out, payload)
        print(f"wrote {out} ({payload['seconds']} s, load average {self.info['load_average_start']} -> "
              f"{self.info['load_average_end']})")
        return out


def parser(name: str, description: str, dtype: bool = False) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick, --out, --seed, --repeats, --threads; with dtype=True also
    --dtype {float64,float32} (only for benchmarks that honour it: the others stay float64 and say so)."""
    p = argparse.ArgumentParser(prog=f"fpgrad bench {name.replace('_', '-')}", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute (a smoke run, not a result)")
    p.add_argument("--out", default=None, help=f"JSON path (default reports/benchmarks/{name}.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (median is reported; >= 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 for the recorded timings)")
    if dtype:
        p.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                       help="dtype of the maps, inputs and peers (references stay float64); float32 writes "
                            "reports/benchmarks/float32/NAME.json by default")
    return p


def repeats(args: argparse.Namespace, full: int = 5, quick: int = 3) -> int:
    r = args.repeats if args.repeats is not None else (quick if args.quick else full)
    return max(3, int(r))


# ---- JSON -----------------------------------------------------------------------------------------------

def load(name: str, out_dir: Path = REPORTS) -> dict[str, Any] | None:
    path = out_dir / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# ---- tables ---------------------------------------------------------------------------------------------

def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None,
          formats: Mapping[str, Any] | None = None) -> str:
    """A Markdown table (fpgrad.report.markdown_table), printed and returned."""
    from fpgrad.report import markdown_table
    text = markdown_table(rows, columns, formats)
    if title:
        text = f"\n### {title}\n\n{text}"
    print(text)
    return text


def target(name: str, met: bool | None, value: Any, threshold: str, detail: str = "", bound: str = "") -> dict:
    """One row of the targets table. met=None: not measured in this run (e.g. a peer is missing)."""
    return {"target": name, "met": met, "value": value, "threshold": threshold, "detail": detail, "bound": bound}


# ---- timing ---------------------------------------------------------------------------------------------

def clock() -> float:
    return time.perf_counter()


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Time every function `repeats` times, round-robin (so load drift hits all alike); medians and samples."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            samples[k].append(clock() - t0)
    return {k: {"median": statistics.median(v), "min": min(v), "samples": v} for k, v in samples.items()}


# TorchOpt 0.7.3 calls functorch.vjp, deprecated since torch 2.0: one FutureWarning per call
warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)


@contextlib.contextmanager
def quiet():
    """Silence warnings (the benchmark records what each call returned or flagged by other means)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- maps -----------------------------------------------------------------------------------------------

@dataclass
class TunedMap:
    """A map at its fixed point z* with the measured rho(J) there.   z: [B, ...], x: [B, ...]."""

    name: str
    step: Callable
    params: dict[str, Tensor]
    x: Tensor
    z: Tensor
    rho: float
    info: dict[str, Any] = field(default_factory=dict)

    reference: TunedMap | None = None    # the float64 map this one was cast from (None: it is the reference)

    @property
    def n(self) -> int:
        return int(self.z[0].numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.z.dtype

    @property
    def ref(self) -> TunedMap:
        """The float64 map references are computed from (self when it is float64)."""
        return self.reference if self.reference is not None else self

    def to(self, dtype: torch.dtype) -> TunedMap:
        """This map with params, x, z* (and a stored z0) cast to dtype; references stay with the float64 one.
        z* stays the float64 fixed point rounded: the float32 map's own fixed point differs by round-off."""
        if dtype == self.dtype:
            return self
        info = {k: (v.to(dtype) if isinstance(v, Tensor) else v) for k, v in self.info.items()}
        return TunedMap(self.name, self.step, {k: v.to(dtype) for k, v in self.params.items()}, self.x.to(dtype),
                        self.z.to(dtype), self.rho, {**info, "dtype": dtype_name(dtype), "tuned_in": "float64"},
                        reference=self.ref)


def cast_map(m, dtype: torch.dtype):
    """An fpgrad.maps Map built in float64 (the same draws as the float64 run) with its params cast to dtype."""
    return m if dtype == torch.float64 else m.with_params({k: v.to(dtype) for k, v in m.params.items()})


def _tanh_fixed_point(m, x: Tensor) -> Tensor:
    import fpgrad
    with quiet():
        sol = fpgrad.solve(m, x, method="broyden", tol=1e-13, max_iter=20000, memory=200)
        if not bool(sol.converged.all()):
            sol = fpgrad.solve(m, x, z0=sol.z, method="anderson", tol=1e-13, max_iter=20000, memory=20)
    if not bool(sol.converged.all()):
        raise RuntimeError(f"tanh map: forward solve did not converge: {sol.message}")
    return sol.z


def tanh_jacobian(params: Mapping[str, Tensor], z: Tensor, x: Tensor) -> Tensor:
    """J = diag(1 - f^2) W at z for the tanh map (closed form), [B, n, n]."""
    from fpgrad.maps.toy import _tanh_step
    f = _tanh_step(params, z, x)
    return (1 - f ** 2).unsqueeze(2) * params["W"]


RADIUS_CACHE = REPORTS / "_tanh_radius_cache.json"
WRITE_CACHE = {"on": True}      # quick (smoke) runs read the cache but never write it


def tanh_at_rho(n: int, rho: float, seed: int = 0, input_seed: int = 1, tol: float = 1e-3,
                max_evals: int = 12) -> TunedMap:
    """fpgrad.maps.tanh_rnn(n, s, seed) with W's radius s tuned (regula falsi, Illinois) so that the spectral
    radius of J = diag(1 - z*^2) W at the fixed point is `rho` (within tol), measured densely each time.

    W = s W1 with W1 the radius-1 matrix of tanh_rnn(n, 1, seed): the same draws as tanh_rnn(n, s, seed).
    x ~ N(0, I) [1, n] from input_seed.
    """
    import fpgrad
    base = fpgrad.maps.tanh_rnn(n, 1.0, seed=seed)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(input_seed), dtype=DTYPE)
    cache: dict[float, tuple[float, Tensor]] = {}

    def measure(s: float) -> float:
        params = dict(base.params)
        params["W"] = base.params["W"] * s
        z = _tanh_fixed_point(base.with_params(params), x)
        value = float(torch.linalg.eigvals(tanh_jacobian(params, z, x)[0]).abs().max())
        cache[s] = (value, z)
        return value

    # a radius tuned by an earlier run is re-measured, and used if it still gives rho within tol
    key = f"n={n} seed={seed} input_seed={input_seed} rho={rho}"
    cached = json.loads(RADIUS_CACHE.read_text()) if RADIUS_CACHE.exists() else {}
    if key in cached and abs(measure(float(cached[key])) - rho) <= tol:
        return _tuned(base, x, cache, rho, n, seed, input_seed, key, from_cache=True)
    # rho(J) grows with s (slower than s: tanh saturates); bracket, then Illinois false position
    lo, hi = 1.0, 1.0 + 1.2 * (rho - 0.6)
    f_lo, f_hi = measure(lo) - rho, measure(hi) - rho
    while f_lo > 0:
        hi, f_hi = lo, f_lo
        lo *= 0.8
        f_lo = measure(lo) - rho
    while f_hi < 0:
        lo, f_lo = hi, f_hi
        hi *= 1.1
        f_hi = measure(hi) - rho
    side = 0
    for _ in range(max_evals):
        s = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        fs = measure(s) - rho
        if abs(fs) <= tol:
            break
        if fs < 0:
            lo, f_lo = s, fs
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = s, fs
            if side == 1:
                f_lo /= 2
            side = 1
    return _tuned(base, x, cache, rho, n, seed, input_seed, key, from_cache=False)


def _tuned(base, x, cache, rho, n, seed, input_seed, key, from_cache: bool) -> TunedMap:
    from fpgrad.maps.toy import _tanh_step
    best = min(cache, key=lambda k: abs(cache[k][0] - rho))
    value, z = cache[best]
    params = dict(base.params)
    params["W"] = base.params["W"] * best
    if not from_cache and WRITE_CACHE["on"]:
        stored = json.loads(RADIUS_CACHE.read_text()) if RADIUS_CACHE.exists() else {}
        stored[key] = best
        atomic_write_text(RADIUS_CACHE, json.dumps(stored, indent=1, sort_keys=True) + "\n")
    return TunedMap(f"tanh n={n} rho={rho}", _tanh_step, params, x, z, value,
                    {"n": n, "target_rho": rho, "W_radius": best, "seed": seed, "input_seed": input_seed,
                     "evaluations": len(cache), "radius_from_cache": from_cache})


def slot_attention_map(dim: int = 64, num_slots: int = 5, inputs: int = 64, batch: int = 1, seed: int = 0,
                       max_rho: float | None = 0.95, tries: int = 20) -> TunedMap:
    """Slot attention (float64, random init) at its fixed point: the first seed from `seed` on whose rho(J)
    at z* is below max_rho (contractive), measured densely; max_rho=None takes `seed` as it is."""
    import fpgrad
    last = None
    for s in range(seed, seed + tries):
        m = fpgrad.maps.slot_attention(dim=dim, num_slots=num_slots, seed=s, dtype=DTYPE)
        g = torch.Generator().manual_seed(1000 + s)
        x = torch.randn(batch, inputs, dim, generator=g, dtype=DTYPE)
        with quiet():
            z0 = m.init_state(x, g)
            sol = fpgrad.solve(m, x, z0=z0, method="anderson", tol=1e-13, max_iter=5000, memory=10)
        if not bool(sol.converged.all()):
            continue
        rho = float(torch.linalg.eigvals(Jacobian(m.step, m.params, x, sol.z).dense()).abs().amax())
        last = TunedMap(f"slot attention d={dim} K={num_slots} N={inputs}", m.step, dict(m.params), x, sol.z, rho,
                        {"dim": dim, "num_slots": num_slots, "inputs": inputs, "batch": batch, "seed": s,
                         "z0": z0})
        if max_rho is None or rho < max_rho:
            return last
    raise RuntimeError(f"no slot attention seed in [{seed}, {seed + tries}) is contractive (rho < {max_rho}); "
                       f"last rho {last.rho if last else 'n/a'}")


# ---- peers ----------------------------------------------------------------------------------------------

def peer_versions() -> dict[str, str | None]:
    return {"torchdeq": _version("torchdeq"), "torchopt": _version("torchopt")}


def have(module: str) -> bool:
    try:
        __import__(module)
    except Exception:   # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def fmt(value: Any, digits: int = 3) -> str:
    """A short number for tables and target text."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def iter_chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
