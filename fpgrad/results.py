"""What every solve answers, in one place: the per-sample `Status`, the result types, and the one function that
warns or raises about them (`report`, used by `fpgrad.solve`, the linear solvers' `solve`, the estimators and
`fpgrad.gradient` / `fixed_point`).

Names shared by every result: a per-sample `status` ([B] long tensor of `Status` codes, `statuses` as a list),
`converged` ([B] bool), `message` (readable, names the fix), `iterations` ([B]), `relative_residual` ([B], the
final ||residual|| / ||right-hand side||) and a `residuals` trace whose docstring says whether it is absolute
(FixedPoint) or relative (LinearSolution, SeriesResidual).

Warnings point at the caller's line (the first frame outside fpgrad and torch, computed, never a fixed
stacklevel). Under Python's "default" warning action a warning repeated from the same line (the same text
up to its numbers) is shown in full the first time, then summarised with a count at the 10th, 100th, ...
repeat; every result still carries its status. Any other action ("always", "error", "ignore", as set by
`warnings.simplefilter` or pytest.warns) applies to every warning as usual.
"""

from __future__ import annotations

import enum
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import ConvergenceError, ConvergenceWarning, DivergenceError, SingularSystemError

if TYPE_CHECKING:                          # pragma: no cover
    from .forward._broyden import LowRankInverse


class Status(enum.IntEnum):
    """Per-sample outcome of a solve; `Status(code).message` reads it, `.ok` says whether it is a success."""

    RUNNING = 0          # internal: still iterating
    CONVERGED = 1        # reached its tolerance
    MAX_ITER = 2         # stopped at the iteration budget above its tolerance
    STAGNATED = 3        # stopped making progress (round-off floor, or restarted GMRES stagnation)
    BREAKDOWN = 4        # the method broke down (a zero inner product)
    NONFINITE = 5        # NaN/Inf appeared
    DIVERGED = 6         # the residual grew without bound
    INDEFINITE = 7       # CG met p^T A p <= 0: the system is not positive definite
    SINGULAR = 8         # I - J is singular
    TRUNCATED = 9        # a truncated series: an approximation that leaves the residual it reports (no failure)

    @property
    def message(self) -> str:
        return _STATUS_MESSAGES[self]

    @property
    def ok(self) -> bool:
        """CONVERGED, or TRUNCATED (a series that does what it promises: k terms)."""
        return self in (Status.CONVERGED, Status.TRUNCATED)

    @property
    def diverged(self) -> bool:
        return self in DIVERGED


_STATUS_MESSAGES = {
    Status.RUNNING: "still running",
    Status.CONVERGED: "converged to its tolerance",
    Status.MAX_ITER: "did not converge within max_iter",
    Status.STAGNATED: "stagnated before its tolerance",
    Status.BREAKDOWN: "the method broke down",
    Status.NONFINITE: "NaN/Inf appeared",
    Status.DIVERGED: "diverged (the residual grew without bound)",
    Status.INDEFINITE: "the system is not positive definite",
    Status.SINGULAR: "the system is singular",
    Status.TRUNCATED: "truncated series: an approximation with the residual it reports",
}

DIVERGED = (Status.NONFINITE, Status.DIVERGED, Status.INDEFINITE, Status.SINGULAR)
_OK = (int(Status.CONVERGED), int(Status.TRUNCATED))


def _ok(status: Tensor) -> Tensor:
    return (status == int(Status.CONVERGED)) | (status == int(Status.TRUNCATED))


def _statuses(status: Tensor) -> list[Status]:
    return [Status(int(c)) for c in status.reshape(-1).tolist()]


def status_from_flags(converged: Tensor, diverged: Tensor | None = None) -> Tensor:
    """[B] Status codes from converged / diverged flags (CONVERGED, DIVERGED, else MAX_ITER)."""
    code = torch.where(converged, int(Status.CONVERGED), int(Status.MAX_ITER))
    if diverged is not None:
        code = torch.where(diverged, int(Status.DIVERGED), code)
    return code.long()


class _Result:
    """What every result shares (status, converged, message)."""

    status: Tensor
    message: str

    @property
    def statuses(self) -> list[Status]:
        """The per-sample status as a list of Status (flattened)."""
        return _statuses(self.status)

    @property
    def ok(self) -> bool:
        """Every sample converged (or, for a truncated series, did what it promises)."""
        return bool(_ok(self.status).all())


