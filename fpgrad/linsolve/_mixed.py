"""Mixed-precision iterative refinement: a solver that wraps another and runs its products in a lower dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_tolerance
from ..errors import DTypeError
from ..results import LinearSolution
from ._common import AbstractSolver, LinearSolver, Operator
from ._gmres import GMRES


def inner_tolerance(dtype: torch.dtype) -> float:
    """The residual reduction asked of one low-precision inner solve: 1e-4 in float32, 1e-2 in (b)float16."""
    return 1e-4 if dtype == torch.float32 else 1e-2


@dataclass(frozen=True)
class MixedPrecision(AbstractSolver):
    """Iterative refinement of (I - M) u = b with the inner solver's products in `dtype`:

        r = b - (I - M) u     in b's dtype (one matvec)
        (I - M) d = r         solved by `inner` in `dtype` to a relative residual inner_tolerance(dtype)
        u <- u + d

    until ||r|| <= tol ||b||: the accuracy reached is the full-precision residual, measured, never assumed.
    MixedPrecision(GMRES(), dtype=torch.float32, max_refinements=10) wraps GMRES as Lineax wraps Normal(CG()).
    tol / max_iter: None takes the inner solver's; max_iter bounds the iterations of all inner solves together.
    `compute` takes the low-precision operators as M_low / MT_low (fpgrad's Implicit passes the step
    linearised in `dtype`); without them M is called in b's dtype on a cast vector.
    """

    inner: LinearSolver = field(default_factory=GMRES)
    dtype: torch.dtype = torch.float32
    max_refinements: int = 10
    tol: float | None = None
    max_iter: int | None = None

    name: ClassVar[str] = "mixed_precision"
    lowers_precision: ClassVar[bool] = True

    def __post_init__(self):
        check_tolerance("MixedPrecision", self.tol)
        if not isinstance(self.inner, LinearSolver):
            raise TypeError(f"MixedPrecision: inner must be a linear solver such as GMRES(), got "
                            f"{type(self.inner).__name__}")
        if not self.inner.iterative:
            raise ValueError(f"MixedPrecision: mixed_precision needs an iterative solver, not {self.inner.name!r}")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"MixedPrecision: dtype must be a floating torch.dtype (e.g. torch.float32), got "
                            f"{self.dtype!r}")

    # the wrapper answers for the inner solver's capabilities
    @property
    def preconditionable(self) -> bool:
        return self.inner.preconditionable

    @property
    def needs_transpose(self) -> bool:
        return self.inner.needs_transpose

    @property
    def symmetric_only(self) -> bool:
        return self.inner.symmetric_only

    @property
    def recycles(self) -> bool:
        return self.inner.recycles

    @property
    def effective_tol(self) -> float:
        return self.inner.tol if self.tol is None else self.tol

    @property
    def effective_max_iter(self) -> int:
        return self.inner.max_iter if self.max_iter is None else self.max_iter

    def compute(self, M: Operator, b: Tensor, *, x0: Tensor | None = None, MT: Operator | None = None,
                preconditioner: Operator | None = None, state: Any = None, M_low: Operator | None = None,
                MT_low: Operator | None = None) -> LinearSolution:
        """The refined solve (no warning: the LinearSolution carries the status). Its matvecs count every
        product, low and high; `low_precision_matvecs` those in `dtype`; its residuals are the full-precision
        residual after each refinement."""
        low, high_dtype = self.dtype, b.dtype
        if torch.finfo(low).eps <= torch.finfo(high_dtype).eps:
            raise DTypeError(f"mixed_precision={low} is not lower precision than the state's dtype {high_dtype}; use "
                             "a lower dtype (torch.float32 for a float64 map) or mixed_precision=None")
        if M_low is None:
            M_low = _cast(M, high_dtype, low)
        if MT_low is None and MT is not None:
            MT_low = _cast(MT, high_dtype, low)
        P = None if preconditioner is None else _cast(preconditioner, high_dtype, low)
        tol, max_iter, solver = self.effective_tol, self.effective_max_iter, self.inner
        B = b.shape[0]
        bnorm = b.norm(dim=1)
        scale = torch.where(bnorm == 0, torch.ones_like(bnorm), bnorm)
        high = low_vjps = refinements = 0
        u = torch.zeros_like(b)
        r = b.clone()
        with torch.no_grad():
            if x0 is not None:                                    # a guess worse than zero is dropped, as in linsolve
                high += 1
                r0 = b - (x0 - M(x0))
                worse = ~(r0.norm(dim=1) <= bnorm)
                u = torch.where(worse.unsqueeze(1), u, x0)
                r = torch.where(worse.unsqueeze(1), r, r0)
            rows = []
            diverged = torch.zeros(B, dtype=torch.bool, device=b.device)
            iterations = torch.zeros(B, dtype=torch.long, device=b.device)
            left = max_iter                                       # shared by all inner solves
            while True:
                rel = r.norm(dim=1) / scale
                rows.append(rel)
                converged = rel <= tol
                if not bool(torch.isfinite(rel).all()):
                    diverged = ~torch.isfinite(rel)
                    break
                left = max_iter - int(iterations.max())
                if bool(converged.all()) or refinements >= self.max_refinements or left <= 0:
                    break
                if len(rows) >= 3 and bool((rows[-1] > 0.5 * rows[-2])[~converged].any()):
                    break                                         # the refinement stopped contracting
                active = ~converged
                rn = r.norm(dim=1, keepdim=True)
                rs = torch.where(rn == 0, torch.ones_like(rn), rn)
                inner = replace(solver, tol=max(inner_tolerance(low), tol), max_iter=left)
                sol = inner.compute(M_low, (r / rs).to(low), preconditioner=P, MT=MT_low, state=state)
                low_vjps += sol.matvecs + sol.rmatvecs
                iterations += sol.iterations.to(iterations.device) * active
                if bool(sol.diverged.any()):
                    diverged = sol.diverged.to(b.device) & active
                    break
                u = u + torch.where(active.unsqueeze(1), sol.u.to(high_dtype) * rs, torch.zeros_like(u))
                r = b - (u - M(u))
                high += 1
                refinements += 1
        residuals = torch.stack(rows)
        final = residuals[-1]
        reached = float(final[torch.isfinite(final)].max()) if bool(torch.isfinite(final).any()) else math.nan
        what = (f"{solver.name} in {str(low).replace('torch.', '')} with refinement in "
                f"{str(high_dtype).replace('torch.', '')}: {refinements} refinements, {low_vjps} low-precision and "
                f"{high} full-precision products")
        if bool(diverged.any()):
            message = f"{what}; diverged (non-finite or growing residual): I - J may be singular or badly conditioned"
            u = torch.where(diverged.unsqueeze(1), torch.full_like(u, math.nan), u)
        elif bool(converged.all()):
            message = f"{what}; converged to {reached:.1e}"
        elif left <= 0:
            message = (f"{what}; reached {reached:.1e} > tol {tol:g} when the iteration budget max_iter={max_iter} "
                       "(shared by all refinements) ran out: raise max_iter or use mixed_precision=None")
        elif refinements >= self.max_refinements:
            message = (f"{what}; reached {reached:.1e} > tol {tol:g} after the maximum {self.max_refinements} "
                       "refinements: raise max_refinements or use mixed_precision=None")
        else:
            message = (f"{what}; reached {reached:.1e} > tol {tol:g}: the refinement stopped contracting (the "
                       "low-precision solve is too inaccurate for this system): use mixed_precision=None")
        return LinearSolution(u=u, residuals=residuals, converged=converged & ~diverged, diverged=diverged,
                              iterations=iterations, matvecs=low_vjps + high, rmatvecs=0,
                              solver=f"{solver.name}+refine", message=message, low_precision_matvecs=low_vjps)


def _cast(op: Operator, high: torch.dtype, low: torch.dtype) -> Operator:
    """op (in `high`) as an operator on `low` vectors."""
    return lambda v: op(v.to(high)).to(low)
