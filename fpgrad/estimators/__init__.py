"""Gradient estimators for maps iterated to a fixed point, each a small frozen config object.

Unrolled(T), Truncated(k, T), OneStep(straight_through), Neumann(k), Phantom(k, tau),
Implicit(solver, tol), FiniteDifference(): swap them by object, or by name with `get_estimator`.
Every one has the one entry point `apply(step, params, x, z0, forward, record) -> state` (Estimator); a new
estimator subclasses Estimator and implements `adjoint_vector(lin, g, record)` (the adjoint kind) or `apply`.
"""

from __future__ import annotations

import re
from typing import Union

from ._adjoint import Implicit, Neumann, Phantom, SeriesResidual
from ._base import Cost, CostRecord, Estimator, Gradient, Linearisation
from ._finite_difference import FiniteDifference
from ._native import OneStep, Truncated, Unrolled
from ._reuse import WarmStart

ESTIMATORS = {
    "unrolled": Unrolled,
    "truncated": Truncated,
    "one_step": OneStep,
    "neumann": Neumann,
    "phantom": Phantom,
    "implicit": Implicit,
    "finite_difference": FiniteDifference,
}


def get_estimator(spec: Union[str, Estimator], *, iters: int | None = None) -> Estimator:
    """An estimator from an object or a name:

    "unrolled" / "unrolled-T", "truncated-K", "one_step" (or "one-step"), "one_step_st" (straight-through),
    "neumann-K", "phantom-K" / "phantom-K-TAU", "implicit" (GMRES) or "implicit-SOLVER",
    "finite_difference". `iters` gives T for "unrolled" and "truncated-K".
    """
    if isinstance(spec, Estimator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"backward estimator must be an Estimator or a name, got {type(spec).__name__}")
    s = spec.strip().lower().replace("-", "_")
    if s in ("one_step", "onestep", "jfb"):
        return OneStep()
    if s in ("one_step_st", "one_step_straight_through"):
        return OneStep(straight_through=True)
    if s == "unrolled":
        return Unrolled(T=iters) if iters is not None else Unrolled()
    if s in ("finite_difference", "fd"):
        return FiniteDifference()
    if s == "implicit":
        return Implicit()
    m = re.fullmatch(r"implicit_(\w+)", s)
    if m:
        return Implicit(solver=m.group(1))
    m = re.fullmatch(r"truncated_(\d+)", s)
    if m:
        return Truncated(int(m.group(1)), T=iters)
    m = re.fullmatch(r"unrolled_(\d+)", s)
    if m:
        return Unrolled(T=int(m.group(1)))
    m = re.fullmatch(r"neumann_(\d+)", s)
    if m:
        return Neumann(int(m.group(1)))
    m = re.fullmatch(r"phantom(?:_(\d+))?(?:_([0-9.]+))?", s)
    if m:
        return Phantom(int(m.group(1) or 5), float(m.group(2) or 0.5))
    raise ValueError(f"unknown estimator {spec!r}; use one of: unrolled[-T], truncated-K, one_step, one_step_st, "
                     "neumann-K, phantom-K[-TAU], implicit[-gmres|bicgstab|cg_normal|cg|neumann|dense], "
                     "finite_difference")


__all__ = [
    "Cost",
    "CostRecord",
    "ESTIMATORS",
    "Estimator",
    "FiniteDifference",
    "Gradient",
    "Implicit",
    "Linearisation",
    "Neumann",
    "OneStep",
    "Phantom",
    "SeriesResidual",
    "Truncated",
    "Unrolled",
    "WarmStart",
    "get_estimator",
]
