"""Forward solve: step evaluations and seconds to a relative residual ||f(z) - z|| / ||f(z)|| <= tol for
fpgrad's forward solvers (iterate, anderson, broyden; defaults and a larger memory) and TorchDEQ's
(fixed_point_iter, anderson, broyden), on the tanh maps (rho(J) = 0.9, 0.95, 0.99 at z*) and slot attention.

Every solver gets the same counted step, the same z0 and the same stopping rule (TorchDEQ: stop_mode='rel');
the residual of the returned state is recomputed here. Time: median of interleaved repeats. One thread, float64.

--dtype float32: the maps (tuned in float64, then cast), z0 and every solver run in float32, to tol 1e-5 relative
(instead of 1e-8, two decades closer to float32's unit round-off 6e-8 than float64's tol is to its own);
error_vs_reference is against the float64 z*. Written to reports/benchmarks/float32/.

    python -m benchmarks.forward_solve [--quick] [--dtype float32]      (or: fpgrad bench forward-solve)
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor

from benchmarks import _common as C
from fpgrad.compare import relative_error
from fpgrad.jacobian import relative_residual

TOL = {torch.float64: 1e-8, torch.float32: 1e-5}


def solvers(max_iter: int, tol: float) -> dict[str, tuple[str, Callable]]:
    """name -> (library, run(step, params, x, z0) -> z)."""
    import fpgrad
    out: dict[str, tuple[str, Callable]] = {}

    def fp(method: str, **options):
        solver = fpgrad.forward.get_forward(method, tol=tol, max_iter=max_iter, **options)

        def run(step, params, x, z0):
            with C.quiet():
                return solver.solve(step, params, x, z0, check=False).z
        return run
    out["iterate"] = ("fpgrad", fp("iterate"))
    out["anderson (memory 5, default)"] = ("fpgrad", fp("anderson"))
    out["anderson (memory 10)"] = ("fpgrad", fp("anderson", memory=10))
    out["broyden (memory 30, default)"] = ("fpgrad", fp("broyden"))
    out["broyden (memory 200)"] = ("fpgrad", fp("broyden", memory=200))
    if C.have("torchdeq"):
        from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter

        def deq(solver):
            def run(step, params, x, z0):
                z, _, _ = solver(lambda z: step(params, z, x), z0, max_iter=max_iter, tol=tol, stop_mode="rel")
                return z
            return run
        out["fixed_point_iter"] = ("torchdeq", deq(fixed_point_iter))
        out["anderson (m 6, default)"] = ("torchdeq", deq(anderson_solver))
        out["broyden (full memory)"] = ("torchdeq", deq(broyden_solver))
    return out


def bench_map(tuned: C.TunedMap, z0: Tensor, tol: float, max_iter: int, repeats: int) -> list[dict]:
    count = {"steps": 0}

    def counted(params, z: Tensor, x: Tensor) -> Tensor:
        count["steps"] += 1
        return tuned.step(params, z, x)
    rows = []
    runs = solvers(max_iter, tol)
    for name, (library, run) in runs.items():
        count["steps"] = 0
        with torch.no_grad():
            z = run(counted, tuned.params, tuned.x, z0.clone())
        steps = count["steps"]
        with torch.no_grad():
            fz = tuned.step(tuned.params, z, tuned.x)
            rel = float(relative_residual(z, fz).max())
            err = relative_error(z.double().reshape(-1), tuned.ref.z.reshape(-1))
        rows.append({"library": library, "solver": name, "steps": steps, "residual": rel, "converged": rel <= tol,
                     "error_vs_reference": err})
        print(f"  {library:9s} {name:30s} steps {steps:6d} residual {rel:.1e}", file=sys.stderr, flush=True)

    def timed(run):
        def go():
            with torch.no_grad():
                run(tuned.step, tuned.params, tuned.x, z0.clone())
        return go
    times = C.interleaved_medians({k: timed(r) for k, (_, r) in runs.items()}, repeats)
    for row in rows:
        row["seconds_median"] = times[row["solver"]]["median"]
        row["seconds_samples"] = times[row["solver"]]["samples"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = C.parser("forward_solve", __doc__.splitlines()[0], dtype=True)
    p.add_argument("--n", type=int, default=None, help="tanh map size (default 2000; 300 with --quick)")
    p.add_argument("--rho", type=float, nargs="*", default=None)
    p.add_argument("--tol", type=float, default=None, help="relative residual (default 1e-8; float32 1e-5)")
    args = p.parse_args(argv)
    run = C.Run("forward_solve", args)
    dtype = run.dtype
    args.tol = args.tol if args.tol is not None else TOL[dtype]
    n = args.n or (300 if args.quick else 2000)
    rhos = args.rho or ([0.95] if args.quick else [0.9, 0.95, 0.99])
    reps = C.repeats(args, full=3, quick=3)
    max_iter = 5000
    maps = []
    for rho in rhos:
        tuned = C.tanh_at_rho(n, rho, seed=args.seed).to(dtype)
        maps.append((f"tanh rho={rho}", tuned, torch.zeros_like(tuned.z)))
    sa = C.slot_attention_map(dim=32 if args.quick else 64, num_slots=4 if args.quick else 5,
                              inputs=32 if args.quick else 64, batch=1 if args.quick else 8, seed=args.seed).to(dtype)
    maps.append(("slot attention", sa, sa.info.pop("z0")))
    results = {"tol": args.tol, "max_iter": max_iter, "maps": [], "reference_dtype": "float64"}
    for label, tuned, z0 in maps:
        print(f"{label}: n={tuned.n}, rho(J)={tuned.rho:.4f}", file=sys.stderr, flush=True)
        rows = bench_map(tuned, z0, args.tol, max_iter, reps)
        results["maps"].append({"label": label, "map": tuned.name, "n": tuned.n, "batch": int(tuned.z.shape[0]),
                                "rho": tuned.rho, "info": tuned.info, "rows": rows})
        C.table([{**r, "seconds": C.fmt(r["seconds_median"]), "residual": C.fmt(r["residual"])} for r in rows],
                 ["library", "solver", "steps", "residual", "converged", "seconds"],
                 f"{label}: n={tuned.n}, batch {int(tuned.z.shape[0])}, rho(J)={tuned.rho:.4f}, tol {args.tol:g}")
    run.save(results, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
