"""Matrix-free batched solvers of (I - M) u = b, the adjoint system of a fixed point (M = J^T: VJPs).

Every solver is a small frozen config with one method, `solve(M, b, *, x0, MT, preconditioner, throw)`,
returning a LinearSolution. b: [B, n], one independent system per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._bicgstab import BiCGSTAB
from ._cg import CG
from ._common import LinearSolution, LinearSolver, SingularSystemError
from ._dense import Dense
from ._gcrodr import GCRODR
from ._gmres import GMRES
from ._neumann import Neumann
from ._normal_cg import NormalCG
from ._recycle import RecycleSpace

SOLVERS: dict[str, type[LinearSolver]] = {
    "neumann": Neumann,
    "cg": CG,
    "cg_normal": NormalCG,
    "gmres": GMRES,
    "bicgstab": BiCGSTAB,
    "dense": Dense,
    "gcrodr": GCRODR,
}


def get_solver(name: str, **options: Any) -> LinearSolver:
    """A solver from its name ("neumann" | "cg" | "cg_normal" | "gmres" | "bicgstab" | "dense" |
    "gcrodr") and options, e.g. get_solver("gcrodr", space=RecycleSpace(k=10), tol=1e-8)."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown linear solver {name!r}; choose one of {', '.join(SOLVERS)}")
    cls = SOLVERS[name]
    try:
        return cls(**options)
    except TypeError as error:
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise TypeError(f"{name}: {error}; its options are {fields}") from None


__all__ = [
    "BiCGSTAB",
    "CG",
    "Dense",
    "GCRODR",
    "GMRES",
    "LinearSolution",
    "LinearSolver",
    "Neumann",
    "NormalCG",
    "RecycleSpace",
    "SOLVERS",
    "SingularSystemError",
    "get_solver",
]
