"""Shared machinery of the forward solvers: the result type and the batched, per-sample loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .._checks import (
    check_batch,
    check_inputs,
    check_period,
    check_step_output,
    check_tolerance,
    host_check,
    sum_is_finite,
)
from ..errors import NonFiniteError
from ..results import FixedPoint, Status, report

__all__ = ["FixedPoint", "ForwardSolver", "contraction_estimate"]


def contraction_estimate(trace: Tensor, window: int = 10) -> Tensor:
    """Geometric rate of a residual trace over its last `window` steps:  (r_T / r_{T-w})^(1/w)."""
    T = trace.shape[0] - 1
    w = max(1, min(window, T))
    if T < 1:
        return torch.full(trace.shape[1:], float("nan"), dtype=trace.dtype, device=trace.device)
    r_end, r_start = trace[-1], trace[-1 - w]
    tiny = torch.finfo(trace.dtype).tiny
    return torch.exp((torch.log(r_end + tiny) - torch.log(r_start + tiny)) / w)


class _BatchedStep:
    """f on flat per-sample vectors, evaluated only on the active rows:  f(z[idx]) with x[idx]."""

    def __init__(self, step: Callable, params: Mapping[str, Tensor], x: Tensor, event_shape: torch.Size):
        self.step, self.params, self.x, self.event_shape = step, params, x, event_shape
        self.evaluations = 0

    def __call__(self, zf: Tensor, idx: Tensor | None) -> Tensor:
        self.evaluations += 1
        x = self.x if idx is None else self.x[idx]
        z = zf.reshape(zf.shape[0], *self.event_shape)
        out = self.step(self.params, z, x)
        if self.evaluations == 1 or not isinstance(out, Tensor) or out.shape != z.shape:
            check_step_output(z, out, "fpgrad.solve", call=self.evaluations)
        return out.reshape(zf.shape)


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance a forward solve of a map in `dtype` gets when tol=None: one the dtype can reach,
    1e-6 (float64), 1e-5 (float32), 1e-2 (bfloat16, float16: measured floors 2e-3 to 3e-3 in bfloat16, 2e-4 to
    4e-4 in float16 on tanh and slot attention maps)."""
    return {torch.float64: 1e-6, torch.float32: 1e-5}.get(dtype, 1e-2)


