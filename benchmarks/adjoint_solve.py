"""Adjoint solve: products with J and seconds to reach a relative adjoint error of 1e-4 and 1e-6, for every
fpgrad linear solver and every peer solver, all on the same counted VJP; then end to end (forward +
backward gradient) through fpgrad.fixed_point, a TorchDEQ get_deq layer and a TorchOpt custom_root solver.

The system is (I - J^T) u = g at z* (g = dL/dz*, L = 1/2 ||z* - t||^2); the error is ||u - u_ref|| / ||u_ref||
with u_ref from a dense LU solve. Each solver's cost to a target is the smallest iteration budget (found by
doubling, then bisection with log-error interpolation, to 1 iteration or 1%; 3% above 200, 5% for the
normal-CG solvers) whose solution meets it, with tolerances off (tol = 0): the least work any stopping rule
could buy. Its time is then the median of interleaved repeats of that run.
TorchDEQ's solvers are used as its backward does: the fixed-point iteration u = J^T u + g. TorchOpt's are
given A^T u = u - J^T u (the sign convention under which its Neumann series converges). scipy's GMRES gets
restart = budget (unrestarted). One thread, float64.

--dtype float32: the maps (tuned in float64), g, z0, every solver and every peer run in float32; u_ref (dense LU)
and the exact gradient stay float64, from the float64 map, and the float32 results are compared against them.
Tolerances float32 can reach: adjoint targets 1e-3 and 1e-4 (instead of 1e-4 and 1e-6; the targets are judged
at 1e-4), end to end forward tol 1e-5 and backward tol 1e-4 (instead of 1e-10 and 1e-8), and a configuration's
gradient counts as accurate at error <= 1e-3 (instead of 1e-5). Written to reports/benchmarks/float32/.

    python -m benchmarks.adjoint_solve [--quick] [--dtype float32]      (or: fpgrad bench adjoint-solve)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from benchmarks import _common as C
from fpgrad.compare import cosine, relative_error
from fpgrad.estimators import CostRecord
from fpgrad.jacobian import Jacobian

TARGETS = (1e-4, 1e-6)


@dataclass(frozen=True)
class Tolerances:
    """What a dtype can reach: the adjoint error targets (the last, tightest, is judged), the end-to-end
    forward / backward tolerances, and the gradient error under which an end-to-end configuration counts."""

    targets: tuple[float, ...]
    forward_tol: float
    backward_tol: float
    gradient_accept: float


TOLERANCES = {torch.float64: Tolerances(TARGETS, 1e-10, 1e-8, 1e-5),
              torch.float32: Tolerances((1e-3, 1e-4), 1e-5, 1e-4, 1e-3)}


@dataclass(frozen=True)
class Solver:
    """A linear solver under test: run(jac, g, budget) -> u.   budget: its own iteration count."""

    name: str
    library: str
    run: Callable[[Jacobian, Tensor, int], Tensor]
    budget_fixed: bool = False        # no iteration budget (dense)
    cap: int = 20000                  # give up beyond this budget
    exact: bool = True                # meant to solve the system (solve_cg is here to show it does not)
    note: str = ""
    coarse: float = 3.0               # search resolution above budget 200, in % (the slow solvers: 5%)


# ---- fpgrad -----------------------------------------------------------------------------------------------

def _fpgrad(name: str, **options) -> Callable:
    from fpgrad.linsolve import get_solver

    def run(jac: Jacobian, g: Tensor, budget: int) -> Tensor:
        opts = dict(options)
        if name == "gmres" and opts.get("restart") == "budget":
            opts["restart"] = budget
        if name != "dense":
            opts.update(tol=0.0, max_iter=budget)
        solver = get_solver(name, **opts)
        with C.quiet():
            sol = solver.solve(jac.JT, g, MT=jac.J if name == "cg_normal" else None, throw=False)
        if name == "dense":          # its columns are vmapped calls: count them as the solver does
            jac.record.vjps = sol.matvecs
        return sol.u
    return run


# ---- TorchDEQ: its backward iterates u = J^T u + g with a fixed-point solver ---------------------------------

def _torchdeq(name: str) -> Callable:
    def run(jac: Jacobian, g: Tensor, budget: int) -> Tensor:
        from torchdeq.solver import get_solver
        solver = get_solver(name)
        u, _, _ = solver(lambda y: jac.JT(y) + g, torch.zeros_like(g), max_iter=budget, tol=0.0, stop_mode="rel")
        return u
    return run


# ---- TorchOpt: A^T u = b with A^T u = u - J^T u ------------------------------------------------------------

def _being_differentiated(t: Tensor) -> bool:
    """t is being differentiated by a torch.func transform (not merely vmapped): a J^T product applied to it
    will be transposed once more (TorchOpt's normal CG calls torch.func.vjp on the matvec), a J product."""
    return bool(torch._C._functorch.is_gradtrackingtensor(t))


def _torchopt(name: str) -> Callable:
    def run(jac: Jacobian, g: Tensor, budget: int) -> Tensor:
        from torchopt import linear_solve

        def matvec(u: Tensor) -> Tensor:
            if _being_differentiated(u):    # TorchOpt's normal CG gets A^T by differentiating this: one more product
                jac.record.jvps += 1
            return u - jac.JT(u)
        if name == "solve_inv_ns":
            solve = linear_solve.solve_inv(ns=True, maxiter=budget)
        elif name == "solve_normal_cg":
            solve = linear_solve.solve_normal_cg(rtol=0.0, maxiter=budget)
        else:
            solve = linear_solve.solve_cg(rtol=0.0, maxiter=budget)
        return solve(matvec, g)
    return run


# ---- scipy ----------------------------------------------------------------------------------------------------

def _scipy_gmres(jac: Jacobian, g: Tensor, budget: int) -> Tensor:
    import scipy.sparse.linalg as sl
    n = g.numel()

    np_dtype = np.float32 if g.dtype == torch.float32 else np.float64

    def matvec(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np_dtype)).reshape(g.shape)
        return (t - jac.JT(t)).reshape(-1).numpy()
    op = sl.LinearOperator((n, n), matvec=matvec, dtype=np_dtype)
    u, _ = sl.gmres(op, g.reshape(-1).numpy(), rtol=0.0, atol=0.0, restart=budget, maxiter=1)
    return torch.from_numpy(u).reshape(g.shape)


