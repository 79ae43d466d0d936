"""Matrix-free batched solvers of (I - M) u = b, the adjoint system of a fixed point (M = J^T: VJPs).

Every solver is a small frozen config object (GMRES(restart=50), BiCGSTAB(), CG(), NormalCG(), NeumannSeries(),
Dense(), GCRODR(k=10), and MixedPrecision(GMRES(), dtype=torch.float32), which wraps another) whose capabilities
are class attributes (`preconditionable`, `needs_transpose`, `symmetric_only`, `recycles`, `iterative`,
`lowers_precision`). `compute(M, b, *, x0, MT, preconditioner, state)` returns a LinearSolution with a per-sample
status and never warns; `solve(..., throw=True)` is `compute` followed by fpgrad.results.report. b: [B, n], one
independent system per row. Names ("gmres", "dense", ...) are shorthand: `get_solver(name, **options)`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from ..errors import SingularSystemError
from ..results import LinearSolution, Status
from ._bicgstab import BiCGSTAB
from ._cg import CG
from ._common import AbstractSolver, LinearSolver
from ._dense import Dense
from ._gcrodr import GCRODR
from ._gmres import GMRES
from ._mixed import MixedPrecision
from ._neumann import NeumannSeries
from ._normal_cg import NormalCG
from ._recycle import RecycleSpace

SOLVERS: dict[str, type[LinearSolver]] = {
    "neumann": NeumannSeries,
    "cg": CG,
    "cg_normal": NormalCG,
    "gmres": GMRES,
    "bicgstab": BiCGSTAB,
    "dense": Dense,
    "gcrodr": GCRODR,
}


def get_solver(name: str | AbstractSolver, **options: Any) -> AbstractSolver:
    """A solver from its name ("neumann" | "cg" | "cg_normal" | "gmres" | "bicgstab" | "dense" |
    "gcrodr") and options, e.g. get_solver("gcrodr", k=10, tol=1e-8); a solver object is returned as it is
    (with `options` replaced)."""
    if isinstance(name, AbstractSolver):
        return dataclasses.replace(name, **options) if options else name
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown linear solver {name!r}; choose one of {', '.join(SOLVERS)}")
    cls = SOLVERS[name]
    try:
        return cls(**options)
    except TypeError as error:
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise TypeError(f"{name}: {error}; its options are {fields}") from None


def __getattr__(name: str):
    if name == "Neumann":
        warnings.warn("fpgrad.linsolve.Neumann is renamed NeumannSeries (fpgrad.estimators.Neumann is the truncated "
                      "series estimator); the old name will be removed", DeprecationWarning, stacklevel=2)
        return NeumannSeries
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AbstractSolver",
    "BiCGSTAB",
    "CG",
    "Dense",
    "GCRODR",
    "GMRES",
    "LinearSolution",
    "LinearSolver",
    "MixedPrecision",
    "NeumannSeries",
    "NormalCG",
    "RecycleSpace",
    "SOLVERS",
    "SingularSystemError",
    "Status",
    "get_solver",
]
