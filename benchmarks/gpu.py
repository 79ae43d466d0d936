"""GPU check: the CUDA tests and the device gradient tests, then fpgrad against TorchDEQ and TorchOpt in float32.

With CUDA (about 8 minutes on one GPU): pytest `-k cuda` and tests/test_gpu_gradients.py with
FPGRAD_TEST_DEVICE=cuda (subprocesses); on slot attention (batch 64 and 256, N 1024, D 128, K 7) and a tanh map
(n 4096, batch 64): forward solve to 1e-4, adjoint solve to 1e-4 (smallest budget of a doubling ladder), the
end-to-end training step (seconds, peak memory), peak memory of unrolled / one-step / implicit at T = 10 and 100,
and host synchronisations per solver iteration (torch.cuda.set_sync_debug_mode("warn")). Writes
reports/benchmarks/gpu/*.json and reports/benchmarks/gpu/README.md.
Without CUDA (or with --dry-run) it runs the same sections on CPU at tiny sizes in under a minute, skips the
test subprocesses, counts the calls that would sync (benchmarks._sync), and writes under
reports/benchmarks/gpu/dry-run/ unless --out is given.

    python -m benchmarks.gpu [--dry-run] [--out DIR] [--skip-tests] [--budget-seconds 420]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks import _common as C
from benchmarks._sync import syncs_per_iteration
from fpgrad._io import jsonable
from fpgrad.compare import relative_error

DTYPE = torch.float32
TOL = 1e-4
# in the order they run: what the GPU target needs first, so that a run cut short by its budget keeps it
SECTIONS = ("tests", "end_to_end", "profile", "syncs", "check_every", "memory", "forward", "adjoint")
CHECK_PERIODS = (1, 2, 4, 8, 16)


@dataclass
class Case:
    """A map on the device at float32: step, params, inputs x [B, ...], initial state z0 [B, ...]."""

    name: str
    step: Callable
    params: dict[str, Tensor]
    x: Tensor
    z0: Tensor
    info: dict[str, Any]


@dataclass
class Settings:
    device: torch.device
    dry_run: bool
    repeats: int
    max_iter: int
    budgets: tuple[int, ...]
    Ts: tuple[int, ...]


def slot_case(batch: int, inputs: int, dim: int, slots: int, device: torch.device, seed: int,
              tries: int = 10) -> Case:
    """Slot attention at random init whose forward converges for every sample: the first parameter seed from
    `seed` on with Anderson reaching 1e-5 within 300 iterations on all `batch` inputs (random inits at D = 128
    often leave a few samples non-contractive, and then every solver runs to its cap and the timings compare
    caps, not tolerances); else the seed with the most samples converged, recorded in info."""
    import fpgrad
    best = None
    for s in range(seed, seed + tries):
        m = fpgrad.maps.slot_attention(dim=dim, num_slots=slots, seed=s, dtype=DTYPE, device=device)
        gen = torch.Generator().manual_seed(s + 1)
        x = torch.randn(batch, inputs, dim, generator=gen, dtype=DTYPE).to(device)
        z0 = m.init_state(x, gen).detach()
        with C.quiet():
            r = fpgrad.forward.get_forward("anderson", tol=1e-5, max_iter=300).solve(m.step, dict(m.params), x, z0,
                                                                                    check=False)
        converged = float(r.converged.float().mean())
        if best is None or converged > best[0]:
            best = (converged, s, m, x, z0)
        if converged == 1.0:
            break
    converged, s, m, x, z0 = best
    return Case(f"slot attention B={batch} N={inputs} D={dim} K={slots}", m.step, dict(m.params), x, z0,
                {"map": "slot_attention", "batch": batch, "N": inputs, "D": dim, "K": slots, "seed": s,
                 "fraction_converged_1e-5": converged})


def tanh_case(n: int, batch: int, device: torch.device, seed: int, rho: float = 0.9) -> Case:
    import fpgrad
    m = fpgrad.maps.tanh_rnn(n=n, spectral_radius=rho, seed=seed, dtype=DTYPE, device=device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n, generator=gen, dtype=DTYPE).to(device)
    return Case(f"tanh n={n} B={batch} rho={rho}", m.step, dict(m.params), x, torch.zeros(batch, n, dtype=DTYPE,
                device=device), {"map": "tanh", "n": n, "batch": batch, "rho": rho})


def cases(s: Settings, seed: int) -> list[Case]:
    if s.dry_run:
        return [slot_case(2, 16, 8, 3, s.device, seed), tanh_case(32, 2, s.device, seed)]
    return [slot_case(64, 1024, 128, 7, s.device, seed), slot_case(256, 1024, 128, 7, s.device, seed),
            tanh_case(4096, 64, s.device, seed)]


# ---- timing and memory --------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], s: Settings) -> dict[str, Any]:
    """Median seconds of `repeats` calls after one warm-up (synchronised on CUDA), and the peak memory of one
    call (torch.cuda.max_memory_allocated above what was allocated before it; None on CPU)."""
    with C.quiet():
        fn()
        _sync(s.device)
        peak = None
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
            before = torch.cuda.memory_allocated(s.device)
            fn()
            _sync(s.device)
            peak = torch.cuda.max_memory_allocated(s.device) - before
        samples = []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            fn()
            _sync(s.device)
            samples.append(time.perf_counter() - t0)
    return {"seconds_median": statistics.median(samples), "seconds_samples": samples, "peak_bytes": peak}


def _relative_residual(case: Case, z: Tensor) -> float:
    with torch.no_grad():
        fz = case.step(case.params, z, case.x)
        B = z.shape[0]
        return float(((fz - z).reshape(B, -1).norm(dim=1) / fz.reshape(B, -1).norm(dim=1)).max())


# ---- sections -------------------------------------------------------------------------------------------------

def run_tests(s: Settings, budget: float) -> dict:
    """pytest -k cuda over tests/, and tests/test_gpu_gradients.py on the GPU (subprocesses, their summaries)."""
    commands = {"cuda_marked": [sys.executable, "-m", "pytest", "tests", "-k", "cuda", "-q", "-rfEs",
                                "-p", "no:cacheprovider"],
                "gpu_gradients": [sys.executable, "-m", "pytest", "tests/test_gpu_gradients.py", "-q", "-rfEs",
                                  "-p", "no:cacheprovider"]}
    if s.dry_run:
        return {name: {"command": " ".join(cmd[1:]), "status": "skipped (dry run: no CUDA)"}
                for name, cmd in commands.items()}
    out = {}
    for name, cmd in commands.items():
        env = dict(os.environ, FPGRAD_TEST_DEVICE="cuda")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True,
                                  timeout=min(180.0, max(30.0, budget / 3)))
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
            out[name] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                         "status": "passed" if proc.returncode == 0 else "failed", "summary": tail}
        except subprocess.TimeoutExpired:
            out[name] = {"command": " ".join(cmd[1:]), "status": "timed out"}
        out[name]["seconds"] = time.perf_counter() - t0
        print(f"  tests {name}: {out[name]['status']}", flush=True)
    return out


def run_forward(case: Case, s: Settings) -> list[dict]:
    from benchmarks.forward_solve import solvers
    rows = []
    for name, (library, run) in solvers(s.max_iter, TOL).items():
        with C.quiet():
            z = run(case.step, case.params, case.x, case.z0)
        t = timed(lambda run=run: run(case.step, case.params, case.x, case.z0), s)
        rows.append({"map": case.name, "library": library, "solver": name,
                     "relative_residual": _relative_residual(case, z), **t})
    return rows


def _fixed_point(case: Case, s: Settings) -> Tensor:
    import fpgrad
    with C.quiet():
        return fpgrad.forward.get_forward("anderson", tol=TOL / 10, max_iter=s.max_iter).solve(
            case.step, case.params, case.x, case.z0, check=False).z


def run_adjoint(case: Case, s: Settings) -> list[dict]:
    """Each peer's and fpgrad's adjoint solver on (I - J^T) u = g at z*: the smallest budget of the ladder with
    relative residual <= 1e-4, its products, and its time."""
    from benchmarks.adjoint_solve import solvers
    z = _fixed_point(case, s)
    jac = C.Jacobian(case.step, case.params, case.x, z)
    B = z.shape[0]
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE).to(z.device).reshape(B, -1)
    rows = []
    for solver in solvers(restart=30):
        if solver.library == "scipy" or solver.budget_fixed or not solver.exact:
            continue
        hit = None
        for budget in s.budgets:
            if budget > solver.cap:
                break
            jac.count.reset()
            with C.quiet():
                u = solver.run(jac, g, budget)
            vjps, jvps = jac.count.vjps, jac.count.jvps
            with torch.no_grad():
                res = float((u - jac.JT(u) - g).norm() / g.norm())
            if math.isfinite(res) and res <= TOL:
                hit = {"budget": budget, "vjps": vjps, "jvps": jvps, "relative_residual": res}
                break
        row = {"map": case.name, "library": solver.library, "solver": solver.name, "reached": hit is not None}
        if hit is not None:
            row.update(hit, **timed(lambda solver=solver, b=hit["budget"]: solver.run(jac, g, b), s))
        rows.append(row)
    return rows


def _leaf(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def _end_to_end_runs(case: Case, s: Settings) -> dict[str, Callable[[], Tensor]]:
    """method -> one training step (forward to 1e-4, backward to 1e-4, loss 1/2 ||z* - t||^2) returning the
    flat gradient, through fpgrad (Implicit and OneStep) and, where installed, TorchDEQ and TorchOpt."""
    import fpgrad
    from fpgrad.estimators import Implicit, OneStep
    keys = sorted(case.params)
    target = torch.randn(case.z0.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE).to(case.z0.device)

    def loss_of(z: Tensor) -> Tensor:
        return 0.5 * ((z - target) ** 2).sum()

    def grads(loss: Tensor, params: dict[str, Tensor]) -> Tensor:
        out = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
        return torch.cat([(torch.zeros_like(params[k]) if o is None else o).reshape(-1) for k, o in zip(keys, out)])

    def fpgrad_run(backward):
        def run():
            params = _leaf(case.params)
            forward = fpgrad.forward.get_forward("anderson", tol=TOL, max_iter=s.max_iter)
            z = fpgrad.fixed_point(case.step, params, case.x, case.z0, forward=forward, backward=backward)
            return grads(loss_of(z), params)
        return run

    runs: dict[str, Callable[[], Tensor]] = {
        "fpgrad: fixed_point(anderson, Implicit(gmres))": fpgrad_run(Implicit(solver="gmres", tol=TOL,
                                                                                max_iter=s.max_iter)),
        "fpgrad: fixed_point(anderson, OneStep())": fpgrad_run(OneStep())}
    if C.have("torchdeq"):
        from torchdeq import get_deq
        deq = get_deq(core="indexing", ift=True, f_solver="anderson", b_solver="anderson", f_max_iter=s.max_iter,
                      b_max_iter=s.max_iter, f_tol=TOL, b_tol=TOL, f_stop_mode="rel", b_stop_mode="rel")

        def torchdeq_run():
            params = _leaf(case.params)
            z_out, _ = deq(lambda z: case.step(params, z, case.x), case.z0)
            return grads(loss_of(z_out[-1]), params)
        runs["torchdeq: get_deq(anderson, ift anderson)"] = torchdeq_run
    if C.have("torchopt") and C.have("torchdeq"):
        import torchopt
        from torchdeq.solver import anderson_solver

        def optimality(z, *values):
            return z - case.step(dict(zip(keys, values)), z, case.x)

        @torchopt.diff.implicit.custom_root(optimality, argnums=tuple(range(1, len(keys) + 1)),
                                            solve=torchopt.linear_solve.solve_normal_cg(rtol=TOL, maxiter=s.max_iter))
        def solve_fp(z_init, *values):
            p = dict(zip(keys, values))
            with torch.no_grad():
                z, _, _ = anderson_solver(lambda z: case.step(p, z, case.x), z_init, max_iter=s.max_iter, tol=TOL,
                                          stop_mode="rel")
            return z

        def torchopt_run():
            params = _leaf(case.params)
            return grads(loss_of(solve_fp(case.z0, *[params[k] for k in keys])), params)
        runs["torchopt: custom_root(anderson fwd, solve_normal_cg)"] = torchopt_run
    return runs


def run_end_to_end(case: Case, s: Settings) -> list[dict]:
    """One training step (forward to 1e-4, backward to 1e-4, loss 1/2 ||z* - t||^2) through each library."""
    runs = _end_to_end_runs(case, s)
    reference = None
    rows = []
    for name, run in runs.items():
        try:
            with C.quiet():
                flat = run()
        except Exception as err:   # noqa: BLE001 - a peer that fails is a row, not a crash
            rows.append({"map": case.name, "method": name, "library": name.split(":")[0], "error": repr(err)})
            continue
        reference = flat if reference is None else reference
        rows.append({"map": case.name, "method": name, "library": name.split(":")[0],
                     "difference_to_fpgrad_implicit": relative_error(flat, reference), **timed(run, s)})
    return rows


def _device_self_time(event: Any) -> float:
    """An averaged profiler event's self time on the device in microseconds (the attribute's name changed
    across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name) or 0.0)
    return 0.0