def solvers(restart: int) -> list[Solver]:
    out = [
        Solver("gmres (restart = budget)", "fpgrad", _fpgrad("gmres", restart="budget"), cap=3000,
               note="unrestarted: restart set to the iteration budget"),
        Solver(f"gmres (restart {restart})", "fpgrad", _fpgrad("gmres", restart=restart), cap=6000),
        Solver("gmres (restart 30, default)", "fpgrad", _fpgrad("gmres"), cap=6000),
        Solver("bicgstab", "fpgrad", _fpgrad("bicgstab"), cap=4000, note="2 VJPs per iteration"),
        Solver("cg_normal", "fpgrad", _fpgrad("cg_normal"), cap=4096, coarse=5.0,
               note="1 VJP + 1 JVP (a backward through the stored VJP, as Implicit(solver='cg_normal')) per iteration"),
        Solver("neumann", "fpgrad", _fpgrad("neumann"), cap=20000),
        Solver("dense", "fpgrad", _fpgrad("dense"), budget_fixed=True, note="n VJPs (vmapped) + LU"),
    ]
    if C.have("torchdeq"):
        out += [Solver("fixed_point_iter", "torchdeq", _torchdeq("fixed_point_iter")),
                Solver("anderson", "torchdeq", _torchdeq("anderson"), cap=8000),
                Solver("broyden", "torchdeq", _torchdeq("broyden"), cap=3000)]
    if C.have("torchopt"):
        out += [Solver("solve_inv(ns=True)", "torchopt", _torchopt("solve_inv_ns")),
                Solver("solve_normal_cg", "torchopt", _torchopt("solve_normal_cg"), cap=4096, coarse=5.0,
                       note="each iteration 1 VJP + 1 double-backward (JVP)"),
                Solver("solve_cg", "torchopt", _torchopt("solve_cg"), cap=2000, exact=False,
                       note="CG on the non-symmetric I - J^T: shown to be wrong")]
    out.append(Solver("gmres", "scipy", _scipy_gmres, cap=3000, note="restart = budget (unrestarted)"))
    return out


# ---- cost to a target -------------------------------------------------------------------------------------

