"""Direct solve: materialise I - M per sample and factorise it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ._common import MAX_ITER, SINGULAR, STAGNATED, LinearSolver, _Run, small_dtype


def _clock(like: Tensor) -> float:
    """Wall-clock seconds, after the device of `like` has finished its queued work."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


@dataclass(frozen=True)
class Dense(LinearSolver):
    """LU solve of (I - M) u = b with the matrix of M built from n matvecs, M e_j for every basis vector e_j.

    The columns come from torch.func.vmap over M, `chunk_size` columns per call, when M supports vmap and
    that is faster than plain calls (timed on the first two chunks), else from one call per column; either
    way it counts n matvecs. The solution is refined with the LU factors against the true residual (one
    matvec each) for up to max_iter solves in all. I - M is reported singular when its LU factorisation has a
    pivot below n eps times the largest. x0 is used, the preconditioner is not. Memory: B n^2 entries.
    """

    max_iter: int = 3
    chunk_size: int = 16

    name: ClassVar[str] = "dense"
    preconditionable: ClassVar[bool] = False   # the preconditioner is not used
    iterative: ClassVar[bool] = False          # max_iter counts LU refinement solves
    fixes: ClassVar[dict] = {
        MAX_ITER: "I - J is badly conditioned (J has an eigenvalue near 1): use float64 or loosen tol",
        STAGNATED: "I - J is badly conditioned (J has an eigenvalue near 1): use float64 or loosen tol",
    }

    def _matrix(self, run: _Run) -> Tensor:
        """M as a batch of matrices [B, n, n] (n matvecs)."""
        B, n = run.b.shape
        basis = torch.eye(n, dtype=run.b.dtype, device=run.b.device).expand(B, n, n)   # basis[:, j] = e_j
        chunk = max(1, min(self.chunk_size, n))
        blocks = []                                         # [B, k, n]: block[:, i] = M e_j for column j
        batched = self._columns_vmap(run, basis[:, :chunk])
        vectorise = batched is not None
        if batched is not None:
            blocks.append(batched[0])
            if chunk < n:       # vmap can be slower than plain calls (e.g. it expands a closed-over matrix)
                looped = self._columns_loop(run, basis[:, chunk : 2 * chunk])
                blocks.append(looped[0])
                vectorise = batched[1] / batched[0].shape[1] < looped[1] / looped[0].shape[1]
        done = sum(block.shape[1] for block in blocks)
        for start in range(done, n, chunk):
            part = basis[:, start : start + chunk]
            block = self._columns_vmap(run, part) if vectorise else None
            blocks.append(block[0] if block is not None else self._columns_loop(run, part)[0])
        return torch.cat(blocks, dim=1).transpose(1, 2)      # [b, i, j] = (M e_j)_i

    @staticmethod
    def _columns_vmap(run: _Run, basis: Tensor) -> tuple[Tensor, float] | None:
        """M applied to every basis[:, j] in one vmap call, and the seconds it took; None if vmap fails."""
        start = _clock(basis)
        try:
            out = torch.func.vmap(run.M, in_dims=1, out_dims=1)(basis.contiguous())
        except Exception:       # vmap raises many kinds of errors for functions it cannot batch
            return None
        if not isinstance(out, Tensor) or out.shape != basis.shape or out.dtype != basis.dtype:
            return None
        run.matvecs += basis.shape[1]
        return out, _clock(basis) - start

    @staticmethod
    def _columns_loop(run: _Run, basis: Tensor) -> tuple[Tensor, float]:
        """M applied to every basis[:, j], one matvec each, and the seconds it took."""
        start = _clock(basis)
        columns = [basis[:, j].contiguous() for j in range(basis.shape[1])]
        out = torch.stack([e - run.A(e) for e in columns], dim=1)
        return out, _clock(basis) - start

    def _iterate(self, run: _Run) -> None:
        n = run.b.shape[1]
        # the LU runs in float32 or wider (small_dtype); the residual is corrected in the map's dtype
        wide = small_dtype(run.b.dtype)
        A = torch.eye(n, dtype=wide, device=run.b.device) - self._matrix(run).to(wide)
        LU, pivots, info = torch.linalg.lu_factor_ex(A)
        pivot = LU.diagonal(dim1=-2, dim2=-1).abs()
        ratio = pivot.amin(-1) / pivot.amax(-1)
        run.flag((info > 0) | ~(ratio > n * torch.finfo(run.b.dtype).eps), SINGULAR)
        while run.budget > 0 and bool(run.running.any()):
            active, previous = run.running, run.rel
            du = torch.linalg.lu_solve(LU, pivots, run.r.to(wide).unsqueeze(2)).squeeze(2).to(run.b.dtype)
            run.u = torch.where(active.unsqueeze(1), run.u + du, run.u)
            run.refresh(active, record=True)
            run.flag(active & (len(run.rows) > 2) & (run.rel > 0.5 * previous), STAGNATED)
