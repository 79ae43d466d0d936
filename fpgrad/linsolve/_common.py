"""Shared machinery of the linear solvers: the result type, the counted operator and the batched per-sample run.

Every solver solves (I - M) u = b for a batch of independent systems, b: [B, n]. One call of M on a [B, n]
tensor is one matvec (one batched VJP in fpgrad). Samples stop one by one: a sample that has converged,
diverged or broken down is masked (its rows of every update are frozen and it is fed zeros), while the
others go on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._checks import check_finite, check_tolerance
from ..errors import DeviceError, DTypeError, ShapeError, SingularSystemError  # noqa: F401  (re-exported)
from ..results import LinearSolution, Status, report

Operator = Callable[[Tensor], Tensor]

# per-sample status of a run: the codes of fpgrad.results.Status (plain ints for torch.where)
RUNNING, CONVERGED, MAX_ITER, STAGNATED, BREAKDOWN, NONFINITE, GROWTH, INDEFINITE, SINGULAR = (
    int(Status.RUNNING), int(Status.CONVERGED), int(Status.MAX_ITER), int(Status.STAGNATED), int(Status.BREAKDOWN),
    int(Status.NONFINITE), int(Status.DIVERGED), int(Status.INDEFINITE), int(Status.SINGULAR))
DIVERGED_CODES = (NONFINITE, GROWTH, INDEFINITE, SINGULAR)

GROWTH_LIMIT = 1e4        # a residual above GROWTH_LIMIT x its initial value counts as diverged
ROUNDING_SHARE = 0.25     # a residual formed from a Krylov basis decides where its rounding bound is <= this x tol
STAGNATION = 1e-3         # a restart cycle that lowers the true residual by less than this fraction stagnated


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of [B, n] tensors: [B], accumulated and returned in small_dtype (float32 or wider:
    a half-precision sum of squares overflows at 65504); scale a vector by it with `scalar.to(v.dtype)`."""
    wide = small_dtype(a.dtype)
    return torch.linalg.vecdot(a.to(wide), b.to(wide), dim=1)


