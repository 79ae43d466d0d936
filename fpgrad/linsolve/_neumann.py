"""Neumann series (Richardson iteration) for (I - M) u = b: `NeumannSeries` (the estimator of the same idea, truncated
at k terms, is fpgrad.estimators.Neumann)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ._common import GROWTH, MAX_ITER, NONFINITE, LinearSolver, _Run


@dataclass(frozen=True)
class NeumannSeries(LinearSolver):
    """Neumann series iterated to tol:  u_{k+1} = u_k + P (b - (I - M) u_k).

    Without a preconditioner this is u_{k+1} = b + M u_k, the partial sums of sum_k M^k b: it converges iff
    the spectral radius of M (= that of J) is < 1, and at that rate. One matvec per iteration, and the
    residual it reports is exact (r_k = b + M u_k - u_k). A residual growing for `WINDOW` consecutive
    iterations by more than `RATE` per iteration counts as diverged.
    """

    max_iter: int = 500

    name: ClassVar[str] = "neumann"
    WINDOW: ClassVar[int] = 10
    RATE: ClassVar[float] = 1.02
    fixes: ClassVar[dict] = {
        MAX_ITER: "the Neumann series converges at the rate of the spectral radius of J, slowly when it is close "
                  "to 1: raise max_iter or use solver='gmres'",
        GROWTH: "the Neumann series diverges when the spectral radius of J is >= 1: use solver='gmres'",
        NONFINITE: "the Neumann series diverges when the spectral radius of J is >= 1: use solver='gmres'",
    }

    def _iterate(self, run: _Run) -> None:
        streak = torch.zeros_like(run.status)    # consecutive iterations with a growing residual
        before = run.rel                              # residual just before the current streak
        while run.budget > 0 and bool(run.running.any()):
            active, previous = run.running, run.rel
            run.u = torch.where(active.unsqueeze(1), run.u + run.precondition(run.r), run.u)
            run.refresh(active, record=True)
            streak = torch.where(active & (run.rel > previous), streak + 1, 0)
            before = torch.where(streak == 1, previous, before)
            rate = (run.rel / before) ** (1.0 / streak.clamp(min=1))
            run.flag((streak >= self.WINDOW) & (rate > self.RATE), GROWTH)

    def _diagnosis(self, run: _Run, residuals: Tensor, samples: Tensor) -> str:
        last = run.last_row[samples]
        window = last.clamp(max=self.WINDOW)
        end = residuals[last, samples]
        start = residuals[last - window, samples]
        rate = (end / start) ** (1.0 / window.clamp(min=1))
        rate = rate[torch.isfinite(rate)]
        if rate.numel() == 0:
            return ""
        return (f" (the residual changed by x{float(rate.max()):.3g} per iteration over the last iterations, an "
                "estimate of the spectral radius of J)")
