"""Forward solvers of z = f(z): plain iteration, Anderson acceleration, Broyden's method; `solve_detached`, the
solve as a constant of the autograd graph (vmap-safe), which the estimators build on."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .._checks import check_map
from ..maps import Map
from ._anderson import Anderson
from ._broyden import Broyden, LowRankInverse
from ._common import FixedPoint, ForwardSolver, contraction_estimate, default_tolerance
from ._detached import solve_detached
from ._iterate import Iterate

FORWARD_SOLVERS = {"iterate": Iterate, "anderson": Anderson, "broyden": Broyden}


def get_forward(method: Union[str, ForwardSolver, None] = "anderson", **options) -> ForwardSolver:
    """A forward solver from its name ("iterate" | "anderson" | "broyden") or a solver object."""
    if method is None:
        method = "anderson"
    if isinstance(method, ForwardSolver):
        if options:
            from dataclasses import replace
            return replace(method, **options)
        return method
    if not isinstance(method, str) or method not in FORWARD_SOLVERS:
        raise ValueError(f"unknown forward method {method!r}; choose one of {sorted(FORWARD_SOLVERS)}")
    return FORWARD_SOLVERS[method](**options)


def is_batched(m: Map, z: Tensor) -> bool:
    """Whether z carries a leading batch dim, as the map judges it (`Map.is_batched`: from its event_ndim, or
    inferred from the state when event_ndim is None)."""
    return m.is_batched(z)


def solve(m: Map, x: Tensor, z0: Tensor | None = None, method: Union[str, ForwardSolver] = "anderson",
          tol: float | None = None, max_iter: int = 200, *, atol: float = 0.0, damping: float = 0.0,
          throw: bool = False, generator: torch.Generator | None = None, **options) -> FixedPoint:
    """Solve z = m.step(m.params, z, x) from z0 (default: m.init_state(x, generator)).

    tol: relative tolerance; None: one the map's dtype can reach (1e-6 in float64, 1e-5 in float32, 1e-2 in
    bfloat16 / float16: fpgrad.forward.default_tolerance).
    Returns FixedPoint(z, steps, residuals, converged, ...). A sample that does not converge is
    reported in `converged` and warned about (ConvergenceWarning); throw=True raises ConvergenceError.
    """
    check_map(m, "fpgrad.solve")
    if isinstance(method, ForwardSolver):
        solver = method
    else:
        solver = get_forward(method, tol=tol, max_iter=max_iter, atol=atol, damping=damping, throw=throw,
                             **options)
    if z0 is None:
        with torch.no_grad():
            z0 = m.init_state(x, generator)
    return solver.solve(m.step, m.params, x, z0, batched=is_batched(m, z0))


__all__ = [
    "Anderson",
    "Broyden",
    "FixedPoint",
    "ForwardSolver",
    "FORWARD_SOLVERS",
    "default_tolerance",
    "Iterate",
    "LowRankInverse",
    "contraction_estimate",
    "get_forward",
    "is_batched",
    "solve",
    "solve_detached",
]