# --- forward --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FixedPoint(_Result):
    """Result of a forward solve of z = f(z).

    z: the state with the lowest residual found per sample (shape of z0).
    steps: [B] step evaluations per sample (0-dim when the state was unbatched); also `iterations`.
    residuals: [T + 1, B] ABSOLUTE residual ||f(z_t) - z_t|| per iteration (frozen once a sample stops).
    relative_residuals: [T + 1, B] the same divided by ||f(z_t)||; `relative_residual`: [B] its last row.
    converged: [B] bool, residual <= atol + tol * ||f(z)||.  status: [B] Status (CONVERGED, MAX_ITER, or
    STAGNATED at the dtype's round-off floor).  evaluations: batched step calls (products).
    inverse: the inverse-Jacobian estimate Broyden / Anderson built (LowRankInverse), None for others.
    info: other per-method extras (e.g. "dropped_updates" of Broyden).
    """

    z: Tensor
    steps: Tensor
    residuals: Tensor
    converged: Tensor
    relative_residuals: Tensor
    method: str
    message: str
    evaluations: int
    info: dict = field(default_factory=dict)
    status: Tensor | None = None
    inverse: LowRankInverse | None = None

    def __post_init__(self):
        if self.status is None:       # built by hand from the flags: derive the status from them
            object.__setattr__(self, "status", status_from_flags(self.converged))

    @property
    def residual(self) -> Tensor:
        """[B] final absolute residual of the returned z."""
        return self.residuals[-1]

    @property
    def relative_residual(self) -> Tensor:
        """[B] final relative residual ||f(z) - z|| / ||f(z)|| of the returned z."""
        return self.relative_residuals[-1]

    @property
    def iterations(self) -> Tensor:
        return self.steps

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


# --- linear solves --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearSolution(_Result):
    """Result of a batched solve of (I - M) u = b.

    u: [B, n] solution (rows of diverged samples are NaN, never a plausible number).
    residuals: [iters + 1, B] RELATIVE residual ||b - (I - M) u|| / ||b|| per iteration of the batch, row 0
        the initial guess (recursive estimates inside Krylov cycles); a sample's entries are frozen while it
        does not iterate, and from its last iteration on they are the true residual of the returned u (for
        GMRES, where rounding cannot change the verdict, the one formed from its basis: equal up to rounding).
    converged, diverged: [B] bool.  iterations: [B] long.  status: [B] Status of each sample.
    matvecs / rmatvecs: applications of M / M^T (batched calls: VJPs / JVPs in fpgrad); of the matvecs,
    low_precision_matvecs ran in a lower dtype (MixedPrecision).
    rejected_guess: samples whose initial guess x0 was worse than zero (they started from zero).
    """

    u: Tensor
    residuals: Tensor
    converged: Tensor
    diverged: Tensor
    iterations: Tensor
    matvecs: int
    rmatvecs: int
    solver: str
    message: str
    rejected_guess: Tensor | None = None   # [B] bool: x0 had a larger residual than zero and was dropped
    status: Tensor | None = None
    low_precision_matvecs: int = 0

    def __post_init__(self):
        if self.status is None:
            object.__setattr__(self, "status", status_from_flags(self.converged, self.diverged))

    @property
    def residual(self) -> Tensor:
        """[B] final relative residual ||b - (I - M) u|| / ||b||."""
        return self.residuals[-1]

    @property
    def relative_residual(self) -> Tensor:
        return self.residuals[-1]


# --- truncated series -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesResidual(_Result):
    """What a truncated series (Neumann, Phantom) leaves of the adjoint system (I - J^T) u = g.

    residual: [B] RELATIVE residual ||g - (I - J^T) u|| / ||g|| of the returned u (measured with the pullback's
    own VJP: no extra product); also `relative_residual`. solved: [B] residual <= tol, the tolerance Implicit()
    would use by default; almost always False: the series is an approximation of the implicit gradient, and
    this says how far it is from solving the system. status: CONVERGED (solved), TRUNCATED (an approximation,
    residual below that of u = 0) or DIVERGED (residual above that of u = 0: the terms grow). A small residual
    does not prove the error small (it is amplified by up to 1 / sigma_min(I - J)), and a few terms cannot
    reveal rho(J) >= 1 (benchmarks/silent_failures.py).
    """

    estimator: str
    residual: Tensor
    terms: int
    tol: float
    solved: Tensor
    message: str
    status: Tensor | None = None

    def __post_init__(self):
        if self.status is None:
            code = torch.where(self.solved, int(Status.CONVERGED), int(Status.TRUNCATED))
            code = torch.where(self.residual > 1.0, int(Status.DIVERGED), code)
            object.__setattr__(self, "status", code.long())

    @property
    def relative_residual(self) -> Tensor:
        return self.residual

    @property
    def converged(self) -> Tensor:
        return self.solved

    @property
    def iterations(self) -> Tensor:
        return torch.full_like(self.status, self.terms)