def _evaluate(solver: Solver, jac: Jacobian, g: Tensor, u_ref: Tensor, budget: int) -> dict:
    jac.record = CostRecord()
    t0 = C.clock()
    u = solver.run(jac, g, budget)
    seconds = C.clock() - t0
    err = relative_error(u.double().reshape(-1), u_ref.double().reshape(-1))
    return {"budget": budget, "error": err if math.isfinite(err) else float("inf"), "vjps": jac.record.vjps,
            "jvps": jac.record.jvps, "seconds": seconds}


def cost_to_targets(solver: Solver, jac: Jacobian, g: Tensor, u_ref: Tensor, targets=TARGETS,
                    start: int = 8, resolution: float = 0.01, floor_factor: int = 4) -> dict:
    """Smallest budget meeting each target: doubling, then bisection to max(1, resolution * budget); and the
    floor, the least error seen (one more run at floor_factor x the tightest target's budget; 0: none).

    Assumes the error decreases with the budget (true of these solvers up to round-off); every evaluation is
    kept in `evaluations` so a reader can check.
    """
    evals: dict[int, dict] = {}

    def at(b: int) -> dict:
        if b not in evals:
            evals[b] = _evaluate(solver, jac, g, u_ref, b)
        return evals[b]

    if solver.budget_fixed:
        e = at(0)
        return {"evaluations": [e], "targets": {str(t): (e if e["error"] <= t else None) for t in targets},
                "floor": {"error": e["error"], "budget": 0, "largest_budget": 0}}
    tight = min(targets)
    b = start
    while at(b)["error"] > tight and b < solver.cap:
        b = min(2 * b, solver.cap)
    found: dict[str, dict | None] = {}
    for t in sorted(targets):
        passing = [k for k, e in evals.items() if e["error"] <= t]
        if not passing:
            found[str(t)] = None
            continue
        hi = min(passing)
        failing = [k for k, e in evals.items() if e["error"] > t and k < hi]
        lo = max(failing) if failing else 0
        width = max(1, int((resolution if hi <= 200 else solver.coarse * resolution) * hi))
        while hi - lo > width:
            # the error falls about geometrically with the budget: interpolate log(error), kept inside the bracket
            e_lo, e_hi = (evals[lo]["error"] if lo in evals else 1.0), evals[hi]["error"]
            mid = (lo + hi) // 2
            if lo > 0 and 0 < e_hi < t < e_lo and math.isfinite(e_lo):
                guess = lo + (hi - lo) * math.log(e_lo / t) / math.log(e_lo / e_hi)
                mid = int(min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo)))
                mid = min(max(mid, lo + 1), hi - 1)
            if at(mid)["error"] <= t:
                hi = mid
            else:
                lo = mid
        # round-off can make the error non-monotone near the target: keep the smallest passing budget seen
        found[str(t)] = at(min(k for k, e in evals.items() if e["error"] <= t))
    # the floor: the least error seen, with one more run at 4x the budget that met the tightest target (capped);
    # where it is not met the doubling already ran to the cap. float32's round-off shows here.
    hit = found.get(str(tight))
    if hit is not None and floor_factor:
        at(min(floor_factor * hit["budget"], solver.cap))
    floor = min(evals.values(), key=lambda e: e["error"])
    return {"evaluations": [evals[k] for k in sorted(evals)], "targets": found,
            "floor": {"error": floor["error"], "budget": floor["budget"], "largest_budget": max(evals)},
            "resolution": f"1 iteration or 1% of the budget ({solver.coarse:g}% above 200)"}


# ---- the problems -------------------------------------------------------------------------------------------

@dataclass
class Problem:
    tuned: C.TunedMap           # in the run's dtype (solvers and peers use it)
    jac: Jacobian               # counted products of that map, in the run's dtype
    g: Tensor                   # the run's dtype
    u_ref: Tensor               # float64, dense LU on the float64 map
    target_z: Tensor            # the run's dtype