def small_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a solver's small dense algebra (Hessenberg least squares, dense LU): float32 or wider, whatever
    the map's dtype (CPU LAPACK has no half-precision kernels, and bfloat16's 8 bits would spoil the rotations)."""
    return torch.promote_types(dtype, torch.float32)


def safe(x: Tensor) -> Tensor:
    """x with zeros replaced by ones, for divisions whose zero case is masked out."""
    return torch.where(x == 0, torch.ones_like(x), x)


# what went wrong, per status; fields: {residual} {iters} {tol} {max_iter} {dtype} and the solver's own fields
_CAUSES = {
    MAX_ITER: "did not converge in {max_iter} iterations: residual {residual:.1e} > tol {tol:g}",
    STAGNATED: "stagnated at residual {residual:.1e} after {iters} iterations (a whole restart cycle without "
               "progress; tol {tol:g})",
    BREAKDOWN: "broke down after {iters} iterations at residual {residual:.1e}",
    NONFINITE: "diverged: the residual became NaN/Inf after {iters} iterations",
    GROWTH: "diverged: the residual grew to {residual:.1e} after {iters} iterations",
    INDEFINITE: "diverged: met p^T (I - M) p <= 0 after {iters} iterations, so I - J^T is not positive definite",
    SINGULAR: "I - J is singular (J has an eigenvalue 1): the system has no unique solution",
}

_FIXES = {
    MAX_ITER: "raise max_iter or pass a preconditioner",
    STAGNATED: "{precision}",
    BREAKDOWN: "use solver='gmres'",
    NONFINITE: "I - J may be singular or badly conditioned (J has an eigenvalue near 1): check the map and its "
               "spectral radius, use float64, or use solver='gmres' / 'dense'",
    GROWTH: "I - J may be singular or badly conditioned (J has an eigenvalue near 1): check the map and its "
            "spectral radius, use float64, or use solver='gmres' / 'dense'",
    INDEFINITE: "use solver='gmres' or 'cg_normal'",
    SINGULAR: "the fixed point is not isolated: check the map (fpgrad.spectral), or regularise it",
}


def _operator_not_finite(run, samples: Tensor) -> bool:
    """Whether M maps the (finite) right-hand side to NaN/Inf in one of `samples`: one extra matvec, only on the
    failure path, that tells an operator that is not finite apart from an iteration that blew up."""
    try:
        with torch.no_grad():
            out = run.M(run.b)
    except Exception:          # the probe is a diagnosis: never replace the failure being reported
        return False
    return isinstance(out, Tensor) and out.shape == run.b.shape and not bool(torch.isfinite(out[samples]).all())


class _Run:
    """Mutable state of one batched solve: iterate u, true residual r, per-sample status, trace and counts."""

    def __init__(self, solver: LinearSolver, M: Operator, MT: Operator | None,
                 preconditioner: Operator | None, b: Tensor, x0: Tensor | None):
        self.solver, self.name = solver, solver.name
        self.M, self.MT, self.P = M, MT, preconditioner
        self.matvecs = self.rmatvecs = 0
        self.b = b
        B = b.shape[0]
        bnorm = b.norm(dim=1)
        zero_b = bnorm == 0
        self.scale = torch.where(zero_b, torch.ones_like(bnorm), bnorm)
        self.threshold = torch.clamp(solver.tol * bnorm, min=solver.atol) / self.scale
        self.rejected_guess = torch.zeros(B, dtype=torch.bool, device=b.device)
        if x0 is None:
            self.u = torch.zeros_like(b)
            self.r = b.clone()
        else:
            # a guess is only a guess: a sample whose guess has a larger residual than zero starts from zero
            self.u = torch.where(zero_b.unsqueeze(1), torch.zeros_like(b), x0)
            self.r = b - self.A(self.u)
            worse = ~(self.r.norm(dim=1) <= bnorm)
            self.u = torch.where(worse.unsqueeze(1), torch.zeros_like(b), self.u)
            self.r = torch.where(worse.unsqueeze(1), b, self.r)
            self.rejected_guess = worse
        self.rel = self.r.norm(dim=1) / self.scale
        self.growth_limit = GROWTH_LIMIT * torch.maximum(self.rel, self.threshold)
        self.status = torch.full((B,), RUNNING, dtype=torch.long, device=b.device)
        self._classify(self.rel, self.status == RUNNING, converge=True)
        self.flag(zero_b, CONVERGED)
        self.rows = [self.rel]            # [B] relative residual per iteration
        self.actives: list[Tensor] = []   # [B] bool per iteration: which samples took part
        self.cache: dict = {}             # per-solver state that lives as long as the run (e.g. P^T)
        self.state = None                 # caller-owned state handed to compute(state=...) (a RecycleSpace)
        # (residual [B, n], rounding bound [B]) a cycle may leave for close(): the residual of its update formed
        # from its basis (no matvec); None: close() computes the true residual
        self.recurrence: tuple[Tensor, Tensor] | None = None

    # --- operators ---------------------------------------------------------------------------------------------
    def _apply(self, op: Operator, v: Tensor, what: str) -> Tensor:
        out = op(v)
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.name}: {what} returned {type(out).__name__}; it must return a Tensor")
        if out.shape != v.shape:
            raise ShapeError(f"{self.name}: {what} returned shape {tuple(out.shape)} for an input of shape "
                             f"{tuple(v.shape)}; it must map [B, n] -> [B, n] (b has shape {tuple(self.b.shape)})")
        if out.dtype != v.dtype:
            raise DTypeError(f"{self.name}: {what} returned dtype {out.dtype} for an input of dtype {v.dtype}")
        return out.detach()

    def A(self, v: Tensor, active: Tensor | None = None) -> Tensor:
        """(I - M) v: one matvec. Rows outside `active` are fed zeros (and so come back zero)."""
        if active is not None:
            v = torch.where(active.unsqueeze(1), v, 0)
        self.matvecs += 1
        return v - self._apply(self.M, v, "M")

    def AT(self, v: Tensor, active: Tensor | None = None) -> Tensor:
        """(I - M^T) v: one rmatvec."""
        if active is not None:
            v = torch.where(active.unsqueeze(1), v, 0)
        self.rmatvecs += 1
        return v - self._apply(self.MT, v, "MT")

    def precondition(self, v: Tensor) -> Tensor:
        """P v (identity without a preconditioner)."""
        return v if self.P is None else self._apply(self.P, v, "preconditioner")

    # --- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def running(self) -> Tensor:
        return self.status == RUNNING

    @property
    def budget(self) -> int:
        """Iterations left before max_iter (iterations are counted for the whole batch)."""
        return self.solver.max_iter - (len(self.rows) - 1)

    def flag(self, mask: Tensor, code: int) -> None:
        """Give the running samples in `mask` the status `code`."""
        self.status = torch.where(mask & self.running, code, self.status)

    def _classify(self, rel: Tensor, active: Tensor, converge: bool) -> Tensor:
        """Flag the samples in `active` whose residual is non-finite or grew too much (and converged ones if
        `converge`); return those of `active` that still run."""
        code = torch.where(rel <= self.threshold, CONVERGED, RUNNING) if converge else RUNNING
        code = torch.where(rel > self.growth_limit, GROWTH, code)
        code = torch.where(rel.abs() < math.inf, code, NONFINITE)        # (finite: NaN < inf is False)
        self.status = torch.where(active & (self.status == RUNNING), code, self.status)
        return active & (self.status == RUNNING)

    def record(self, rel: Tensor, active: Tensor) -> Tensor:
        """Append one iteration's relative residual (frozen outside `active`); flag the diverged.

        Returns `active` without the samples that were just flagged as diverged.
        """
        self.rows.append(torch.where(active, rel, self.rows[-1]))
        self.actives.append(active)
        return self._classify(rel, active, converge=False)

    def record_step(self, rel: Tensor, active: Tensor, going: Tensor | None = None) -> Tensor:
        """record() for a loop that flags its diverged samples once, by settle(), after the loop: append the
        iteration's relative residual (frozen outside `active`); return `going` (default `active`: the samples
        that may go on, a subset of `active`) without the samples that reached the threshold, diverged (grew past
        the growth limit) or went NaN/Inf. Three operations a step, not ~15."""
        self.rows.append(torch.where(active, rel, self.rows[-1]))
        self.actives.append(active)
        # (NaN compares False both ways: such a sample leaves the mask here and is flagged NONFINITE by settle)
        return (active if going is None else going) & (rel > self.threshold) & (rel <= self.growth_limit)

    def settle(self, members: Tensor) -> None:
        """Flag the samples of `members` whose last recorded residual (frozen when they left the loop) diverged
        or is NaN/Inf: what record() would have flagged step by step (after record_step)."""
        self._classify(self.rows[-1], members, converge=False)

    def record_trace(self, rels: Tensor) -> None:
        """Append several iterations of the whole batch at once (rels: [k, B]) and flag the diverged by the last;
        the batch-of-one GMRES cycle, which keeps its residuals on the host, records its cycle this way."""
        self.rows.extend(rels.unbind(0))
        self.actives.extend(torch.ones_like(rels, dtype=torch.bool).unbind(0))
        self._classify(rels[-1], torch.ones_like(self.status, dtype=torch.bool), converge=False)

    def drop_idle_tail(self, window: int) -> None:
        """Drop the trailing rows (at most `window`) in which no sample took part: the iterations a loop that asks
        the host only every few iterations (check_every) ran after its last sample stopped. They return their
        budget; their matvecs stay counted (they were computed). One host sync."""
        if window <= 0 or not self.actives:
            return
        took_part = torch.stack(self.actives[-window:]).any(dim=1).tolist()
        idle = 0
        for flag in reversed(took_part):
            if flag:
                break
            idle += 1
        if idle:
            del self.rows[-idle:]
            del self.actives[-idle:]

    def refresh(self, mask: Tensor, record: bool = False) -> None:
        """Recompute the true residual r = b - (I - M) u of the samples in `mask` (one matvec); flag them."""
        r = self.b - self.A(self.u, mask)
        self.r = torch.where(mask.unsqueeze(1), r, self.r)
        self.rel = torch.where(mask, self.r.norm(dim=1) / self.scale, self.rel)
        if record:
            self.rows.append(torch.where(mask, self.rel, self.rows[-1]))
            self.actives.append(mask)
        self._classify(self.rel, mask, converge=True)

    def close(self, mask: Tensor) -> bool:
        """End a cycle for the samples in `mask`: the true residual of their iterate (refresh: one matvec), or,
        where the cycle left one (run.recurrence, GMRES), the residual formed from its basis. That one equals
        b - A u up to the rounding bound it comes with, and is an explicit vector, so a basis that lost
        orthogonality shows in its norm. A fresh product is no more exact than that: it rounds at the same
        eps ||A|| ||u||. So the formed residual decides wherever rounding is small against the verdict's scale:
        a sample below its threshold whose bound is at most ROUNDING_SHARE of that threshold (it converged; the
        bound, in practice 10x the actual gap, cannot move it past 1.25x), or, at the end of the budget, one
        above its threshold by more than the bound (it did not). A sample that restarts needs the true residual.
        The formed residual is taken, and the matvec saved, when that holds for every sample (the product is one
        batched call) and no preconditioner is given (whose rounding the bound does not cover). Otherwise (a
        sample to restart, rounding of the tolerance's size as in bfloat16, a NaN) the matvec is computed, as
        without a recurrence. One host sync where a recurrence is given.
        Returns True where the formed residual was taken: every sample of `mask` (every running one) has ended,
        and the caller needs no sync to learn it."""
        recurrence, self.recurrence = self.recurrence, None
        if recurrence is None or self.P is not None:
            self.refresh(mask)
            return False
        r, bound = recurrence
        rel = r.norm(dim=1) / self.scale
        slack = bound / self.scale
        sure = (rel <= self.threshold) & (slack <= ROUNDING_SHARE * self.threshold)
        if self.budget <= 0:
            sure = sure | (rel - slack > self.threshold)
        # (a NaN residual is neither below nor above: the product decides)
        if not bool((sure | ~mask).all()):
            self.refresh(mask)
            return False
        # every sample of `mask` ends here, so self.r, which only a next cycle reads, is left as it is
        self.rel = torch.where(mask, rel, self.rel)
        self._classify(self.rel, mask, converge=True)
        return True

    @property
    def iterations(self) -> Tensor:
        """[B] long: iterations each sample took part in."""
        if not self.actives:
            return torch.zeros_like(self.status)
        return torch.stack(self.actives).sum(0)

    @property
    def last_row(self) -> Tensor:
        """[B] long: index of each sample's last iteration (0 if none)."""
        if not self.actives:
            return torch.zeros_like(self.status)
        rows = torch.arange(1, len(self.actives) + 1, device=self.status.device).unsqueeze(1)
        return (torch.stack(self.actives) * rows).amax(0)

    # --- result ------------------------------------------------------------------------------------------------
    def finish(self) -> LinearSolution:
        self.flag(self.running, MAX_ITER)
        converged = self.status == CONVERGED
        iterations, last_row = self.iterations, self.last_row
        diverged = torch.isin(self.status, torch.tensor(DIVERGED_CODES, device=self.status.device))
        residuals = torch.stack(self.rows)
        # a sample's entries from its last iteration on are the residual of the returned u (the true one, or the
        # one formed from a GMRES basis: equal up to rounding that cannot change the verdict; see close())
        after = torch.arange(residuals.shape[0], device=residuals.device).unsqueeze(1) >= last_row
        residuals = torch.where(after & ~diverged, self.rel, residuals)
        u = torch.where(diverged.unsqueeze(1), torch.full_like(self.u, math.nan), self.u)
        message = self.solver._message(self, residuals)
        return LinearSolution(u=u, residuals=residuals, converged=converged, diverged=diverged,
                              iterations=iterations, matvecs=self.matvecs, rmatvecs=self.rmatvecs,
                              solver=self.name, message=message, rejected_guess=self.rejected_guess,
                              status=self.status.clone())


class AbstractSolver:
    """What every linear solver object offers: capability flags callers read (instead of comparing names), the
    quiet `compute` that returns a LinearSolution with a per-sample status, and `solve`, which is `compute`
    followed by fpgrad.results.report (warn, or raise with throw=True)."""

    name: ClassVar[str] = "base"
    preconditionable: ClassVar[bool] = True    # takes any (non-symmetric) preconditioner P ~ (I - M)^{-1}
    needs_transpose: ClassVar[bool] = False    # needs MT = M^T (J products: JVPs in fpgrad)
    symmetric_only: ClassVar[bool] = False     # solves symmetric positive definite systems only (checked)
    recycles: ClassVar[bool] = False           # carries a RecycleSpace across solves (state=)
    iterative: ClassVar[bool] = True           # max_iter bounds Krylov / series iterations (Dense: refinements)
    lowers_precision: ClassVar[bool] = False   # runs its products in a lower dtype (MixedPrecision)

    def compute(self, M: Operator, b: Tensor, *, x0: Tensor | None = None, MT: Operator | None = None,
                preconditioner: Operator | None = None, state: Any = None) -> LinearSolution:
        raise NotImplementedError

    def solve(self, M: Operator, b: Tensor, *, x0: Tensor | None = None, MT: Operator | None = None,
              preconditioner: Operator | None = None, throw: bool = True, state: Any = None) -> LinearSolution:
        """Solve (I - M) u = b per sample.

        M: [B, n] -> [B, n], sample i's M acting on row i only (M = J^T: a VJP). MT: M^T (a JVP).
        x0: [B, n] initial guess (default zeros); a sample whose guess has a larger residual than zero starts
        from zero instead (one matvec to check; flagged in `rejected_guess`).
        preconditioner: P ~ (I - M)^{-1}, [B, n] -> [B, n].
        state: caller-owned state the solver carries between solves (a RecycleSpace for GCRODR), else None.
        throw: raise ConvergenceError / DivergenceError if any sample fails; else warn (ConvergenceWarning)
        and return the flags. Rows of diverged samples are NaN in both cases.
        """
        solution = self.compute(M, b, x0=x0, MT=MT, preconditioner=preconditioner, state=state)
        return report(solution, throw=throw)

    def _check_state(self, state: Any) -> Any:
        if state is not None:
            raise TypeError(f"{self.name}: state= carries a RecycleSpace between solves, which only solver "
                            f"'gcrodr' uses; got {type(state).__name__} for {self.name!r}")
        return None


@dataclass(frozen=True)
class LinearSolver(AbstractSolver):
    """Base of the linear solvers of (I - M) u = b, b: [B, n].

    A sample stops when ||b - (I - M) u|| <= max(atol, tol ||b||). `max_iter` bounds the iterations of the
    whole batch. Solves run under torch.no_grad (they are not differentiated through).
    """

    tol: float = 1e-6
    atol: float = 0.0
    max_iter: int = 1000

    fixes: ClassVar[dict] = {}        # per-status advice replacing the generic one in _FIXES

    def __post_init__(self):
        check_tolerance(type(self).__name__, self.tol, self.atol)

    def compute(self, M: Operator, b: Tensor, *, x0: Tensor | None = None, MT: Operator | None = None,
                preconditioner: Operator | None = None, state: Any = None) -> LinearSolution:
        """`solve` without the report: the LinearSolution carries each sample's status and nothing warns (bad
        inputs still raise)."""
        self._check_config()
        self._check_inputs(M, b, x0, MT)
        state = self._check_state(state)
        with torch.no_grad():
            run = _Run(self, M, MT, preconditioner, b.detach(), None if x0 is None else x0.detach())
            run.state = state
            if bool(run.running.any()) and run.budget > 0:
                self._iterate(run)
        return run.finish()

    # --- the per-solver piece --------------------------------------------------------------------------------
    def _iterate(self, run: _Run) -> None:
        """Restarted Krylov loop: cycles of recursive-residual iterations, each closed by a true residual (or its
        equal up to rounding where no further cycle needs it: _Run.close)."""
        while run.budget > 0 and bool(run.running.any()):
            members = run.running
            start, rows = run.rel, len(run.rows)
            broke = self._cycle(run, members)
            ended = run.close(members & run.running)   # the diverged keep their (NaN-bound) iterate
            if broke is not None:
                run.flag(broke, BREAKDOWN)
            if ended:                                  # every running sample has ended: no sync to ask
                break
            if run.budget > 0:
                no_progress = run.rel > (1.0 - STAGNATION) * start
                run.flag(members & (no_progress | (len(run.rows) == rows)), STAGNATED)

    def _cycle(self, run: _Run, members: Tensor) -> Tensor | None:
        """Iterate from the true residual run.r, updating run.u; return the samples that broke down at once."""
        raise NotImplementedError

    def _diagnosis(self, run: _Run, residuals: Tensor, samples: Tensor) -> str:
        """Extra text for a failure message (e.g. an estimated rate)."""
        return ""

    # --- checks and messages ---------------------------------------------------------------------------------
    def _check_config(self) -> None:
        check_tolerance(type(self).__name__, self.tol, self.atol)
        if self.max_iter < 0:
            raise ValueError(f"{self.name}: max_iter must be >= 0, got {self.max_iter}")

    def _check_inputs(self, M: Operator, b: Tensor, x0: Tensor | None, MT: Operator | None) -> None:
        if not callable(M):
            raise TypeError(f"{self.name}: M must be a callable [B, n] -> [B, n], got {type(M).__name__}")
        if not isinstance(b, Tensor):
            raise TypeError(f"{self.name}: b must be a torch.Tensor, got {type(b).__name__}")
        if b.dim() != 2:
            raise ShapeError(f"{self.name}: b has shape {tuple(b.shape)}; expected [B, n] "
                             "(add a batch dimension with b.unsqueeze(0), or flatten with b.flatten(1))")
        if not b.is_floating_point():
            raise DTypeError(f"{self.name}: b has dtype {b.dtype}; expected a real floating dtype")
        check_finite(b, f"{self.name}: b")
        if x0 is not None:
            if not isinstance(x0, Tensor):
                raise TypeError(f"{self.name}: x0 must be a torch.Tensor, got {type(x0).__name__}")
            if x0.shape != b.shape:
                raise ShapeError(f"{self.name}: x0 has shape {tuple(x0.shape)} but b has {tuple(b.shape)}; "
                                 "the initial guess needs b's shape")
            if x0.dtype != b.dtype:
                raise DTypeError(f"{self.name}: x0 has dtype {x0.dtype} but b has {b.dtype}")
            if x0.device != b.device:
                raise DeviceError(f"{self.name}: x0 is on {x0.device} but b is on {b.device}")
            check_finite(x0, f"{self.name}: x0")

    def _message(self, run: _Run, residuals: Tensor) -> str:
        B = run.status.numel()
        if B == 0:
            return f"{self.name}: empty batch (0 samples), nothing to solve"
        final = residuals[-1]
        ok = run.status == CONVERGED
        if bool(ok.all()):
            iters, worst = int(run.iterations.max()), float(final.max())
            if B == 1:
                return f"{self.name}: converged in {iters} iterations to {worst:.1e}"
            return f"{self.name}: all {B} samples converged in at most {iters} iterations to {worst:.1e}"
        dtype = str(run.b.dtype).replace("torch.", "")
        precision = ("I - J may be singular or badly conditioned (J has an eigenvalue near 1)"
                     if run.b.dtype == torch.float64 else
                     f"the tolerance may be below what {dtype} can reach: loosen tol or use float64")
        fields = {**asdict(self), "dtype": dtype, "precision": precision}
        parts = []
        for code in (SINGULAR, NONFINITE, GROWTH, INDEFINITE, BREAKDOWN, STAGNATED, MAX_ITER):
            mask = run.status == code
            if not bool(mask.any()):
                continue
            samples = mask.nonzero().squeeze(1)
            finite = final[samples][torch.isfinite(final[samples])]
            residual = float(finite.max()) if finite.numel() > 0 else math.nan
            which = samples.tolist()
            shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
            cause = _CAUSES[code].format(residual=residual, iters=int(run.iterations[samples].max()), **fields)
            fix = self.fixes.get(code, _FIXES[code]).format(**fields)
            if code == NONFINITE and _operator_not_finite(run, samples):
                fix = ("the operator itself returned NaN/Inf for a finite vector (M b, i.e. J^T b: the step's VJP), "
                       "so this is not a spectral-radius problem: the step's derivative is not finite at z* (e.g. "
                       "sqrt or log at 0, division by ~0, an overflow in its backward); check the step there")
            extra = self._diagnosis(run, residuals, samples)
            who = "" if B == 1 else f"{len(which)} of {B} samples (index {shown}) "
            parts.append(f"{who}{cause}{extra}; {fix}")
        done = int(ok.sum())
        head = f"{self.name}: " + (f"{done} of {B} samples converged; " if done else "")
        return head + "; ".join(parts)
