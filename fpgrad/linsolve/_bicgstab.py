"""BiCGSTAB (van der Vorst) for non-symmetric I - M, batched with per-sample masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import check_period, host_check
from ._common import BREAKDOWN, MAX_ITER, LinearSolver, _Run, dot, safe


@dataclass(frozen=True)
class BiCGSTAB(LinearSolver):
    """BiCGSTAB for (I - M) u = b, right preconditioned (p_hat = P p, s_hat = P s), so its residual is A's.

    Two matvecs per iteration (one when a sample converges at the half step); max_iter counts iterations.
    A breakdown (rho = <r_hat, r> or <r_hat, v> or omega ~ 0) ends the sample's cycle: it restarts from its
    true residual with r_hat = r; a breakdown right after such a restart is reported.
    check_every: most iterations between the host's checks (any sample still running?), each a device -> host
    sync; None: 1 on the CPU, 8 on CUDA; the next check comes sooner where the residuals' rate predicts the
    slowest sample's stop. Between checks the masks stay on the
    device (the second half step runs masked); the iterations run after the last sample stopped are dropped
    from the trace (their matvecs are counted).
    """

    max_iter: int = 500
    check_every: int | None = None

    def _check_config(self) -> None:
        super()._check_config()
        check_period(self.check_every, "cpu", self.name)

    name: ClassVar[str] = "bicgstab"
    fixes: ClassVar[dict] = {
        BREAKDOWN: "BiCGSTAB broke down (rho or omega ~ 0) even right after a restart: use solver='gmres'",
        MAX_ITER: "raise max_iter, pass a preconditioner, or use solver='gmres'",
    }

    def _cycle(self, run: _Run, members: Tensor) -> Tensor | None:
        eps = torch.finfo(run.b.dtype).eps
        r, u = run.r, run.u
        r_hat = r
        r_hat_norm = r_hat.norm(dim=1)
        rho_old = alpha = omega = torch.ones_like(run.rel)
        p = v = torch.zeros_like(r)
        broke = torch.zeros_like(members)
        active = members
        first = True
        period = check_period(self.check_every, run.b.device, self.name)
        i = next_check = 0
        while run.budget > 0:
            if i == next_check:           # the host check (period > 1: next when the slowest is predicted to stop)
                gap = min(period, len(run.rows) - 1) if period > 1 else 0
                n_active, ahead = host_check(active, period, run.rows[-1], run.rows[-1 - gap] if gap else None, gap,
                                             run.threshold, count=False)
                if n_active == 0:
                    break
                next_check = i + ahead
            i += 1
            rho = dot(r_hat, r)
            bad = active & ~(rho.abs() > eps * r_hat_norm * r.norm(dim=1))
            beta = (rho / safe(rho_old)) * (alpha / safe(omega))
            p = r + beta.to(r.dtype).unsqueeze(1) * (p - omega.to(r.dtype).unsqueeze(1) * v)
            p_hat = run.precondition(p)
            v = run.A(p_hat, active & ~bad)
            sigma = dot(r_hat, v)
            bad = bad | (active & ~(sigma.abs() > eps * r_hat_norm * v.norm(dim=1)))
            if first:
                broke = broke | bad
            active = active & ~bad
            alpha = torch.where(active, rho / safe(sigma), 0)
            s = r - alpha.to(r.dtype).unsqueeze(1) * v
            u = u + alpha.to(r.dtype).unsqueeze(1) * p_hat
            half = s.norm(dim=1) / run.scale
            rest = active & ~(half <= run.threshold)                 # samples that need the second half step
            if period > 1 or bool(rest.any()):      # (masked: with none in `rest` it leaves u and r as they are)
                s_hat = run.precondition(s)
                t = run.A(s_hat, rest)
                tt = dot(t, t)
                ts = dot(t, s)
                omega = torch.where(rest & (ts.abs() > eps * t.norm(dim=1) * s.norm(dim=1)), ts / safe(tt), 0)
                u = u + omega.to(r.dtype).unsqueeze(1) * s_hat
                r = s - omega.to(r.dtype).unsqueeze(1) * t
            else:
                omega = torch.zeros_like(omega)
                r = s
            rel = r.norm(dim=1) / run.scale
            active = run.record(rel, active) & ~(rel <= run.threshold)
            active = active & (omega.abs() > 0)        # omega = 0: the next beta divides by it, so restart
            rho_old = rho
            first = False
        if period > 1:
            run.drop_idle_tail(period - 1)
        run.u = u
        return broke