def run_profile(case: Case, s: Settings, top: int = 15) -> list[dict]:
    """Where the end-to-end time goes: torch.profiler over one training step of fpgrad's Implicit and of
    TorchDEQ's IFT (after a warm-up): operator and kernel counts, device and host time, the top operators by
    device self time (CUDA) or host self time (CPU)."""
    from torch.profiler import ProfilerActivity, profile
    runs = {k: v for k, v in _end_to_end_runs(case, s).items() if "Implicit" in k or k.startswith("torchdeq")}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    rows = []
    for name, run in runs.items():
        with C.quiet():
            run()
            _sync(s.device)
            with profile(activities=activities) as prof:
                run()
                _sync(s.device)
        events = prof.key_averages()
        dev = _device_self_time
        kernels = sum(e.count for e in events if dev(e) > 0 and not e.key.startswith(("aten::", "cuda")))

        def top_by(key, events=events, dev=dev):
            return [{"op": e.key[:80], "count": e.count, "device_self_ms": dev(e) / 1e3,
                     "host_self_ms": e.self_cpu_time_total / 1e3}
                    for e in sorted(events, key=key, reverse=True)[:top]]
        rows.append({"map": case.name, "method": name,
                     "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
                     "device_kernels": kernels, "device_self_ms": sum(dev(e) for e in events) / 1e3,
                     "host_self_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
                     "top": top_by(dev if s.device.type == "cuda" else (lambda e: e.self_cpu_time_total)),
                     "top_host": top_by(lambda e: e.self_cpu_time_total)})
    return rows