def make_problem(tuned: C.TunedMap, seed: int) -> Problem:
    """The adjoint system at z*: g and u_ref computed in float64 on tuned.ref, then g cast to tuned's dtype."""
    ref = tuned.ref
    B = ref.z.shape[0]
    gen = torch.Generator().manual_seed(seed + 7)
    target_z = torch.randn(ref.z.shape, generator=gen, dtype=C.DTYPE)
    g = (ref.z - target_z).reshape(B, -1)                    # dL/dz* for L = 1/2 ||z* - t||^2
    Jd = Jacobian(ref.step, ref.params, ref.x, ref.z).dense()   # [B, n, n], float64
    eye = torch.eye(Jd.shape[-1], dtype=C.DTYPE)
    u_ref = torch.linalg.solve(eye - Jd.transpose(1, 2), g.unsqueeze(2)).squeeze(2)
    jac = Jacobian(tuned.step, tuned.params, tuned.x, tuned.z)
    return Problem(tuned, jac, g.to(tuned.dtype), u_ref, target_z.to(tuned.dtype))


def adjoint_rows(problem: Problem, solver_list: list[Solver], repeats: int, targets=TARGETS) -> list[dict]:
    rows = []
    for s in solver_list:
        t0 = C.clock()
        res = cost_to_targets(s, problem.jac, problem.g, problem.u_ref, targets)
        rows.append({"solver": s.name, "library": s.library, "exact": s.exact, "note": s.note,
                     "search_seconds": C.clock() - t0, **res})
        print(f"  {s.library:9s} {s.name:28s} " + "  ".join(
            f"{t}: " + ("not reached" if r is None else f"{r['vjps']} VJP {r['jvps']} JVP")
            for t, r in res["targets"].items()), file=sys.stderr, flush=True)
    # time each solver's run at its budget for each target, interleaved
    for t in targets:
        fns = {}
        for row, s in zip(rows, solver_list, strict=True):
            hit = row["targets"][str(t)]
            if hit is not None:
                fns[row["library"] + ":" + row["solver"]] = (
                    lambda s=s, b=hit["budget"]: s.run(problem.jac, problem.g, b))
        timed = C.interleaved_medians(fns, repeats)
        for row in rows:
            hit = row["targets"][str(t)]
            key = row["library"] + ":" + row["solver"]
            if hit is not None:
                hit["seconds_median"] = timed[key]["median"]
                hit["seconds_samples"] = timed[key]["samples"]
    return rows


# ---- end to end ---------------------------------------------------------------------------------------------

def exact_gradient(problem: Problem) -> dict[str, Tensor]:
    """float64: u_ref through the float64 map's parameter VJP at its z*."""
    t = problem.tuned.ref
    u = problem.u_ref.reshape(t.z.shape)
    _, fn = torch.func.vjp(lambda p: t.step(p, t.z, t.x), t.params)
    return fn(u)[0]


def _grads(loss: Tensor, params: dict[str, Tensor], keys: list[str]) -> tuple[Tensor, ...]:
    """d loss / d params in key order; parameters the step does not use (slot init) get zeros."""
    grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
    return tuple(torch.zeros_like(params[k]) if gr is None else gr for k, gr in zip(keys, grads, strict=True))


