"""Estimators that work from z* alone: u such that grad = (df/d(params, x))^T u at z*."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

import torch
from torch import Tensor

from .._checks import check_tolerance
from ..errors import ConfigError, DivergenceError, ShapeError
from ..forward import default_tolerance as forward_tolerance
from ..linsolve import SOLVERS, AbstractSolver, MixedPrecision, get_solver
from ..results import SeriesResidual, report, warn
from ._base import CostRecord, Estimator, Linearisation

_GROWTH_LIMIT = 1e6


def default_tolerance(dtype: torch.dtype) -> float:
    """The adjoint solve's default relative residual, one each floating dtype can reach: 1e-8 (float64), 1e-4
    (float32: slot attention's adjoint stagnated at 1.2e-5 under 1e-5), 1e-2 (float16), 5e-2 (bfloat16: measured
    floors 4e-3 on a tanh map, 2.6e-2 on slot attention)."""
    return {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2}.get(dtype, 5e-2)


def check_fixed_point(name: str, lin: Linearisation, rtol: float, record: CostRecord) -> None:
    """Warn when the state the adjoint gradient is taken at is not a fixed point (e.g. a forward pass
    stopped early): the implicit function theorem, and the series built on it, assume z = f(z). In bfloat16 /
    float16 the threshold is at least 10x the forward's default tolerance (0.1): their fixed points are that coarse."""
    res = lin.relative_residual
    if rtol is not None:
        rtol = max(rtol, 10 * forward_tolerance(res.dtype) if res.dtype not in (torch.float64, torch.float32) else 0)
    if rtol is None or not bool((res > rtol).any()):
        return
    worst = int(res.argmax())
    msg = (f"{name}: the state is not a fixed point (relative residual ||f(z) - z|| / ||f(z)|| = "
           f"{float(res[worst]):.2e} in sample {worst}, {int((res > rtol).sum())} of {res.numel()} samples above "
           f"{rtol:g}); this gradient assumes z = f(z) and can point the wrong way: converge the forward solve "
           "(raise the forward's max_iter, or ImplicitSlotAttention's iters / tol; use anderson or broyden) or use "
           "Unrolled(T) for a truncated forward pass")
    record.messages.append(msg)
    warn(msg)


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
        warn(msg)


def _record_series(name: str, terms: int, g: Tensor, u: Tensor, JTu: Tensor, record: CostRecord) -> None:
    gnorm = g.norm(dim=1)
    r = (g - (u - JTu)).norm(dim=1)
    residual = torch.where(gnorm > 0, r / gnorm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(r))
    tol = default_tolerance(g.dtype)
    solved = residual <= tol
    worst = float(residual.max()) if residual.numel() else 0.0     # (an empty batch leaves no residual)
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
        warn(msg)


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

    def __post_init__(self):
        if not (isinstance(self.k, int) and self.k >= 0):
            raise ConfigError(f"Neumann: k must be an int >= 0 (Neumann(k) keeps the terms (J^T)^i g for i = 0..k; "
                              f"Neumann(0) is OneStep()), got k={self.k!r}")

    def describe(self) -> str:
        return f"Neumann({self.k})"

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

    def describe(self) -> str:
        return f"Phantom({self.k}, {self.tau:g})"

    def check_residual(self, lin, g, u, JTu, record):
        _record_series(f"Phantom({self.k}, {self.tau})", self.k, g, u, JTu, record)

    def __post_init__(self):
        if self.k < 1 or not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"Phantom: need k >= 1 and 0 < tau <= 1, got k={self.k}, tau={self.tau}")

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


_INVERSE_FORWARD = ("anderson", "broyden")


def _explicit_tol(solver: AbstractSolver) -> float | None:
    """The tol a caller set on a solver object (None when it is the class default)."""
    if isinstance(solver, MixedPrecision):
        return solver.tol if solver.tol is not None else _explicit_tol(solver.inner)
    default = {f.name: f.default for f in fields(solver)}.get("tol")
    return None if solver.tol == default else solver.tol