def run_memory(case: Case, s: Settings) -> list[dict]:
    """Unrolled(T) vs OneStep() vs Implicit(gmres) after exactly T forward steps: peak memory (CUDA) or the bytes
    autograd saves (CPU, saved-tensor hooks), and seconds."""
    import fpgrad
    from fpgrad.estimators import Implicit, OneStep, Unrolled
    rows = []
    for T in s.Ts:
        for label, est in (("unrolled", Unrolled(T)), ("one_step", OneStep()),
                           ("implicit", Implicit(solver="gmres", tol=TOL, max_iter=s.max_iter))):
            saved = {"bytes": 0}

            def pack(t, saved=saved):
                saved["bytes"] += t.numel() * t.element_size()
                return t

            def run(est=est, T=T):
                params = _leaf(case.params)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    z = fpgrad.fixed_point(case.step, params, case.x, case.z0,
                                           forward=fpgrad.forward.Iterate.exactly(T), backward=est)
                torch.autograd.grad(z.square().sum(), list(params.values()), allow_unused=True)
            with C.quiet():
                run()
            saved_bytes = saved["bytes"]
            rows.append({"map": case.name, "estimator": label, "T": T, "saved_bytes_upper_bound": saved_bytes,
                         **timed(run, s)})
    return rows


@contextlib.contextmanager
def _quiet_but_syncs():
    """C.quiet(), except the sync debug mode's warnings, which SyncCounter records on CUDA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", message=".*synchroniz.*")
        yield


def run_syncs(case: Case, s: Settings) -> list[dict]:
    """Host syncs per iteration of each forward solver (fpgrad's and TorchDEQ's, tol 0 so that none stops early)
    and of each of fpgrad's Krylov / Neumann adjoint solvers."""
    from benchmarks.forward_solve import solvers as forward_solvers
    from fpgrad.forward import get_forward
    from fpgrad.linsolve import get_solver
    rows = []
    for name, (library, _) in forward_solvers(10, 0.0).items():
        def run(T, name=name):
            with _quiet_but_syncs():
                forward_solvers(T, 0.0)[name][1](case.step, case.params, case.x, case.z0)
        rows.append({"map": case.name, "loop": "forward", "library": library, "solver": name,
                     **syncs_per_iteration(run, s.device)})
    # fpgrad's loops checking the host every iteration (check_every=1) beside their default on this device
    for name in ("iterate", "anderson", "broyden"):
        def run(T, name=name):
            with _quiet_but_syncs():
                get_forward(name, tol=0.0, max_iter=T, warn=False, check_every=1).solve(
                    case.step, case.params, case.x, case.z0)
        rows.append({"map": case.name, "loop": "forward", "library": "fpgrad", "solver": f"{name} check_every=1",
                     **syncs_per_iteration(run, s.device)})
    z = _fixed_point(case, s)
    jac = C.Jacobian(case.step, case.params, case.x, z)
    g = torch.ones(z.shape[0], z[0].numel(), dtype=DTYPE, device=z.device)
    for name, options in (("gmres", {}), ("gmres", {"check_every": 1}), ("bicgstab", {}),
                          ("bicgstab", {"check_every": 1}), ("cg_normal", {}), ("neumann", {})):
        def run(T, name=name, options=options):
            with _quiet_but_syncs():
                get_solver(name, tol=0.0, max_iter=T, **options).solve(
                    jac.JT, g, MT=jac.J if name == "cg_normal" else None, throw=False)
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        rows.append({"map": case.name, "loop": "adjoint", "library": "fpgrad", "solver": label,
                     **syncs_per_iteration(run, s.device)})
    return rows