def _leaf_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def end_to_end(problem: Problem, z0: Tensor, repeats: int, *, forward_tol: float, backward_tol: float,
               restart: int, max_iter: int) -> dict:
    """Forward + backward through each library from z0, same map and loss; gradient error vs the exact one."""
    import fpgrad
    from fpgrad.estimators import Implicit
    t = problem.tuned
    keys = sorted(t.params)
    exact = exact_gradient(problem)
    exact_flat = torch.cat([exact[k].reshape(-1) for k in keys])      # float64
    target_z = problem.target_z

    def loss_of(z: Tensor) -> Tensor:
        return 0.5 * ((z - target_z) ** 2).sum()

    def fpgrad_run():
        params = _leaf_params(t.params)
        # full memory (every update kept), as TorchDEQ's Broyden: with memory 200 fpgrad drops updates past 200
        # steps and needs 277 steps at rho 0.99 where 221 suffice
        forward = fpgrad.forward.get_forward("broyden", tol=forward_tol, max_iter=max_iter, memory=max_iter)
        backward = Implicit(solver="gmres", tol=backward_tol, max_iter=max_iter, options={"restart": restart})
        z = fpgrad.fixed_point(t.step, params, t.x, z0, forward=forward, backward=backward)
        return _grads(loss_of(z), params, keys)

    def fpgrad_default_run():
        params = _leaf_params(t.params)
        z = fpgrad.fixed_point(t.step, params, t.x, z0)
        return _grads(loss_of(z), params, keys)

    runs: dict[str, Callable] = {f"fpgrad: fixed_point(broyden full memory, Implicit(gmres restart {restart}))":
                                 fpgrad_run,
                                 "fpgrad: fixed_point() defaults": fpgrad_default_run}
    if C.have("torchdeq"):
        from torchdeq import get_deq
        deq = get_deq(core="indexing", ift=True, f_solver="broyden", b_solver="broyden", f_max_iter=max_iter,
                      b_max_iter=max_iter, f_tol=forward_tol, b_tol=backward_tol, f_stop_mode="rel",
                      b_stop_mode="rel")

        def torchdeq_run():
            params = _leaf_params(t.params)
            z_out, _ = deq(lambda z: t.step(params, z, t.x), z0)
            return _grads(loss_of(z_out[-1]), params, keys)
        runs["torchdeq: get_deq(broyden, ift broyden)"] = torchdeq_run
    if C.have("torchopt") and C.have("torchdeq"):
        import torchopt
        from torchdeq.solver import broyden_solver

        def optimality(z, *param_values):
            return z - t.step(dict(zip(keys, param_values, strict=True)), z, t.x)

        def make(solve):
            @torchopt.diff.implicit.custom_root(optimality, argnums=tuple(range(1, len(keys) + 1)), solve=solve)
            def solve_fp(z_init, *param_values):
                p = dict(zip(keys, param_values, strict=True))
                with torch.no_grad():
                    z, _, _ = broyden_solver(lambda z: t.step(p, z, t.x), z_init, max_iter=max_iter, tol=forward_tol,
                                             stop_mode="rel")
                return z
            return solve_fp

        normal = make(torchopt.linear_solve.solve_normal_cg(rtol=backward_tol, maxiter=max_iter))
        neumann_k = int(math.ceil(math.log(backward_tol) / math.log(max(t.rho, 1e-3))))
        ns = make(torchopt.linear_solve.solve_inv(ns=True, maxiter=neumann_k))

        def torchopt_run(fn):
            params = _leaf_params(t.params)
            z = fn(z0, *[params[k] for k in keys])
            return _grads(loss_of(z), params, keys)
        runs["torchopt: custom_root(broyden fwd, solve_normal_cg)"] = lambda: torchopt_run(normal)
        runs[f"torchopt: custom_root(broyden fwd, solve_inv(ns, maxiter={neumann_k}))"] = lambda: torchopt_run(ns)
    rows = []
    for name, fn in runs.items():
        with C.quiet():
            grads = fn()
        flat = torch.cat([gr.reshape(-1) for gr in grads]).double()
        rows.append({"method": name, "library": name.split(":")[0], "gradient_error": relative_error(flat, exact_flat),
                     "cosine": cosine(flat, exact_flat)})
    with C.quiet():
        timed = C.interleaved_medians(runs, repeats)
    for row in rows:
        row["seconds_median"] = timed[row["method"]]["median"]
        row["seconds_samples"] = timed[row["method"]]["samples"]
    return {"rows": rows, "forward_tol": forward_tol, "backward_tol": backward_tol, "restart": restart,
            "loss": "1/2 ||z* - t||^2, t ~ N(0, I) fixed", "forward": _forward_reached(t, z0, forward_tol, max_iter)}