@dataclass(frozen=True)
class Implicit(Estimator):
    """Exact implicit gradient: solve (I - J^T) u = g, then grad = (df/d(params, x))^T u.

    solver: a linear solver object, GMRES(restart=50) | BiCGSTAB() | NormalCG() | CG() (symmetric J only;
    checked) | NeumannSeries() | Dense() | GCRODR(k=10) | MixedPrecision(GMRES(), dtype=torch.float32), or its
    name as shorthand: "gmres" | "bicgstab" | "cg_normal" | "cg" | "neumann" | "dense" | "gcrodr".
    tol: relative residual of the adjoint solve (default: a tol set on the solver object, else by dtype:
    1e-8 in float64, 1e-4 in float32, 1e-2 in float16, 5e-2 in bfloat16: default_tolerance).
    max_iter: overrides the solver's.
    A diverged solve raises DivergenceError; one that stops at max_iter warns (ConvergenceWarning) or raises with
    throw=True (fpgrad.results.report). The LinearSolution, with its per-sample status, is kept in the CostRecord
    (`record.solves`). The gradient is exact only at a fixed point: a state whose relative residual exceeds
    fixed_point_rtol (None: no check) is warned about (ConvergenceWarning).

    Reuse (each still drives the residual to tol and reports it; a guess worse than zero is dropped):
    precondition="forward": right-precondition the Krylov solve with the forward solver's inverse estimate
        (SHINE, Ramzi et al. 2022): (I - J^T)^{-1} ~ I - V U^T from Broyden's or Anderson's secant updates
        (forward="broyden" / "anderson"; checked when fixed_point is called). Needs a solver whose
        `preconditionable` is True. Measured (benchmarks/reuse.py): it pays as J's spectrum nears 1 and only if
        Broyden keeps every update (memory >= its steps).
    initial_guess="forward": start from that estimate applied to g (SHINE's answer, used as a guess; it meets
        the secant equations in the forward direction only, and was worse than zero in the benchmarks).
    warm_start: a WarmStart the caller owns: the previous adjoint of the same sample (bound ids) or batch.
    recycle: a RecycleSpace the caller owns, handed to the solver at each solve (`compute(..., state=recycle)`):
        GCRO-DR recycling of the slow eigenvectors across solves (a solver whose `recycles` is True; the name
        "gmres" means GCRODR here).
    warm_start and recycle are handles to caller-owned state, left out of equality and hash: the config never
    changes; the state is read and written where the solve happens.
    Shorthand kept from before solvers were objects: options= (the named solver's fields, e.g.
    {"restart": 50}) and mixed_precision=torch.float32 / max_refinements= (wraps the solver in MixedPrecision:
    Krylov products in that dtype, the residual corrected in the map's dtype; the accuracy reached is the
    full-precision residual, measured).
    """

    solver: Union[str, AbstractSolver] = "gmres"
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

    def describe(self) -> str:
        solver = getattr(self.solver, "name", self.solver)
        return f"Implicit({solver})" if self.tol is None else f"Implicit({solver}, tol={self.tol:g})"

    def __post_init__(self):
        check_tolerance("Implicit", self.tol)
        if isinstance(self.solver, str) and self.solver not in SOLVERS:
            raise ValueError(f"Implicit: unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}")
        if not isinstance(self.solver, (str, AbstractSolver)):
            raise TypeError(f"Implicit: solver must be a linear solver object (e.g. fpgrad.linsolve.GMRES(restart=50)) "
                            f"or its name, got {type(self.solver).__name__}")
        if self.precondition not in (None, "forward"):
            raise ValueError(f"Implicit: precondition must be None or 'forward', got {self.precondition!r}")
        if self.initial_guess not in (None, "forward"):
            raise ValueError(f"Implicit: initial_guess must be None or 'forward', got {self.initial_guess!r}")
        if self.warm_start is not None and self.initial_guess is not None:
            raise ValueError("Implicit: give warm_start or initial_guess='forward', not both (one initial guess)")
        if self.warm_start is not None and not hasattr(self.warm_start, "guess"):
            raise TypeError(f"Implicit: warm_start must be an fpgrad.estimators.WarmStart, got "
                            f"{type(self.warm_start).__name__}")
        if self.mixed_precision is not None and not (isinstance(self.mixed_precision, torch.dtype)
                                                     and self.mixed_precision.is_floating_point):
            raise TypeError(f"Implicit: mixed_precision must be a floating torch.dtype (e.g. torch.float32), "
                            f"got {self.mixed_precision!r}")
        solver = self._configured_solver()          # builds (and so checks) the solver; nothing is stored
        if self.recycle is not None and not solver.recycles:
            raise ValueError(f"Implicit: recycle= needs solver='gcrodr' (GMRES with a recycled subspace), got "
                             f"solver={solver.name!r}")
        if self.precondition is not None and not solver.preconditionable:
            raise ValueError(f"Implicit: solver={solver.name!r} cannot use precondition='forward' (CG needs a "
                             "symmetric positive definite preconditioner, the dense solve none); use one of "
                             f"{', '.join(n for n, c in SOLVERS.items() if c.preconditionable)}")

    def _configured_solver(self) -> AbstractSolver:
        """The solver object this config describes, before tol / max_iter are resolved for a dtype."""
        solver = self.solver
        if isinstance(solver, str):
            name = "gcrodr" if self.recycle is not None and solver == "gmres" else solver
            options = dict(self.options)
            if name == "gcrodr" and self.recycle is not None:
                options.setdefault("k", getattr(self.recycle, "k", 10))
            solver = get_solver(name, **options)
        elif self.options:
            solver = replace(solver, **self.options)
        if self.mixed_precision is not None:
            if isinstance(solver, MixedPrecision):
                raise ValueError("Implicit: the solver is a MixedPrecision already; drop mixed_precision=")
            if not solver.iterative:
                raise ValueError(f"Implicit: mixed_precision needs an iterative solver, not {solver.name!r}")
            solver = MixedPrecision(solver, dtype=self.mixed_precision, max_refinements=self.max_refinements)
        return solver

    @property
    def solver_name(self) -> str:
        """The linear solver's name ("gmres", "gcrodr", ...; the inner one for MixedPrecision)."""
        solver = self._configured_solver()
        return solver.inner.name if isinstance(solver, MixedPrecision) else solver.name

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

    def linear_solver(self, dtype: torch.dtype = torch.float64) -> AbstractSolver:
        """The solver object with tol (Implicit's, else one set on the object, else by dtype) and max_iter."""
        solver = self._configured_solver()
        tol = self.tol if self.tol is not None else _explicit_tol(solver)
        changes: dict[str, Any] = {"tol": tol if tol is not None else default_tolerance(dtype)}
        if self.max_iter is not None and solver.iterative:
            changes["max_iter"] = self.max_iter
        return replace(solver, **changes)

    def _forward_inverse(self, lin: Linearisation, g: Tensor):
        fp = lin.forward
        inverse = None if fp is None else getattr(fp, "inverse", None)
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
        solver = self.linear_solver(g.dtype)
        name = f"Implicit(solver={self.solver_name!r})"
        check_fixed_point(name, lin, self.fixed_point_rtol, record)
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
        operators = {}
        if solver.lowers_precision:             # products in the lower dtype: the step linearised in it
            low = lin.cast(solver.dtype)
            operators = {"M_low": low.JT, "MT_low": low.J if solver.needs_transpose else None}
        MT = lin.J if solver.needs_transpose and not solver.lowers_precision else None
        sol = solver.compute(lin.JT, g, x0=x0, MT=MT, preconditioner=preconditioner, state=self.recycle,
                             **operators)
        record.low_precision_vjps += sol.low_precision_matvecs
        record.solves.append(sol)
        if self.warm_start is not None and not bool(sol.diverged.any()):
            self.warm_start.store(sol.u, sol.converged)
        if bool(sol.diverged.any()):
            message = f"{name}: {sol.message}"
        else:
            message = f"{name}: adjoint solve did not converge: {sol.message}"
            if not bool(sol.converged.all()):
                record.messages.append(message)
        report(sol, message=message, throw=self.throw, raise_diverged=True)
        return sol.u