def run_check_every(case: Case, s: Settings) -> list[dict]:
    """Seconds and iterations of a solve to 1e-4 at each convergence-check period (check_every = 1, 2, 4, 8, 16):
    fewer host syncs against up to k - 1 iterations past convergence. Forward: anderson and iterate; adjoint:
    GMRES (restart 30) and BiCGSTAB at z*. The default's row is marked."""
    from fpgrad._checks import check_period
    from fpgrad.forward import get_forward
    from fpgrad.linsolve import get_solver
    default = check_period(None, s.device, "benchmarks.gpu")
    rows = []
    for name in ("anderson", "iterate"):
        for k in CHECK_PERIODS:
            solver = get_forward(name, tol=TOL, max_iter=s.max_iter, warn=False, check_every=k)

            def run(solver=solver):
                return solver.solve(case.step, case.params, case.x, case.z0, check=False)
            with C.quiet():
                result = run()
            rows.append({"map": case.name, "loop": "forward", "solver": name, "check_every": k,
                         "default": k == default, "iterations": int(result.steps.max()),
                         "relative_residual": _relative_residual(case, result.z), **timed(run, s)})
    z = _fixed_point(case, s)
    jac = C.Jacobian(case.step, case.params, case.x, z)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE).to(z.device)
    g = g.reshape(z.shape[0], -1)
    for name in ("gmres", "bicgstab"):
        for k in CHECK_PERIODS:
            solver = get_solver(name, tol=TOL, max_iter=s.max_iter, check_every=k)

            def run(solver=solver):
                return solver.solve(jac.JT, g, throw=False)
            jac.count.reset()
            with C.quiet():
                u = run().u
            vjps = jac.count.vjps
            with torch.no_grad():
                res = float((u - jac.JT(u) - g).norm() / g.norm())
            rows.append({"map": case.name, "loop": "adjoint", "solver": name, "check_every": k,
                         "default": k == default, "vjps": vjps, "relative_residual": res, **timed(run, s)})
    return rows