# --- gradients and their cost ---------------------------------------------------------------------------------------

@dataclass
class CostRecord:
    """Work done by a forward solve and an estimator, accumulated while it runs.

    vjps / jvps: vector-Jacobian / Jacobian-vector products with the step (a batched call counts one).
    forward_steps: step evaluations without the tape; backward_steps: step evaluations on the tape.
    bytes_saved: bytes held for backward (measured by fpgrad.gradient with saved-tensor hooks).
    seconds: wall time of the work recorded (fixed_point's forward plus its adjoint backward; fpgrad.gradient's
    whole call).
    A caller owns this object and passes it in (`fixed_point(..., record=CostRecord())`).
    """

    vjps: int = 0
    jvps: int = 0
    forward_steps: int = 0
    backward_steps: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0
    low_precision_vjps: int = 0                      # of the vjps, those in a lower dtype (mixed precision)
    forward: list = field(default_factory=list)      # FixedPoint results of the forward solves
    solves: list = field(default_factory=list)       # LinearSolution results of the adjoint solves
    series: list = field(default_factory=list)       # SeriesResidual of the truncated series (Neumann, Phantom)
    messages: list = field(default_factory=list)

    def reset(self) -> None:
        """Zero the counters and forget the recorded results (to count the next piece of work on its own)."""
        self.vjps = self.jvps = self.forward_steps = self.backward_steps = self.bytes_saved = 0
        self.low_precision_vjps = 0
        self.seconds = 0.0
        for kept in (self.forward, self.solves, self.series, self.messages):
            kept.clear()

    def __repr__(self) -> str:
        """Counts and the lengths of the kept lists (never their tensors)."""
        kept = ", ".join(f"{name}=[{len(getattr(self, name))} kept]" for name in ("forward", "solves", "series",
                                                                                   "messages"))
        return (f"CostRecord(vjps={self.vjps}, jvps={self.jvps}, forward_steps={self.forward_steps}, "
                f"backward_steps={self.backward_steps}, bytes_saved={self.bytes_saved}, seconds={self.seconds:.3g}, "
                f"low_precision_vjps={self.low_precision_vjps}, {kept})")

    def snapshot(self) -> Cost:
        return Cost(self.vjps, self.jvps, self.forward_steps, self.backward_steps, self.bytes_saved, self.seconds)


@dataclass(frozen=True)
class Cost:
    """The cost of one gradient: see CostRecord for the fields."""

    vjps: int = 0
    jvps: int = 0
    forward_steps: int = 0
    backward_steps: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"vjps": self.vjps, "jvps": self.jvps, "forward_steps": self.forward_steps,
                "backward_steps": self.backward_steps, "bytes_saved": self.bytes_saved, "seconds": self.seconds}


@dataclass(frozen=True)
class Gradient:
    """Result of fpgrad.gradient: gradients of the loss at the (approximate) fixed point.

    params: dict like the map's params; x: gradient w.r.t. the inputs; z: the state the loss saw;
    loss: its value; cost: work done; forward: the forward solve if one ran; solve: the adjoint linear solve
    for Implicit; series: for Neumann and Phantom, the residual their truncated series leaves in the adjoint
    system. `status` / `message` / `ok`: those of the first of forward, solve, series that did not succeed.
    """

    params: dict[str, Tensor]
    x: Tensor | None
    z: Tensor
    loss: Tensor
    cost: Cost
    estimator: str
    forward: FixedPoint | None = None
    solve: LinearSolution | None = None
    z0: Tensor | None = None
    series: SeriesResidual | None = None

    def flat(self) -> Tensor:
        """All parameter gradients concatenated in key order (for errors and cosines)."""
        return torch.cat([self.params[k].reshape(-1) for k in sorted(self.params)])

    def _parts(self) -> list:
        return [r for r in (self.forward, self.solve, self.series) if r is not None]

    @property
    def status(self) -> Tensor | None:
        """[B] Status per sample: the forward's where it failed, else the adjoint solve's / series' (None when
        no solve ran, e.g. Unrolled without a forward record)."""
        parts = self._parts()
        if not parts:
            return None
        out = parts[0].status.reshape(-1)
        for part in parts[1:]:
            s = part.status.reshape(-1)
            if s.shape == out.shape:
                out = torch.where(_ok(out), s, out)
        return out

    @property
    def statuses(self) -> list[Status]:
        status = self.status
        return [] if status is None else _statuses(status)

    @property
    def ok(self) -> bool:
        return all(part.ok for part in self._parts())

    @property
    def message(self) -> str:
        parts = self._parts()
        failed = [p.message for p in parts if not p.ok]
        return "; ".join(failed) if failed else "; ".join(p.message for p in parts)


