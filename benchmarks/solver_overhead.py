"""Solver overhead: seconds per iteration each adjoint solver spends outside the VJP, measured with a VJP that
costs almost nothing (J^T v = d * v, a fixed diagonal with entries in [0, 0.9)), n = 2000, batch 1, 100
iterations. It is what a solver adds to every VJP on top of the map; it explains wall-time ratios when the
VJP counts are close. Median of repeats, one thread, float64.

    python -m benchmarks.solver_overhead [--quick]      (or: fpgrad bench solver-overhead)
"""

from __future__ import annotations

import statistics
import sys

import torch

from benchmarks import _common as C
from fpgrad.estimators import CostRecord


class DiagonalJacobian:
    """A stand-in for fpgrad.jacobian.Jacobian (its JT / J and CostRecord `record`) whose products are an
    elementwise product (a few microseconds)."""

    def __init__(self, n: int, seed: int):
        self.record = CostRecord()
        gen = torch.Generator().manual_seed(seed)
        self.d = 0.9 * torch.rand(1, n, generator=gen, dtype=C.DTYPE)

    def JT(self, v):
        self.record.vjps += 1
        return self.d * v

    def J(self, v):
        self.record.jvps += 1
        return self.d * v


def main(argv: list[str] | None = None) -> int:
    p = C.parser("solver_overhead", __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--iterations", type=int, default=100)
    args = p.parse_args(argv)
    run = C.Run("solver_overhead", args)
    from benchmarks.adjoint_solve import solvers
    jac = DiagonalJacobian(args.n, args.seed)
    g = torch.randn(1, args.n, generator=torch.Generator().manual_seed(args.seed + 1), dtype=C.DTYPE)
    K = args.iterations
    reps = C.repeats(args, full=7, quick=3)

    def median(fn) -> float:
        samples = []
        for _ in range(reps):
            t0 = C.clock()
            fn()
            samples.append(C.clock() - t0)
        return statistics.median(samples)
    per_vjp = median(lambda: [jac.JT(g) for _ in range(K)]) / K
    rows = []
    for s in solvers(restart=200):
        if s.budget_fixed or not s.exact:
            continue
        jac.record = CostRecord()
        with C.quiet():
            s.run(jac, g, K)
        vjps, jvps = jac.record.vjps, jac.record.jvps
        with C.quiet():
            total = median(lambda s=s: s.run(jac, g, K))
        outside = total - (vjps + jvps) * per_vjp
        rows.append({"library": s.library, "solver": s.name, "iterations": K, "vjps": vjps, "jvps": jvps,
                     "seconds": total, "us_per_iteration_outside_vjp": 1e6 * outside / K,
                     "us_per_product_outside_vjp": 1e6 * outside / max(1, vjps + jvps)})
    C.table([{**r, "us / iteration": C.fmt(r["us_per_iteration_outside_vjp"]),
              "us / product": C.fmt(r["us_per_product_outside_vjp"])} for r in rows],
            ["library", "solver", "vjps", "jvps", "us / iteration", "us / product"],
            f"Time outside the VJP, n={args.n}, {K} iterations (stand-in VJP {1e6 * per_vjp:.1f} us)")
    run.save({"n": args.n, "iterations": K, "stand_in_vjp_us": 1e6 * per_vjp, "rows": rows}, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
