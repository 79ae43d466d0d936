"""Conjugate gradient on the normal equations (CGNR) for any nonsingular I - M."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ._common import BREAKDOWN, MAX_ITER, LinearSolver, Operator, _Run, dot, safe


def transpose(P: Operator, like: Tensor, name: str) -> Operator:
    """v -> P^T v for a linear P built from differentiable torch operations (a VJP through P at 0)."""
    message = (f"{name}: the preconditioner must map [B, n] -> [B, n] with differentiable torch operations so "
               "that its transpose can be applied (CG on the normal equations needs P^T); use solver='gmres' "
               "with this preconditioner")
    with torch.enable_grad():
        x = torch.zeros_like(like, requires_grad=True)
        try:
            y = P(x)
        except RuntimeError as error:
            raise ValueError(message) from error
    if not isinstance(y, Tensor) or y.shape != like.shape or not y.requires_grad:
        raise ValueError(message)

    def apply(v: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(y, x, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if out is None else out

    return apply


@dataclass(frozen=True)
class NormalCG(LinearSolver):
    """CGNR: conjugate gradient on (A P)^T (A P) y = (A P)^T b, u = P y, with A = I - M.

    Works for any nonsingular A, at the rate of cond(A P)^2. Needs MT (M^T, a JVP in fpgrad) for
    A^T = I - M^T: one matvec and one rmatvec per iteration. The preconditioner (right: P ~ A^{-1}) must be
    made of differentiable torch operations: P^T is applied as a VJP through it. Stops on the residual of
    A u = b itself (tracked recursively, checked against the true one at the end).
    """

    name: ClassVar[str] = "cg_normal"
    needs_transpose: ClassVar[bool] = True
    fixes: ClassVar[dict] = {
        MAX_ITER: "CG on the normal equations converges at the rate of cond(I - J)^2: raise max_iter, pass a "
                  "preconditioner, or use solver='gmres'",
        BREAKDOWN: "(I - M^T) r = 0 with r != 0: I - J is singular (J has an eigenvalue 1)",
    }

    def _check_inputs(self, M: Operator, b: Tensor, x0: Tensor | None, MT: Operator | None) -> None:
        if MT is None:
            raise ValueError("cg_normal: CG on the normal equations needs MT, the transpose of M "
                             "(a JVP in fpgrad); pass MT=..., or use solver='gmres' which needs M only")
        super()._check_inputs(M, b, x0, MT)

    def _iterate(self, run: _Run) -> None:
        run.cache["PT"] = None if run.P is None else transpose(run.P, run.b, self.name)
        super()._iterate(run)

    def _normal(self, run: _Run, r: Tensor, active: Tensor) -> Tensor:
        """(A P)^T r."""
        z = run.AT(r, active)
        PT = run.cache["PT"]
        return z if PT is None else PT(z)

    def _cycle(self, run: _Run, members: Tensor) -> Tensor | None:
        r, u = run.r, run.u
        z = self._normal(run, r, members)
        zz = dot(z, z)
        broke = members & ~(zz > 0)
        active = members & ~broke
        p = z
        while run.budget > 0 and bool(active.any()):
            Pp = run.precondition(p)
            w = run.A(Pp, active)
            ww = dot(w, w)
            active = active & (ww > 0)
            alpha = torch.where(active, zz / safe(ww), 0).to(p.dtype).unsqueeze(1)
            u = u + alpha * Pp
            r = r - alpha * w
            rel = r.norm(dim=1) / run.scale
            active = run.record(rel, active) & ~(rel <= run.threshold)
            if run.budget == 0 or not bool(active.any()):
                break
            z = self._normal(run, r, active)
            zz_new = dot(z, z)
            active = active & (zz_new > 0)
            p = z + (zz_new / safe(zz)).to(p.dtype).unsqueeze(1) * p
            zz = zz_new
        run.u = u
        return broke