def _forward_reached(t: C.TunedMap, z0: Tensor, tol: float, max_iter: int) -> dict:
    """Steps and the common relative residual ||f(z) - z|| / ||f(z)|| of the forward solves the end-to-end runs use
    (fpgrad's Broyden; TorchDEQ's Broyden, inside its layer and the TorchOpt runs), outside the timing."""
    import fpgrad

    def rel(z: Tensor) -> float:
        with torch.no_grad():
            fz = t.step(t.params, z, t.x)
        return float(((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max())
    out = {}
    with C.quiet(), torch.no_grad():
        sol = fpgrad.forward.get_forward("broyden", tol=tol, max_iter=max_iter, memory=max_iter).solve(
            t.step, t.params, t.x, z0)
    out["fpgrad broyden"] = {"steps": int(sol.steps.max()), "relative_residual": rel(sol.z)}
    if C.have("torchdeq"):
        from torchdeq.solver import broyden_solver
        with C.quiet(), torch.no_grad():
            z, _, info = broyden_solver(lambda z: t.step(t.params, z, t.x), z0, max_iter=max_iter, tol=tol,
                                        stop_mode="rel")
        out["torchdeq broyden"] = {"steps": int(torch.as_tensor(info["nstep"]).max()), "relative_residual": rel(z)}
    return out


# ---- targets ------------------------------------------------------------------------------------------------

def _best(rows: list[dict], library_is_fpgrad: bool, target: float, key: str) -> dict | None:
    cands = []
    for r in rows:
        if (r["library"] == "fpgrad") != library_is_fpgrad or not r["exact"]:
            continue
        hit = r["targets"][str(target)]
        if hit is None or (key == "seconds_median" and "seconds_median" not in hit):
            continue
        value = hit["vjps"] + hit["jvps"] if key == "products" else hit[key]
        cands.append((value, r["library"] + " " + r["solver"], hit))
    return min(cands, key=lambda c: c[0]) if cands else None


def _e(t: float) -> str:
    """1e-06 -> 1e-6 (the labels the float64 README has always used)."""
    return f"{t:.0e}".replace("e-0", "e-")


def tolerances_of(results: dict) -> Tolerances:
    """The tolerances a stored run used (its JSON's results; runs before --dtype were float64)."""
    if "tolerances" in results:
        t = results["tolerances"]
        return Tolerances(tuple(t["targets"]), t["forward_tol"], t["backward_tol"], t["gradient_accept"])
    return TOLERANCES[torch.float64]


def targets_for(label: str, rows: list[dict], e2e: dict | None, tol: Tolerances = TOLERANCES[torch.float64]
                ) -> list[dict]:
    """The targets of one map, from its rows (also used by benchmarks.targets on the stored JSON).

    Adjoint: at the tightest error target (1e-6 float64, 1e-4 float32). End to end, each library's fastest
    configuration whose gradient error is <= tol.gradient_accept (1e-5 float64, 1e-3 float32) is compared."""
    out = []
    t = min(tol.targets)
    fp, peer = _best(rows, True, t, "products"), _best(rows, False, t, "products")
    if fp is None or peer is None:
        out.append(C.target(f"adjoint products to {_e(t)}, {label}", None if peer is None else False,
                            None, "<= fewest of any peer", f"fpgrad or peer did not reach {_e(t)}"))
    else:
        out.append(C.target(f"adjoint products (VJP + JVP) to {_e(t)}, {label}", fp[0] <= peer[0],
                            f"{fp[0]} vs {peer[0]}", "fpgrad best <= fewest peer",
                            f"{fp[1]}: {fp[0]}; fewest peer {peer[1]}: {peer[0]}"))
    fp, peer = _best(rows, True, t, "seconds_median"), _best(rows, False, t, "seconds_median")
    if fp is not None and peer is not None:
        ratio = fp[0] / peer[0]
        out.append(C.target(f"adjoint time to {_e(t)}, {label}", ratio <= 1.0, round(ratio, 3), "<= 1.0",
                            f"{fp[1]} {C.fmt(fp[0])} s vs fastest peer {peer[1]} {C.fmt(peer[0])} s"))
    if e2e is not None:
        fp_rows = [r for r in e2e["rows"] if r["library"] == "fpgrad"]
        fp_row = min([r for r in fp_rows if r["gradient_error"] <= tol.gradient_accept] or fp_rows,
                     key=lambda r: r["seconds_median"])
        for lib in ("torchdeq", "torchopt"):
            peers = [r for r in e2e["rows"] if r["library"] == lib]
            if not peers:
                out.append(C.target(f"end-to-end gradient time vs {lib}, {label}", None, None, "<= 1.0",
                                    f"{lib} not installed"))
                continue
            accurate = [r for r in peers if r["gradient_error"] <= tol.gradient_accept] or peers
            best = min(accurate, key=lambda r: r["seconds_median"])
            ratio = fp_row["seconds_median"] / best["seconds_median"]
            out.append(C.target(
                f"end-to-end gradient time vs {lib}, {label}", ratio <= 1.0, round(ratio, 3), "<= 1.0",
                f"{fp_row['method']} {C.fmt(fp_row['seconds_median'])} s (grad err "
                f"{C.fmt(fp_row['gradient_error'])}) vs {best['method']} {C.fmt(best['seconds_median'])} s "
                f"(grad err {C.fmt(best['gradient_error'])})"))
    return out


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = C.parser("adjoint_solve", __doc__.splitlines()[0], dtype=True)
    p.add_argument("--n", type=int, default=None, help="tanh map size (default 2000; 300 with --quick)")
    p.add_argument("--rho", type=float, nargs="*", default=None, help="spectral radii of J (default 0.9 0.95 0.99)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end comparison")
    args = p.parse_args(argv)
    run = C.Run("adjoint_solve", args)
    dtype = run.dtype
    tol = TOLERANCES[dtype]
    n = args.n or (300 if args.quick else 2000)
    rhos = args.rho or ([0.95] if args.quick else [0.9, 0.95, 0.99])
    reps = C.repeats(args, full=7, quick=3)        # 3 repeats left time ratios within +-15% noise
    restart = 200 if n >= 1000 else 100
    results: dict = {"n": n, "rhos": rhos, "targets_error": list(tol.targets), "restart": restart, "maps": [],
                     "tolerances": {"targets": list(tol.targets), "forward_tol": tol.forward_tol,
                                    "backward_tol": tol.backward_tol, "gradient_accept": tol.gradient_accept},
                     "reference_dtype": "float64"}
    targets: list[dict] = []
    problems: list[tuple[str, Problem, Tensor]] = []
    for rho in rhos:
        t0 = C.clock()
        tuned = C.tanh_at_rho(n, rho, seed=args.seed)
        print(f"tanh n={n}: W radius {tuned.info['W_radius']:.4f} gives rho(J) = {tuned.rho:.4f} "
              f"({C.clock() - t0:.1f} s)", file=sys.stderr, flush=True)
        tuned = tuned.to(dtype)
        problems.append((f"tanh rho={rho}", make_problem(tuned, args.seed), torch.zeros_like(tuned.z)))
    sa = C.slot_attention_map(dim=32 if args.quick else 64, num_slots=4 if args.quick else 5,
                              inputs=32 if args.quick else 64, seed=args.seed).to(dtype)
    problems.append(("slot attention", make_problem(sa, args.seed), sa.info.pop("z0")))
    for label, problem, z0 in problems:
        tuned = problem.tuned
        print(f"{label}: n={tuned.n}, rho(J) = {tuned.rho:.4f}", file=sys.stderr, flush=True)
        rows = adjoint_rows(problem, solvers(restart), reps, tol.targets)
        e2e = None
        if not args.no_e2e:
            e2e = end_to_end(problem, z0, reps, forward_tol=tol.forward_tol, backward_tol=tol.backward_tol,
                             restart=restart, max_iter=3000)
        entry = {"label": label, "map": tuned.name, "n": tuned.n, "rho": tuned.rho, "info": tuned.info,
                 "solvers": rows, "end_to_end": e2e}
        results["maps"].append(entry)
        print_map(entry, tol.targets)
        targets += targets_for(f"{label} (rho {tuned.rho:.3f})", rows, e2e, tol)
    C.table(targets, ["target", "met", "value", "threshold", "detail"], "Targets")
    run.save(results, targets)
    return 0


def print_map(entry: dict, targets=TARGETS) -> None:
    rows = []
    for r in entry["solvers"]:
        row = {"library": r["library"], "solver": r["solver"]}
        for t in targets:
            hit = r["targets"][str(t)]
            row[f"VJP {t:g}"] = "-" if hit is None else hit["vjps"]
            row[f"JVP {t:g}"] = "-" if hit is None else hit["jvps"]
            row[f"s {t:g}"] = "-" if hit is None else C.fmt(hit.get("seconds_median"))
        row["least error"] = C.fmt(r["floor"]["error"]) if "floor" in r else "-"
        rows.append(row)
    cols = ["library", "solver"] + [f"{k} {t:g}" for t in targets for k in ("VJP", "JVP", "s")] + ["least error"]
    C.table(rows, cols, f"{entry['label']}: n={entry['n']}, rho(J)={entry['rho']:.4f}")
    if entry["end_to_end"]:
        C.table([{**r, "seconds": C.fmt(r["seconds_median"]), "grad error": C.fmt(r["gradient_error"]),
                  "cosine": C.fmt(r["cosine"], 6)} for r in entry["end_to_end"]["rows"]],
                ["method", "seconds", "grad error", "cosine"], f"{entry['label']}: end to end")


if __name__ == "__main__":
    sys.exit(main())
