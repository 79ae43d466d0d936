"""Estimators that work from z* alone: u such that grad = (df/d(params, x))^T u at z*."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConvergenceError, ConvergenceWarning, DivergenceError, ShapeError
from ._base import CostRecord, Estimator, Linearisation
from ._reuse import refine

_GROWTH_LIMIT = 1e6


def default_tolerance(dtype: torch.dtype) -> float:
    """A relative residual each floating dtype can reach: 1e-8 (float64), 1e-5 (float32), 1e-3 (half)."""
    return {torch.float64: 1e-8, torch.float32: 1e-5}.get(dtype, 1e-3)


def check_fixed_point(name: str, lin: Linearisation, rtol: float, record: CostRecord) -> None:
    """Warn when the state the adjoint gradient is taken at is not a fixed point (e.g. a forward pass
    stopped early): the implicit function theorem, and the series built on it, assume z = f(z)."""
    res = lin.relative_residual
    if rtol is None or not bool((res > rtol).any()):
        return
    worst = int(res.argmax())
    msg = (f"{name}: the state is not a fixed point (relative residual ||f(z) - z|| / ||f(z)|| = "
           f"{float(res[worst]):.2e} in sample {worst}, {int((res > rtol).sum())} of {res.numel()} samples above "
           f"{rtol:g}); this gradient assumes z = f(z) and can point the wrong way: converge the forward solve "
           "(raise max_iter / use anderson or broyden) or use Unrolled(T) for a truncated forward pass")
    record.messages.append(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _check_series(name: str, norms: list[float], record: CostRecord) -> None:
    """Raise on a series whose terms blew up; warn when they stopped shrinking."""
    first = norms[0]
    if first == 0.0:
        return
    last = norms[-1]
    if not all(map(lambda v: v == v and v != float("inf"), norms)) or last > _GROWTH_LIMIT * first:
        raise DivergenceError(
            f"{name}: the series terms grew from {first:.3e} to {last:.3e}: it diverges because the spectral "
            "radius of J is >= 1 at this point; use Implicit(solver='gmres') (or check the map with "
            "fpgrad.spectral.spectral_radius)")
    if len(norms) >= 3 and last > first:
        msg = (f"{name}: the series terms are not shrinking ({first:.3e} -> {last:.3e}): the spectral radius of J "
               "is >= 1, or J is non-normal and its powers grow before they shrink; this gradient is unreliable: "
               "use Implicit(solver='gmres')")
        record.messages.append(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)


@dataclass(frozen=True)
class SeriesResidual:
    """What a truncated series (Neumann, Phantom) leaves of the adjoint system (I - J^T) u = g.

    residual: [B] relative residual ||g - (I - J^T) u|| / ||g|| of the returned u (measured with the pullback's
    own VJP: no extra product). solved: [B] residual <= tol, the tolerance Implicit() would use by default;
    almost always False: the series is an approximation of the implicit gradient, and this says how far it
    is from solving the system. A small residual does not prove the error small (it is amplified by up to
    1 / sigma_min(I - J)), and a few terms cannot reveal rho(J) >= 1 (benchmarks/silent_failures.py).
    """

    estimator: str
    residual: Tensor
    terms: int
    tol: float
    solved: Tensor
    message: str


def _record_series(name: str, terms: int, g: Tensor, u: Tensor, JTu: Tensor, record: CostRecord) -> None:
    gnorm = g.norm(dim=1)
    r = (g - (u - JTu)).norm(dim=1)
    residual = torch.where(gnorm > 0, r / gnorm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(r))
    tol = default_tolerance(g.dtype)
    solved = residual <= tol
    worst = float(residual.max())
    B = residual.numel()
    where = "" if B == 1 else f" (worst of {B} samples)"
    message = (f"{name}: the truncated series ({terms} terms) leaves a relative residual of {worst:.2e}{where} in "
               f"the adjoint system (I - J^T) u = g: an approximation of the implicit gradient, not a solution of "
               f"it (Implicit() solves it to {tol:g}); a few terms cannot show whether the series converges: "
               "fpgrad.spectral.spectral_radius checks rho(J) < 1")
    record.series.append(SeriesResidual(name, residual, terms, tol, solved, message))
    if worst >= 1.0 - 64 * torch.finfo(g.dtype).eps:       # no better than u = 0, up to round-off
        msg = (f"{name}: the truncated series leaves a relative residual of {worst:.2f}{where} in (I - J^T) u = g, "
               "as much as or more than u = 0 does: its terms do not shrink (rho(J) >= 1, e.g. an orthogonal J, "
               "or a non-normal J whose powers grow before they shrink) and this gradient is unreliable: use "
               "Implicit(solver='gmres') or check "
               "fpgrad.spectral.spectral_radius")
        record.messages.append(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)


@dataclass(frozen=True)
class Neumann(Estimator):
    """Truncated Neumann series:  u = sum_{i=0..k} (J^T)^i g  (k VJPs with J^T, then one pullback).

    Counting convention: k + 1 terms, so Neumann(k) equals backprop through k + 1 steps applied to the
    detached z*, and Neumann(0) equals OneStep(). Terms that blow up raise DivergenceError; the residual the
    series leaves in (I - J^T) u = g is measured by the pullback's VJP (no extra product) and kept in
    `record.series` (SeriesResidual; `Gradient.series`), warned about when it exceeds that of u = 0.
    """

    k: int = 5
    fixed_point_rtol: float | None = 1e-3

    name = "neumann"
    adjoint = True
    reports_residual = True

    def check_residual(self, lin, g, u, JTu, record):
        _record_series(f"Neumann({self.k})", self.k + 1, g, u, JTu, record)

    def adjoint_vector(self, lin: Linearisation, g: Tensor, record: CostRecord) -> Tensor:
        check_fixed_point(f"Neumann({self.k})", lin, self.fixed_point_rtol, record)
        u, term = g.clone(), g
        norms = [float(g.norm())]
        for _ in range(self.k):
            term = lin.JT(term)
            u = u + term
            norms.append(float(term.norm()))
        _check_series(f"Neumann({self.k})", norms, record)
        return u


@dataclass(frozen=True)
class Phantom(Estimator):
    """Phantom gradient (Geng et al. 2021): backprop through k damped steps h <- (1-tau) h + tau f(h)
    started at z*:   u = tau sum_{i=0..k-1} ((1 - tau) I + tau J^T)^i g   (k - 1 VJPs + one pullback).
    Its residual in (I - J^T) u = g is kept in `record.series`, as for Neumann.
    """

    k: int = 5
    tau: float = 0.5
    fixed_point_rtol: float | None = 1e-3

    name = "phantom"
    adjoint = True
    reports_residual = True

    def check_residual(self, lin, g, u, JTu, record):
        _record_series(f"Phantom({self.k}, {self.tau})", self.k, g, u, JTu, record)

    def __post_init__(self):
        if self.k < 1 or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"Phantom: need k >= 1 and 0 < tau <= 1, got k={self.k}, tau={self.tau}")

    def adjoint_vector(self, lin: Linearisation, g: Tensor, record: CostRecord) -> Tensor:
        check_fixed_point(f"Phantom({self.k}, {self.tau})", lin, self.fixed_point_rtol, record)
        u, term = g.clone(), g
        norms = [float(g.norm())]
        for _ in range(self.k - 1):
            term = (1.0 - self.tau) * term + self.tau * lin.JT(term)
            u = u + term
            norms.append(float(term.norm()))
        _check_series(f"Phantom({self.k}, {self.tau})", norms, record)
        return self.tau * u


_PRECONDITIONABLE = ("gmres", "bicgstab", "neumann", "cg_normal", "gcrodr")
_INVERSE_FORWARD = ("anderson", "broyden")


@dataclass(frozen=True)
class Implicit(Estimator):
    """Exact implicit gradient: solve (I - J^T) u = g, then grad = (df/d(params, x))^T u.

    solver: "gmres" | "bicgstab" | "cg_normal" | "cg" (symmetric J only; checked) | "neumann" | "dense" |
    "gcrodr" (GMRES with a recycled subspace). tol: relative residual of the adjoint solve (default by dtype:
    1e-8 in float64, 1e-5 in float32, 1e-3 in half precision). A diverged solve raises DivergenceError; one
    that stops at max_iter warns (ConvergenceWarning) or raises with throw=True. The LinearSolution is kept in
    the CostRecord (`record.solves`). The gradient is exact only at a fixed point: a state whose relative
    residual exceeds fixed_point_rtol (None: no check) is warned about (ConvergenceWarning).

    Reuse (each still drives the residual to tol and reports it; a guess worse than zero is dropped):
    precondition="forward": right-precondition the Krylov solve with the forward solver's inverse estimate
        (SHINE, Ramzi et al. 2022): (I - J^T)^{-1} ~ I - V U^T from Broyden's or Anderson's secant updates
        (forward="broyden" / "anderson"; checked when fixed_point is called). Measured (benchmarks/reuse.py):
        it pays as J's spectrum nears 1 and only if Broyden keeps every update (memory >= its steps).
    initial_guess="forward": start from that estimate applied to g (SHINE's answer, used as a guess; it meets
        the secant equations in the forward direction only, and was worse than zero in the benchmarks).
    warm_start: a WarmStart the caller owns: the previous adjoint of the same sample (bound ids) or batch.
    recycle: a RecycleSpace the caller owns: GCRO-DR recycling of the slow eigenvectors across solves
        (solver "gcrodr"; the default "gmres" is switched to it).
    mixed_precision: a lower dtype (torch.float32 for a float64 map): Krylov products in that dtype, the
        residual corrected in the map's dtype (iterative refinement, at most max_refinements); the accuracy
        reached is the full-precision residual, measured.
    """

    solver: str = "gmres"
    tol: float | None = None
    max_iter: int | None = None
    throw: bool = False
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    fixed_point_rtol: float | None = 1e-3
    precondition: str | None = None
    initial_guess: str | None = None
    warm_start: Any = field(default=None, hash=False, compare=False)
    recycle: Any = field(default=None, hash=False, compare=False)
    mixed_precision: torch.dtype | None = None
    max_refinements: int = 10

    name = "implicit"
    adjoint = True

    def __post_init__(self):
        from ..linsolve import SOLVERS
        if self.recycle is not None and self.solver == "gmres":
            object.__setattr__(self, "solver", "gcrodr")
        if self.solver not in SOLVERS:
            raise ValueError(f"Implicit: unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}")
        if self.recycle is not None and self.solver != "gcrodr":
            raise ValueError(f"Implicit: recycle= needs solver='gcrodr' (GMRES with a recycled subspace), got "
                             f"solver={self.solver!r}")
        if self.precondition not in (None, "forward"):
            raise ValueError(f"Implicit: precondition must be None or 'forward', got {self.precondition!r}")
        if self.initial_guess not in (None, "forward"):
            raise ValueError(f"Implicit: initial_guess must be None or 'forward', got {self.initial_guess!r}")
        if self.precondition is not None and self.solver not in _PRECONDITIONABLE:
            raise ValueError(f"Implicit: solver={self.solver!r} cannot use precondition='forward' (CG needs a "
                             "symmetric positive definite preconditioner, the dense solve none); use one of "
                             f"{', '.join(_PRECONDITIONABLE)}")
        if self.warm_start is not None and self.initial_guess is not None:
            raise ValueError("Implicit: give warm_start or initial_guess='forward', not both (one initial guess)")
        if self.warm_start is not None and not hasattr(self.warm_start, "guess"):
            raise TypeError(f"Implicit: warm_start must be an fpgrad.estimators.WarmStart, got "
                            f"{type(self.warm_start).__name__}")
        if self.mixed_precision is not None:
            if not (isinstance(self.mixed_precision, torch.dtype) and self.mixed_precision.is_floating_point):
                raise TypeError(f"Implicit: mixed_precision must be a floating torch.dtype (e.g. torch.float32), "
                                f"got {self.mixed_precision!r}")
            if self.solver == "dense":
                raise ValueError("Implicit: mixed_precision needs an iterative solver, not 'dense'")

    @property
    def uses_forward_inverse(self) -> bool:
        return self.precondition == "forward" or self.initial_guess == "forward"

    def check_forward(self, forward) -> None:
        """Refuse a forward solver that cannot give what this estimator reuses (called by fixed_point)."""
        if self.uses_forward_inverse and getattr(forward, "name", None) not in _INVERSE_FORWARD:
            raise ValueError(f"Implicit(precondition={self.precondition!r}, initial_guess={self.initial_guess!r}) "
                             f"reuses the forward solver's inverse-Jacobian estimate, which forward="
                             f"{getattr(forward, 'name', forward)!r} does not build: use forward='broyden' or "
                             "'anderson'")

    def linear_solver(self, dtype: torch.dtype = torch.float64):
        from ..linsolve import get_solver
        kw = dict(self.options)
        kw["tol"] = self.tol if self.tol is not None else default_tolerance(dtype)
        if self.max_iter is not None and self.solver != "dense":
            kw["max_iter"] = self.max_iter
        if self.recycle is not None:
            kw["space"] = self.recycle
            kw.setdefault("k", self.recycle.k)
        return get_solver(self.solver, **kw)

    def _forward_inverse(self, lin: Linearisation, g: Tensor):
        fp = lin.forward
        inverse = None if fp is None else fp.info.get("inverse")
        if inverse is None:
            raise ValueError(f"Implicit(precondition={self.precondition!r}, initial_guess={self.initial_guess!r}): "
                             "no inverse-Jacobian estimate from the forward solve reached the backward (forward "
                             "solver other than broyden/anderson, or a Linearisation built without forward=)")
        B, n = g.shape
        if inverse.U.shape[:2] != (B, n):
            raise ShapeError(f"Implicit: the forward solver's inverse estimate is for {tuple(inverse.U.shape[:2])} "
                             f"(batch, n) but the adjoint system is {(B, n)}")
        return inverse

    def adjoint_vector(self, lin: Linearisation, g: Tensor, record: CostRecord,
                       x0: Tensor | None = None) -> Tensor:
        name = f"Implicit(solver={self.solver!r})"
        check_fixed_point(name, lin, self.fixed_point_rtol, record)
        solver = self.linear_solver(g.dtype)
        preconditioner = None
        if self.uses_forward_inverse:
            inverse = self._forward_inverse(lin, g)
            if self.precondition == "forward":
                preconditioner = inverse.solve_transpose
                dropped = lin.forward.info.get("dropped_updates", 0)
                if dropped:
                    record.messages.append(
                        f"{name}: the forward Broyden dropped {dropped} of its oldest updates (memory "
                        f"{inverse.U.shape[-1]}), so its inverse estimate is a weaker preconditioner: "
                        "Broyden(memory >= max_iter) keeps them all (benchmarks/reuse.py)")
            if self.initial_guess == "forward" and x0 is None:
                x0 = inverse.solve_transpose(g)
        if self.warm_start is not None and x0 is None:
            x0 = self.warm_start.guess(g)
        with warnings.catch_warnings():          # reported once below, with the estimator's name
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.mixed_precision is not None:
                low = lin.cast(self.mixed_precision)
                P = None if preconditioner is None else \
                    (lambda v: preconditioner(v.to(g.dtype)).to(self.mixed_precision))
                sol, low_vjps = refine(solver, lin.JT, low.JT, g, tol=solver.tol, low=self.mixed_precision,
                                       max_refinements=self.max_refinements, x0=x0, preconditioner=P,
                                       MT_low=low.J if self.solver == "cg_normal" else None)
                record.low_precision_vjps += low_vjps
            else:
                MT = lin.J if self.solver == "cg_normal" else None
                sol = solver.solve(lin.JT, g, x0=x0, MT=MT, preconditioner=preconditioner, throw=False)
        record.solves.append(sol)
        if bool(torch.as_tensor(sol.diverged).any()):
            raise DivergenceError(f"{name}: {sol.message}")
        if self.warm_start is not None:
            self.warm_start.store(sol.u, sol.converged)
        if not bool(torch.as_tensor(sol.converged).all()):
            msg = f"{name}: adjoint solve did not converge: {sol.message}"
            record.messages.append(msg)
            if self.throw:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return sol.u