# --- the one place that warns or raises -----------------------------------------------------------------------------

def report(result: Any, *, message: str | None = None, throw: bool = False, warn: bool = True,
           raise_diverged: bool = False) -> Any:
    """Warn about (or raise) a result whose status is not all ok; return the result.

    message: the text (default result.message). throw: raise ConvergenceError (DivergenceError for diverged
    samples, SingularSystemError for singular ones) instead of warning; raise_diverged: raise for diverged
    samples even without throw. The error carries the result as `.solution`.
    """
    if not (throw or warn or raise_diverged):        # nothing to say: no host sync to read the status
        return result
    status = result.status
    if status is None or bool(_ok(status).all()):      # (a Gradient of an estimator that ran no solve: None)
        return result
    text = result.message if message is None else message
    codes = set(status.reshape(-1).tolist())
    diverged = any(int(c) in codes for c in DIVERGED)
    if throw or (raise_diverged and diverged):
        if int(Status.SINGULAR) in codes:
            error = SingularSystemError(text)
        elif diverged:
            error = DivergenceError(text)
        else:
            error = ConvergenceError(text)
        error.solution = result
        raise error
    if warn:
        _emit(text)
    return result


# fpgrad's own folder (this file's) and torch's: frames there are skipped when looking for the caller's line
_SKIP = tuple(os.path.join(os.path.dirname(os.path.abspath(path)), "") for path in (__file__, torch.__file__))
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_REPEATS: dict = {}
_LOCK = threading.Lock()


def _caller() -> tuple[int, Any]:
    """(stacklevel for warnings.warn called from warn(), the frame) of the first frame outside fpgrad and torch."""
    frame, level = sys._getframe(1), 1            # _emit's frame: stacklevel 1 for the warnings.warn it calls
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame, level = frame.f_back, level + 1
    return (level, frame) if frame is not None else (1, None)


def _action(text: str, category: type, module: str, lineno: int) -> str:
    """The warnings filter action that applies to this warning (as warnings.warn_explicit chooses it)."""
    for action, msg, cat, mod, ln in warnings.filters:
        if ((msg is None or msg.match(text)) and issubclass(category, cat)
                and (mod is None or mod.match(module)) and (ln == 0 or ln == lineno)):
            return action
    return warnings.defaultaction


def _emit(message: str, category: type[Warning] = ConvergenceWarning) -> None:
    """Warn at the caller's line (first frame outside fpgrad and torch); under the "default" action a warning
    repeated from one line is shown once in full, then as a count at its 10th, 100th, ... repeat."""
    level, frame = _caller()
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    if _action(message, category, frame.f_globals.get("__name__", ""), lineno) != "default":
        warnings.warn(message, category, stacklevel=level)
        return
    key = (category, _NUMBER.sub("#", message), filename, lineno)
    with _LOCK:
        seen = _REPEATS.get(key, -1) + 1
        _REPEATS[key] = seen
    if seen == 0:
        warnings.warn(message, category, stacklevel=level)
    elif _power_of_ten(seen):
        head = message if len(message) <= 160 else message[:157] + "..."
        warnings.warn(f"{head} (repeated {seen} times since, from this line; each result carries its status and "
                      "message: see .status / .message)", category, stacklevel=level)


def _power_of_ten(n: int) -> bool:
    return n >= 10 and str(n).rstrip("0") == "1"


warn = _emit


def reset_warnings() -> None:
    """Forget the repeat counts (the next warning from each line is shown in full again)."""
    with _LOCK:
        _REPEATS.clear()


__all__ = [
    "Cost",
    "CostRecord",
    "FixedPoint",
    "Gradient",
    "LinearSolution",
    "SeriesResidual",
    "Status",
    "report",
    "reset_warnings",
    "warn",
]
