"""Adjoint error against the float64 u_ref by iteration budget, in float32 and float64, at tanh n=2000 rho 0.99
(the hardest float64 map): where GMRES, BiCGSTAB and TorchDEQ Broyden level off. Not a registered benchmark.

    PYTHONPATH=. python reports/benchmarks/float32/gmres_probe.py      (about 3 minutes; writes gmres_probe.json)
"""
import sys

import torch

from benchmarks import _common as C
from benchmarks import adjoint_solve as A

C.setup(1)
C.WRITE_CACHE["on"] = False
t64 = C.tanh_at_rho(2000, 0.99, seed=0)
out = {"map": t64.name, "rho": t64.rho, "rows": [],
       "command": "PYTHONPATH=. python reports/benchmarks/float32/gmres_probe.py"}
sol = {s.library + " " + s.name: s for s in A.solvers(200)}
names = ["fpgrad gmres (restart = budget)", "fpgrad gmres (restart 200)", "fpgrad gmres (restart 30, default)",
         "scipy gmres", "torchdeq broyden", "fpgrad bicgstab"]
for dtype in (torch.float32, torch.float64):
    p = A.make_problem(t64.to(dtype), 0)
    for name in names:
        for b in (100, 150, 200, 300, 400, 600):
            e = A._evaluate(sol[name], p.jac, p.g, p.u_ref, b)
            out["rows"].append({"dtype": C.dtype_name(dtype), "solver": name, "budget": b, "error": e["error"],
                                "vjps": e["vjps"]})
            print(C.dtype_name(dtype), name, b, f"{e['error']:.2e}", e["vjps"], file=sys.stderr, flush=True)
C.write_json(C.REPORTS / "float32" / "gmres_probe.json", out)
