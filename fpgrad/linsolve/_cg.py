"""Conjugate gradient for symmetric positive definite I - M."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import NonSymmetricError
from ._common import BREAKDOWN, INDEFINITE, MAX_ITER, LinearSolver, _Run, dot, safe

# relative mismatch |<v, A w> - <A v, w>| / (||v|| ||A w||) above which A counts as non-symmetric
SYMMETRY_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
PROBE_SEED = 0


@dataclass(frozen=True)
class CG(LinearSolver):
    """Preconditioned conjugate gradient for (I - M) u = b with I - M symmetric positive definite.

    I - J^T is symmetric only when J is. Before solving, a probe compares <v, A w> with <A v, w> for random
    v, w (2 matvecs, fixed seed, global RNG untouched) and raises NonSymmetricError on a mismatch;
    check_symmetry=False skips it. p^T A p <= 0 flags the sample as diverged (A is indefinite). The
    preconditioner must be symmetric positive definite. The recursive residual is checked against the
    true one at the end, restarting from it when they disagree. One matvec per iteration.
    """

    check_symmetry: bool = True

    name: ClassVar[str] = "cg"
    preconditionable: ClassVar[bool] = False   # only a symmetric positive definite P
    symmetric_only: ClassVar[bool] = True
    fixes: ClassVar[dict] = {
        INDEFINITE: "CG needs a positive definite system: use solver='gmres' or 'cg_normal'",
        BREAKDOWN: "r^T P r <= 0: the preconditioner must be symmetric positive definite for CG",
        MAX_ITER: "raise max_iter or pass a preconditioner; if I - J^T is not symmetric use solver='gmres'",
    }

    def _iterate(self, run: _Run) -> None:
        if self.check_symmetry:
            self._probe_symmetry(run)
        super()._iterate(run)

    def _probe_symmetry(self, run: _Run) -> None:
        b = run.b
        generator = torch.Generator(device=b.device).manual_seed(PROBE_SEED)
        v = torch.randn(b.shape, generator=generator, dtype=b.dtype, device=b.device)
        w = torch.randn(b.shape, generator=generator, dtype=b.dtype, device=b.device)
        Av, Aw = run.A(v), run.A(w)
        scale = torch.maximum(v.norm(dim=1) * Aw.norm(dim=1), Av.norm(dim=1) * w.norm(dim=1))
        mismatch = (dot(v, Aw) - dot(Av, w)).abs() / safe(scale)
        limit = SYMMETRY_TOLERANCE.get(b.dtype, 1e-2)
        bad = run.running & ~(mismatch <= limit)
        if bool(bad.any()):
            samples = bad.nonzero().squeeze(1).tolist()
            raise NonSymmetricError(
                f"cg: I - M is not symmetric for samples {samples[:8]} (relative mismatch "
                f"{float(mismatch[bad].max()):.1e} > {limit:g} between <v, A w> and <A v, w>). CG needs a "
                "symmetric system; I - J^T is symmetric only when the Jacobian is; use solver='cg_normal' or "
                "'gmres' (or check_symmetry=False if the mismatch is rounding)")

    def _cycle(self, run: _Run, members: Tensor) -> Tensor | None:
        r, u = run.r, run.u
        z = run.precondition(r)
        rz = dot(r, z)
        broke = members & ~(rz > 0)
        active = members & ~broke
        p = z
        while run.budget > 0 and bool(active.any()):
            q = run.A(p, active)
            pq = dot(p, q)
            indefinite = active & (pq <= 0)
            run.flag(indefinite, INDEFINITE)
            active = active & ~indefinite
            alpha = torch.where(active, rz / safe(pq), 0).to(p.dtype).unsqueeze(1)
            u = u + alpha * p
            r = r - alpha * q
            rel = r.norm(dim=1) / run.scale
            active = run.record(rel, active) & ~(rel <= run.threshold)
            if run.budget == 0 or not bool(active.any()):
                break
            z = run.precondition(r)
            rz_new = dot(r, z)
            active = active & (rz_new > 0)            # r^T P r <= 0: restart from the true residual
            p = z + (rz_new / safe(rz)).to(p.dtype).unsqueeze(1) * p
            rz = rz_new
        run.u = u
        return broke