# ---- output ---------------------------------------------------------------------------------------------------

def _fmt_bytes(v: Any) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.1f} MiB"


def readme(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown section: one table per section, from the stored results."""
    from fpgrad.report import markdown_table
    f = C.fmt
    parts = [f"## GPU check ({meta['device']}{', dry run on tiny sizes' if meta['dry_run'] else ''})", "",
             f"`{meta['command']}`, {meta['date']}, {meta['seconds']:.0f} s, float32, tolerance {TOL:g}"
             f"{', torch ' + meta['torch'] if meta.get('torch') else ''}"
             f"{', CUDA ' + meta['cuda'] if meta.get('cuda') else ''}.", ""]
    if meta.get("runs"):
        parts[-2] = f"float32, tolerance {TOL:g}; the sections come from {len(meta['runs'])} runs:"
        parts += [f"- `{r['command']}`, {r['date']}, {r['seconds']} s: {', '.join(r['sections'])}"
                  for r in meta["runs"]] + [""]
    elif meta.get("skipped_for_time"):
        parts += [f"Sections skipped when the time budget was spent: {', '.join(meta['skipped_for_time'])}.", ""]
    if "tests" in results:
        parts += ["### Tests", "", markdown_table(
            [{"suite": k, **v, "result": (v.get("summary") or [""])[-1].strip("= ")}
             for k, v in results["tests"].items()], ["suite", "status", "result", "command"]), ""]
        failed = [line for v in results["tests"].values() for line in v.get("summary") or []
                  if line.startswith(("FAILED", "ERROR"))]
        parts += [f"- {line}" for line in failed] + ([""] if failed else [])
    tables = {
        "forward": (["map", "library", "solver", "relative residual", "seconds", "peak"],
                    lambda r: {**r, "relative residual": f(r["relative_residual"]), "seconds": f(r["seconds_median"]),
                               "peak": _fmt_bytes(r["peak_bytes"])}),
        "adjoint": (["map", "library", "solver", "reached", "vjps", "jvps", "seconds"],
                    lambda r: {**r, "seconds": f(r.get("seconds_median")), "vjps": r.get("vjps", "-"),
                               "jvps": r.get("jvps", "-")}),
        "end_to_end": (["map", "method", "seconds", "peak", "difference to fpgrad implicit"],
                       lambda r: {**r, "seconds": f(r.get("seconds_median", r.get("error"))),
                                  "peak": _fmt_bytes(r.get("peak_bytes")),
                                  "difference to fpgrad implicit": f(r.get("difference_to_fpgrad_implicit"))}),
        "memory": (["map", "estimator", "T", "peak", "saved (upper bound)", "seconds"],
                   lambda r: {**r, "peak": _fmt_bytes(r["peak_bytes"]),
                              "saved (upper bound)": _fmt_bytes(r["saved_bytes_upper_bound"]),
                              "seconds": f(r["seconds_median"])}),
        "syncs": (["map", "loop", "library", "solver", "syncs / iteration", "syncs / call"],
                  lambda r: {**r, "syncs / iteration": f(r["per_iteration"]), "syncs / call": f(r["per_call"])}),
        "profile": (["map", "method", "aten ops", "device kernels", "device self ms", "host self ms",
                     "top operators"],
                    lambda r: {**r, "aten ops": r["aten_ops"], "device kernels": r["device_kernels"],
                               "device self ms": f(r["device_self_ms"]), "host self ms": f(r["host_self_ms"]),
                               "top operators": ", ".join(f"{t['op']} x{t['count']}" for t in r["top"][:5])}),
        "check_every": (["map", "loop", "solver", "check every", "iterations / VJPs", "relative residual",
                         "seconds"],
                        lambda r: {**r, "check every": f"{r['check_every']}{' (default)' if r['default'] else ''}",
                                   "iterations / VJPs": r.get("iterations", r.get("vjps")),
                                   "relative residual": f(r["relative_residual"]),
                                   "seconds": f(r["seconds_median"])}),
    }
    for name, (columns, shape) in tables.items():
        rows = [r for r in results.get(name) or [] if "error" not in r and not r.get("skipped_for_time")]
        failed = [r for r in results.get(name) or [] if "error" in r or r.get("skipped_for_time")]
        if rows or failed:
            parts += [f"### {name.replace('_', ' ')}", ""]
        if rows:
            parts += [markdown_table([shape(r) for r in rows], columns), ""]
        parts += [f"- {r['map']}: {r.get('error', 'skipped (time budget spent)')}" for r in failed]
        parts += [""] if failed else []
        if name == "end_to_end" and rows:
            parts += [end_to_end_target(rows), ""]
    return "\n".join(parts)


def end_to_end_target(rows: list[dict]) -> str:
    """The GPU target: fpgrad's end-to-end gradient time (Implicit) <= TorchDEQ's on the same map, per map."""
    lines = []
    for m in dict.fromkeys(r["map"] for r in rows):
        mine = next((r for r in rows if r["map"] == m and "Implicit" in r["method"]), None)
        peer = next((r for r in rows if r["map"] == m and r["library"] == "torchdeq"), None)
        if mine is None or peer is None:
            lines.append(f"- {m}: not measured (TorchDEQ {'absent' if peer is None else 'present'})")
            continue
        ratio = mine["seconds_median"] / peer["seconds_median"]
        lines.append(f"- {m}: fpgrad {mine['seconds_median']:.4f} s, TorchDEQ {peer['seconds_median']:.4f} s, ratio "
                     f"{ratio:.2f} ({'met' if ratio <= 1.0 else '**missed**'})")
    return "Target, fpgrad's end-to-end gradient time <= TorchDEQ's on the same map:\n\n" + "\n".join(lines)


def write(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    from fpgrad.report import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        atomic_write_text(out / f"{name}.json", json.dumps(jsonable({**meta, "section": name, "results": rows}),
                                                            indent=1) + "\n")
    atomic_write_text(out / "README.md", readme(results, meta) + "\n")
    print(f"   wrote {out}/README.md and {', '.join(f'{n}.json' for n in results)}", flush=True)


def _summary(name: str, rows: Any) -> str:
    """One short line per section for the console (the device tool returns only the output's tail)."""
    if name == "tests":
        return "; ".join(f"{k}: {v['status']}" + (f" ({v['summary'][-1]})" if v.get("summary") else "")
                         for k, v in rows.items())
    errors = sum(1 for r in rows if "error" in r)
    if name == "end_to_end":
        return "; ".join(f"{r['map'].split(' ')[0]} {r['method'].split(':')[0]} "
                         + (f"{r['seconds_median']:.4f}s" if "seconds_median" in r else "error")
                         for r in rows)
    return f"{len(rows)} rows, {errors} errors"


def _run_section(name: str, runner: Callable, the_cases: list[Case], s: Settings, started: float,
                 budget: float) -> list[dict]:
    """The section's rows over the cases; a case that raises is a row with its error (the run goes on), and the
    cases left when the budget has run out are rows marked skipped."""
    import traceback
    rows: list[dict] = []
    for case in the_cases:
        if time.perf_counter() - started > budget:
            rows.append({"map": case.name, "skipped_for_time": True})
            continue
        try:
            rows += runner(case, s)
        except Exception as err:   # noqa: BLE001 - one failing case must not lose the others' rows
            rows.append({"map": case.name, "error": repr(err),
                         "traceback": traceback.format_exc().splitlines()[-8:]})
            print(f"  {name} / {case.name}: {err!r}", flush=True)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def readme_from(folder: Path) -> str:
    """Rewrite folder/README.md from the section JSON files stored there (nothing is rerun)."""
    from fpgrad.report import atomic_write_text
    results, meta, runs = {}, None, {}
    for name in SECTIONS:
        path = folder / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            results[name] = data["results"]
            meta = meta or {k: v for k, v in data.items() if k not in ("section", "results")}
            runs.setdefault((data["command"], data["date"], round(data["seconds"])), []).append(name)
    if meta is None:
        raise SystemExit(f"benchmarks.gpu --readme-from: no section JSON in {folder}; run python -m benchmarks.gpu")
    if len(runs) > 1:               # sections stored from several runs (a lease too short for one run of all)
        meta["runs"] = [{"command": c, "date": d, "seconds": t, "sections": names} for (c, d, t), names in runs.items()]
    atomic_write_text(folder / "README.md", readme(results, meta) + "\n")
    return str(folder / "README.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no test subprocesses (automatic without "
                                                          "CUDA)")
    p.add_argument("--out", default=None, help="output folder (default reports/benchmarks/gpu, or its dry-run/)")
    p.add_argument("--skip-tests", action="store_true", help="skip the pytest subprocesses")
    p.add_argument("--only", nargs="*", choices=SECTIONS, default=None)
    p.add_argument("--budget-seconds", type=float, default=420.0,
                   help="sections and cases left when this much time has passed are skipped (and listed as skipped)")
    p.add_argument("--readme-from", default=None, metavar="DIR",
                   help="only rewrite DIR/README.md from the JSON files stored in DIR")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.readme_from:
        print(f"wrote {readme_from(Path(args.readme_from))}")
        return 0
    started = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    s = Settings(device, dry, repeats=1 if dry else 5, max_iter=50 if dry else 300,
                 budgets=(10, 40, 80) if dry else (5, 10, 20, 40, 80, 160, 320, 640),
                 Ts=(10, 100) if not dry else (3, 10))
    torch.set_num_threads(1 if dry else torch.get_num_threads())
    out = Path(args.out) if args.out else C.REPORTS / "gpu" / ("dry-run" if dry else "")
    sections = [n for n in (args.only or SECTIONS) if not (n == "tests" and args.skip_tests)]
    runners = {"forward": run_forward, "adjoint": run_adjoint, "end_to_end": run_end_to_end, "memory": run_memory,
               "syncs": run_syncs, "check_every": run_check_every, "profile": run_profile}
    results: dict[str, Any] = {}
    skipped: list[str] = []
    the_cases = cases(s, args.seed)
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)

    def meta() -> dict[str, Any]:
        return {"command": command, "device": torch.cuda.get_device_name(0) if not dry else "cpu", "dry_run": dry,
                "dtype": "float32", "tolerance": TOL, "seed": args.seed, "skipped_for_time": skipped,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": time.perf_counter() - started, "machine": C.machine_info(torch.get_num_threads()),
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "cases": [{"name": c.name, **c.info} for c in the_cases]}
    for name in sections:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_seconds:
            skipped.append(name)
            continue
        print(f"== {name} ({elapsed:.0f} s)", flush=True)
        if name == "tests":
            results[name] = run_tests(s, args.budget_seconds - elapsed)
        else:
            results[name] = _run_section(name, runners[name], the_cases, s, started, args.budget_seconds)
        print(f"   {_summary(name, results[name])}", flush=True)
        write(out, results, meta())       # after every section: a run cut short keeps what it finished
    write(out, results, meta())
    return 0


if __name__ == "__main__":
    sys.exit(main())
