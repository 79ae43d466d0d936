"""Plain fixed-point iteration z_{t+1} = f(z_t)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_step_output
from ..results import FixedPoint, Status
from ._common import ForwardSolver, _BatchedStep

_MEASURE_CHUNK = 8      # steps whose residuals the exact loop measures together (bounds the iterates it keeps)


@dataclass(frozen=True)
class Iterate(ForwardSolver):
    """Picard iteration z_{t+1} = f(z_t) (with optional damping); converges at rate ~ rho(J).

    measure_last: (only for `Iterate.exactly`) evaluate f once more at the returned z_T to measure its residual
    (T + 1 step evaluations). False: exactly T evaluations, as a hand-written loop; the residual of z_T is then
    not measured (NaN in the last row of `residuals`): what one-step / truncated training uses, whose taped steps
    evaluate f(z_T) anyway.
    measure: (only for `Iterate.exactly`) False: no residual is measured at all (`residuals` is one NaN row, status
    MAX_ITER) and z_T's finiteness is left to the caller: the leanest loop, for a caller that checks its own output
    and keeps no record (ImplicitSlotAttention's one-step / truncated training step without return_info).
    """

    measure_last: bool = True
    measure: bool = True

    name = "iterate"

    @classmethod
    def exactly(cls, steps: int, damping: float = 0.0, measure_last: bool = True, measure: bool = True) -> Iterate:
        """Exactly `steps` plain iterations from z0, returning the last iterate: no stopping test, no
        best-iterate selection, no warning (what unrolled training and "T iterations" mean). Runs without a host
        sync per iteration (one finiteness check at the end)."""
        if int(steps) < 0:
            raise ValueError(f"Iterate.exactly: steps must be >= 0, got {steps}")
        if not measure and measure_last:
            raise ValueError("Iterate.exactly: measure=False measures no residual; pass measure_last=False with it")
        return cls(tol=0.0, atol=0.0, max_iter=int(steps), damping=damping, warn=False, return_best=False,
                   measure_last=measure_last, measure=measure)

    @property
    def is_exact(self) -> bool:
        """A fixed number of steps: no stopping test can fire before max_iter (tol = atol = 0), the last iterate is
        returned, nothing warns or raises."""
        return (self.tol == 0.0 and self.atol == 0.0 and not self.return_best and not self.warn
                and not self.throw)

    def _propose(self, state, z, fz):
        return fz

    def _loop(self, step, params, x, z0: Tensor) -> FixedPoint:
        if not self.is_exact:
            if not self.measure_last or not self.measure:
                raise ValueError("Iterate: measure_last=False needs exactly T steps, as does measure=False (use "
                                 "Iterate.exactly(T, measure_last=False)); a stopping test needs every residual")
            return super()._loop(step, params, x, z0)
        return self._exact_loop(step, params, x, z0)

    def _exact_loop(self, step, params, x, z0: Tensor) -> FixedPoint:
        """T steps without per-iteration host syncs or bookkeeping: the iterates and their images are kept in small
        chunks and their residuals measured one chunk at a time (a handful of tensor ops per chunk, not per step);
        NaN/Inf is looked for once."""
        B, T, d = z0.shape[0], self.max_iter, self.damping
        if not self.measure:                 # a bare loop on the state's own shape: the caller checks what it returns
            z = z0
            for t in range(T):
                fz = step(params, z, x)
                if t == 0 or not isinstance(fz, Tensor) or fz.shape != z.shape:
                    check_step_output(z, fz, "fpgrad.solve", call=t + 1)
                z = fz if d == 0.0 else z + (1.0 - d) * (fz - z)
            nan = torch.full((1, B), float("nan"), dtype=z.dtype, device=z.device)
            return FixedPoint(z, torch.full((B,), T, dtype=torch.long, device=z.device),
                              nan, torch.zeros(B, dtype=torch.bool, device=z.device), nan, self.name,
                              f"{self.name}: exactly {T} step(s) from z0 ({T} evaluations; no residual measured)",
                              T, {},
                              torch.full((B,), int(Status.MAX_ITER), dtype=torch.long, device=z.device), None)
        f = _BatchedStep(step, params, x, z0.shape[1:])
        z = z0.reshape(B, math.prod(z0.shape[1:]))
        tiny = torch.finfo(z.dtype).tiny
        trace, rel_trace = [], []
        points: list[Tensor] = []             # z_t and f(z_t) of the steps not yet measured
        images: list[Tensor] = []

        def measure() -> None:
            if images:
                Z, F = torch.stack(points), torch.stack(images)          # [c, B, n]
                r = torch.linalg.vector_norm(F - Z, dim=2)
                trace.append(r)
                rel_trace.append(r / (torch.linalg.vector_norm(F, dim=2) + tiny))
                points.clear()
                images.clear()

        for t in range(T + 1 if self.measure_last else T):
            fz = f(z, None)
            points.append(z)
            images.append(fz)
            if len(images) == _MEASURE_CHUNK:
                measure()
            if t < T:
                z = fz if d == 0.0 else z + (1.0 - d) * (fz - z)
        measure()
        if not self.measure_last:            # the residual of z_T: not evaluated
            nan = torch.full((1, B), float("nan"), dtype=z.dtype, device=z.device)
            trace.append(nan)
            rel_trace.append(nan)
        residuals, relative = torch.cat(trace), torch.cat(rel_trace)
        # one host sync: z_T is finite (a sum propagates NaN / Inf; a sum that overflowed is looked at closer)
        if not math.isfinite(float(z.sum())):
            self._check_finite(torch.ones(B, dtype=torch.bool, device=z.device), T, z)
        if self.measure_last:
            last, last_rel = residuals[-1], relative[-1]
            converged = (last == 0) & torch.isfinite(last)       # tol = 0: only an exact fixed point
            floor = last_rel <= 1e3 * torch.finfo(z.dtype).eps
            status = torch.where(converged, int(Status.CONVERGED),
                                 torch.where(floor, int(Status.STAGNATED), int(Status.MAX_ITER))).long()
        else:                                # z_T's residual unknown: not converged, stopped at its step count
            converged = torch.zeros(B, dtype=torch.bool, device=z.device)
            status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.long, device=z.device)
        steps = torch.full((B,), f.evaluations, dtype=torch.long, device=z.device)
        measured = "" if self.measure_last else "; the residual of z_T was not measured"
        message = f"{self.name}: exactly {T} step(s) from z0 ({f.evaluations} evaluations{measured})"
        return FixedPoint(z.reshape(z0.shape), steps, residuals, converged, relative, self.name, message,
                          f.evaluations, {}, status, None)