@dataclass(frozen=True)
class ForwardSolver:
    """Base of the forward solvers: stopping rule, damping and the per-sample loop.

    tol: relative tolerance (None: default_tolerance(dtype of z0): 1e-6 in float64, 1e-5 in float32, 1e-2 in
    bfloat16 / float16), atol: absolute; a sample stops when ||f(z) - z|| <= atol + tol * ||f(z)||.
    damping d: z_next = z + (1 - d) (proposal - z).
    throw: raise ConvergenceError instead of warning when a sample does not converge; warn=False
    silences the warning (the result still carries `converged`).
    return_best: return each sample's lowest-residual iterate (default) rather than its last one.
    Anderson and Broyden restart a sample from its best iterate with an empty history when its
    residual exceeds restart_factor x its best, or has not improved for `patience` steps.
    check_every: how often the loop asks the host whether every sample has converged, which samples are
    still active, and whether a NaN/Inf appeared (each question is a device -> host synchronisation, which
    stalls a GPU's stream). None (default): every iteration on the CPU, every 8 on CUDA. Between checks the
    per-sample masking stays on the device: a sample that converged keeps its result (later evaluations of
    it are discarded), a NaN is recorded with its iteration and raised at the next check, restarts are
    applied by mask. The result equals check_every=1's up to round-off (the active subset evaluated at a
    time can differ, so kernels may see other batch shapes). A check also predicts, from the rate at which
    each sample's residual fell since the previous one, when the slowest will stop, and the next check comes
    then (never later than check_every): on tanh maps 0.05-0.7 iterations run past the last convergence on
    average at check_every=8 instead of 3.5 (never more than check_every - 1).
    """

    tol: float | None = None
    atol: float = 0.0
    max_iter: int = 200
    damping: float = 0.0
    throw: bool = False
    warn: bool = True
    restart_factor: float = 1e2
    patience: int = 50
    return_best: bool = True
    check_every: int | None = None

    name = "base"
    restarts = False   # quasi-Newton methods restart from the best iterate when the residual blows up

    def __post_init__(self):
        check_tolerance(f"fpgrad.solve(method='{self.name}')", self.tol, self.atol)

    # --- the per-method pieces -------------------------------------------------------------
    def _init(self, z: Tensor, fz: Tensor) -> Any:
        return None

    def _propose(self, state: Any, z: Tensor, fz: Tensor) -> Tensor:
        raise NotImplementedError

    def _update(self, state: Any, z: Tensor, fz: Tensor, z_new: Tensor, fz_new: Tensor,
                active: Tensor) -> Any:
        """Take the step z, fz -> z_new, fz_new into the history of the samples in `active` (a column [B, 1])."""
        return state

    def _restart(self, state: Any, z: Tensor, fz: Tensor, keep: Tensor) -> Any:
        """Empty the history of the samples not in `keep` (a column [B, 1]; they restart from z, fz)."""
        return state

    def _info(self, state: Any) -> dict:
        return {}

    # --- the shared loop --------------------------------------------------------------------
    def solve(self, step: Callable, params: Mapping[str, Tensor], x: Tensor, z0: Tensor, *,
              batched: bool = True, check: bool = True) -> FixedPoint:
        """Iterate z = step(params, z, x) from z0.  z0: [B, *event] (or [*event] with batched=False)."""
        if self.tol is None:
            return replace(self, tol=default_tolerance(z0.dtype)).solve(step, params, x, z0, batched=batched,
                                                                         check=check)
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"{self.name}: damping must be in [0, 1), got {self.damping}")
        if self.max_iter < 0:
            raise ValueError(f"{self.name}: max_iter must be >= 0, got {self.max_iter}")
        check_period(self.check_every, getattr(z0, "device", "cpu"), self.name)
        if check:
            check_inputs(params, z0, x, where=f"fpgrad.solve(method='{self.name}')")
        if not batched:
            z0 = z0.unsqueeze(0)
            x = x.unsqueeze(0) if x is not None else None
        check_batch(z0, x, where=f"fpgrad.solve(method='{self.name}')")
        with torch.no_grad():
            result = self._loop(step, params, x, z0.detach())
        if not batched:
            result = FixedPoint(result.z[0], result.steps[0], result.residuals[:, 0], result.converged[0],
                                result.relative_residuals[:, 0], result.method, result.message,
                                result.evaluations, result.info, result.status[0], result.inverse)
        return report(result, message="fpgrad.solve: " + result.message, throw=self.throw, warn=self.warn)

    def check_period(self, device: torch.device) -> int:
        """Iterations between host checks on `device` (check_every, or its default there)."""
        return check_period(self.check_every, device, self.name)

    def _loop(self, step, params, x, z0: Tensor) -> FixedPoint:
        # Each line below is a kernel per iteration on a GPU, where small maps are bound by launches: the
        # bookkeeping is kept to what the per-sample flags need (no clones of tensors only ever rebound, one
        # finiteness test on the step's difference, ||best f|| tracked rather than recomputed, the restart
        # safeguard only for the methods that restart).
        B = z0.shape[0]
        f = _BatchedStep(step, params, x, z0.shape[1:])
        z = z0.reshape(B, math.prod(z0.shape[1:]))         # (not -1: B may be 0)
        fz = f(z, None)
        self._check_finite(torch.ones(B, dtype=torch.bool, device=z.device), 0, fz)
        # every per-sample quantity of the loop is a column [B, 1]: it broadcasts against the rows [B, n] without
        # an unsqueeze a step (each one a dispatch on a GPU); flattened to [B] once, after the loop
        res = (fz - z).norm(dim=1, keepdim=True)
        ref = fz.norm(dim=1, keepdim=True)
        tiny = torch.finfo(z.dtype).tiny
        # (the largest finite value: best_res > min(bound, big) is "not stopped" for an infinite best_res too)
        big = torch.finfo(z.dtype).max
        converged = (res <= self.atol + self.tol * ref) & torch.isfinite(res)   # inf <= tol * inf is no stop
        best_z, best_fz, best_res, best_ref = z.clone(), fz.clone(), res, ref
        # the samples still iterating; each iteration's mask is kept and summed once at the end into the steps
        active = ~converged
        actives: list[Tensor] = []
        # best residual and ||f|| of each iteration; the relative trace is divided once at the end (never
        # modified in place: every update rebinds)
        trace, ref_trace = [res], [ref]
        state = self._init(z, fz)
        since_best = torch.zeros(B, 1, dtype=torch.long, device=z.device)
        zero = torch.zeros((), dtype=torch.long, device=z.device)
        period = self.check_period(z.device)
        # with period > 1: max over iterations of bad * (last - it): the iteration at which each sample first held a
        # NaN/Inf is last - score where score > 0 (two operations a step), read at a check
        last = self.max_iter + 1
        bad_score = torch.zeros(B, 1, dtype=torch.long, device=z.device) if period > 1 else None
        idx = None
        next_check = 1
        for it in range(1, self.max_iter + 1):
            if it == next_check:                            # the host check: the only syncs of the iteration
                if bad_score is not None:
                    self._raise_recorded_nonfinite(bad_score, last)
                # with period > 1 the next check comes when the slowest sample is predicted to stop (<= period)
                gap = min(period, len(trace) - 1) if period > 1 else 0
                n_active, ahead = host_check(active, period, trace[-1], trace[-1 - gap] if gap else None, gap,
                                             self.atol + self.tol * ref_trace[-1] if gap else 0.0)
                if n_active == 0:
                    break
                next_check = it + ahead
                idx = None if n_active == B else active.view(-1).nonzero().squeeze(1)
            proposal = self._propose(state, z, fz)
            if self.damping:
                proposal = z + (1.0 - self.damping) * (proposal - z)
            sound = None
            if self.restarts:
                # quasi-Newton mixing can overflow on its own (half precision at the round-off floor, where the
                # history is degenerate): such a sample takes the plain step f(z) instead and restarts its
                # history, rather than a NaN blamed on the map (sums in float32: fp16 rows can sum past 65504)
                sound = torch.isfinite(proposal.sum(dim=1, keepdim=True, dtype=torch.float32))
                proposal = torch.where(sound, proposal, fz)
            if idx is None:
                fz_new = f(proposal, None)
            else:
                fz_new = fz.clone()
                fz_new[idx] = f(proposal[idx], idx)
            diff = fz_new - proposal
            # a NaN/Inf in an active row of the proposal or of f(proposal) leaves one in its difference
            finite = torch.isfinite(diff).all(dim=1, keepdim=True)
            if bad_score is None:
                if bool((active & ~finite).any()):
                    self._check_finite(active.view(-1), it, proposal, fz_new)   # names the samples (exact test)
            else:
                bad_score = torch.maximum(bad_score, torch.where(finite, 0, active * (last - it)))
            state = self._update(state, z, fz, proposal, fz_new, active)
            z = torch.where(active, proposal, z)
            fz = torch.where(active, fz_new, fz)
            res = torch.where(active, diff.norm(dim=1, keepdim=True), res)
            # (a sample out of `active` keeps res and best_res, and res >= best_res (or NaN) holds after every
            # iteration, so `res < best_res` is already False for it)
            better = res < best_res if self.return_best else active
            best_z = torch.where(better, z, best_z)
            best_fz = torch.where(better, fz, best_fz)
            best_res = torch.where(better, res, best_res)
            best_ref = torch.where(better, fz_new.norm(dim=1, keepdim=True), best_ref)
            actives.append(active)
            # the flag describes the returned (best) iterate, never a transient one: a sample stops when
            # best_res <= bound and best_res < inf (inf <= tol * inf is no stop). best_res and bound are never NaN
            # (a NaN residual is never `better`; a NaN at the start raised), so "not stopped" is
            # best_res > min(bound, largest finite value)
            bound = self.tol * best_ref if not self.atol else self.atol + self.tol * best_ref
            running = best_res > bound.clamp_(max=big)
            if self.restarts:
                # safeguard for quasi-Newton methods: a sample whose residual blew up, or that made no progress
                # for `patience` steps, restarts from its best iterate with an empty history
                since_best = torch.where(better, zero, since_best + active)
                # `keep`: the samples not restarted (the complement of "lost", without its negation). No `active &`:
                # a sample out of `active` keeps res <= restart_factor * best_res and since_best < patience from
                # when it was last active; if its discarded proposal broke, restarting it changes nothing that is
                # read: its result is best_z
                keep = sound & (res <= self.restart_factor * best_res) & (since_best < self.patience)
                # (between host checks the restart is applied by mask: a no-op for the samples kept). res is not
                # reset: an active sample's is measured afresh next iteration, and an idle one's is never read
                if period > 1 or not bool(keep.all()):
                    since_best = torch.where(keep, since_best, zero)
                    z = torch.where(keep, z, best_z)
                    fz = torch.where(keep, fz, best_fz)
                    state = self._restart(state, z, fz, keep)
            trace.append(best_res)
            ref_trace.append(best_ref)
            active = active & running
        converged = ~active.view(-1)
        steps = 1 + (torch.stack(actives).sum(0).view(-1) if actives
                     else torch.zeros(B, dtype=torch.long, device=z.device))
        if bad_score is not None:
            self._raise_recorded_nonfinite(bad_score, last)
            # the iterations run after the last sample converged add rows that check_every=1 does not
            used = int(steps.max()) if B else 1
            trace, ref_trace = trace[:used], ref_trace[:used]
        residuals = torch.stack(trace).view(len(trace), B)
        relative = residuals / (torch.stack(ref_trace).view(len(trace), B) + tiny)
        best_rel = relative[-1]
        message = self._message(residuals, converged, steps, best_rel)
        info = self._info(state)
        # a sample stopped at the round-off floor of its dtype stagnated; any other unconverged one hit max_iter
        floor = (best_rel <= 1e3 * torch.finfo(best_rel.dtype).eps) & (best_rel > self.tol)
        status = torch.where(converged, int(Status.CONVERGED),
                             torch.where(floor, int(Status.STAGNATED), int(Status.MAX_ITER))).long()
        return FixedPoint(best_z.reshape(z0.shape), steps, residuals, converged, relative,
                          self.name, message, f.evaluations, info, status, info.pop("inverse", None))

    def _check_finite(self, active: Tensor, it: int, *tensors: Tensor) -> None:
        """Raise if an active sample's row of any [B, n] tensor holds NaN/Inf (per-sample sums first)."""
        if bool(torch.stack([active & ~sum_is_finite(t, dim=1) for t in tensors]).any()):
            # a NaN/Inf, or a sum that overflowed: look closer
            bad = active & ~torch.stack([torch.isfinite(t).all(dim=1) for t in tensors]).all(0)
            if bool(bad.any()):
                samples = bad.nonzero().squeeze(1).tolist()
                raise self._nonfinite(it, samples)

    def _nonfinite(self, it: int, samples: list[int]) -> NonFiniteError:
        err = NonFiniteError(
            f"fpgrad.solve(method='{self.name}'): NaN/Inf appeared at iteration {it} in sample(s) "
            f"{samples[:10]}; the map overflowed: check its inputs and parameters, add damping, "
            f"or use method='iterate'")
        err.samples, err.iteration = samples, it       # (read by the vmap rule, which unfolds the indices)
        return err

    def _raise_recorded_nonfinite(self, bad_score: Tensor, last: int) -> None:
        """Raise for the samples with a recorded NaN/Inf (check_every > 1): bad_score = max over iterations of
        bad * (last - it), so the first such iteration is last - max(bad_score)."""
        seen = bad_score.view(-1) > 0
        if bool(seen.any()):
            samples = seen.nonzero().squeeze(1).tolist()
            it = last - int(bad_score.max())
            raise self._nonfinite(it, samples)

    def _other_methods(self) -> str:
        """The accelerated methods this solver is not (never advise the method that just failed)."""
        others = [name for name in ("anderson", "broyden") if name != self.name]
        return "method=" + " / ".join(f"'{name}'" for name in others)

    def _message(self, residuals: Tensor, converged: Tensor, steps: Tensor, relative: Tensor) -> str:
        B = converged.numel()
        if B == 0:
            return f"{self.name}: empty batch (0 samples), nothing to solve"
        worst = float(residuals[-1].max())
        if bool(converged.all()):
            return (f"{self.name}: all {B} sample(s) converged in at most {int(steps.max())} steps "
                    f"(worst residual {worst:.2e})")
        bad = (~converged).nonzero().squeeze(1)
        rate = contraction_estimate(residuals[:, bad]).max()
        rate = float(rate)
        floor = float(relative[bad].max())
        eps = torch.finfo(relative.dtype).eps
        if floor <= 1e3 * eps and self.tol < floor:
            dtype = str(relative.dtype).replace("torch.", "")
            cause = (f"the residual stalled at {floor:.1e} relative, the round-off floor of {dtype}: tol {self.tol:g} "
                     f"is below what {dtype} can reach; loosen tol (>= {10 * floor:.0e}) or use float64")
        elif not math.isfinite(rate) or rate >= 0.9999:
            cause = (f"the residual is not decreasing (ratio {rate:.4f} per step over the last steps): the map "
                     "is likely not contractive here (spectral radius of J >= 1); check "
                     f"fpgrad.spectral.spectral_radius, add damping, or try {self._other_methods()}")
        else:
            rel = float(relative[bad].max())
            more = math.log(max(self.tol, 1e-300) / max(rel, 1e-300)) / math.log(rate) if rate > 0 else 0
            cause = (f"it is converging slowly (rate {rate:.4f} per step; roughly {more:.0f} more steps needed): "
                     f"raise max_iter or use {self._other_methods()}")
        return (f"{self.name}: {bad.numel()} of {B} sample(s) did not converge in {self.max_iter} steps "
                f"(worst residual {worst:.2e}, tol {self.tol:g}, atol {self.atol:g}); {cause}")
