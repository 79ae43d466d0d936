"""Reuse for exact adjoint solves: warm starts the caller owns, and mixed-precision iterative refinement.

Everything that carries state from one solve to the next lives in an object the caller creates and passes in
(`Implicit(warm_start=WarmStart())`); nothing is kept in module state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace
from typing import Hashable, Iterable

import torch
from torch import Tensor

from ..errors import DTypeError, ShapeError


class WarmStart:
    """Earlier adjoint vectors (and fixed points) to start the next solves from: the caller owns it.

    Without sample keys, the adjoint of the last solve is the initial guess of the next one whenever it has the
    same shape (successive calls on the same batch: a study, a fixed batch in training). With keys bound by
    `bind(ids)` (e.g. data-set indices), each sample's guess is its own adjoint from the last time it was
    seen (epochs over a data set); unseen samples start from zero. A guess is only a guess: the linear solver
    drives the residual to its tolerance from it, and drops a guess that is worse than zero.

    capacity: most samples remembered (least recently used dropped; None: no limit).
    Also remembers fixed points for the forward solve (`initial_state` / `store_state`).
    """

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"WarmStart: capacity must be >= 1 or None, got {capacity}")
        self.capacity = capacity
        self.ids: list[Hashable] | None = None
        self._adjoints: OrderedDict = OrderedDict()
        self._states: OrderedDict = OrderedDict()
        self.hits = 0            # samples that started from a stored adjoint
        self.misses = 0          # samples that started from zero
        self.solves = 0

    # --- keys ------------------------------------------------------------------------------------------------
    def bind(self, ids: Iterable[Hashable] | Tensor | None) -> WarmStart:
        """Name the samples of the next solves (one key per sample, e.g. data-set indices); None unbinds."""
        if ids is None:
            self.ids = None
        elif isinstance(ids, Tensor):
            self.ids = [int(i) if not i.is_floating_point() else float(i) for i in ids.reshape(-1)]
        else:
            self.ids = list(ids)
        return self

    def _keys(self, B: int, n: int, what: str) -> list[Hashable]:
        if self.ids is None:
            return [("batch", B, n, i) for i in range(B)]
        if len(self.ids) != B:
            raise ShapeError(f"WarmStart: {len(self.ids)} sample ids are bound but the {what} has a batch of {B}; "
                             "bind one id per sample (cache.bind(ids)) before the solve")
        return [(i, n) for i in self.ids]

    # --- adjoints --------------------------------------------------------------------------------------------
    def guess(self, g: Tensor) -> Tensor | None:
        """Initial guess for (I - J^T) u = g, g: [B, n]: stored adjoints where known, zeros elsewhere; None
        when nothing is known."""
        B, n = g.shape
        keys = self._keys(B, n, "adjoint system")
        rows, known = [], 0
        for key in keys:
            u = self._adjoints.get(key)
            if u is not None and u.dtype == g.dtype and u.device == g.device:
                rows.append(u)
                known += 1
                self._adjoints.move_to_end(key)
            else:
                rows.append(torch.zeros(n, dtype=g.dtype, device=g.device))
        self.hits += known
        self.misses += B - known
        self.solves += 1
        return torch.stack(rows) if known else None

    def store(self, u: Tensor, converged: Tensor | None = None) -> None:
        """Remember the adjoints u: [B, n] (only the converged rows when `converged` is given)."""
        B, n = u.shape
        for i, key in enumerate(self._keys(B, n, "adjoint")):
            if converged is None or bool(converged[i]):
                self._put(self._adjoints, key, u[i].detach().clone())

    # --- fixed points ----------------------------------------------------------------------------------------
    def initial_state(self, z0: Tensor) -> Tensor:
        """z0: [B, ...] with each sample replaced by its stored fixed point where one is known."""
        B = z0.shape[0]
        keys = self._keys(B, z0[0].numel(), "initial state")
        out = z0.detach().clone()
        for i, key in enumerate(keys):
            z = self._states.get(key)
            if z is not None and z.shape == z0.shape[1:] and z.dtype == z0.dtype and z.device == z0.device:
                out[i] = z
        return out

    def store_state(self, z: Tensor) -> None:
        """Remember fixed points z: [B, ...] for `initial_state`."""
        for i, key in enumerate(self._keys(z.shape[0], z[0].numel(), "state")):
            self._put(self._states, key, z[i].detach().clone())

    def _put(self, table: OrderedDict, key, value: Tensor) -> None:
        table[key] = value
        table.move_to_end(key)
        while self.capacity is not None and len(table) > self.capacity:
            table.popitem(last=False)

    def reset(self) -> None:
        self._adjoints.clear()
        self._states.clear()
        self.hits = self.misses = self.solves = 0

    def __len__(self) -> int:
        return len(self._adjoints)

    def __repr__(self) -> str:
        return (f"WarmStart(capacity={self.capacity}, adjoints={len(self._adjoints)}, states={len(self._states)}, "
                f"hits={self.hits}, misses={self.misses})")


def inner_tolerance(dtype: torch.dtype) -> float:
    """The residual reduction asked of one low-precision inner solve: 1e-4 in float32, 1e-2 in (b)float16."""
    return 1e-4 if dtype == torch.float32 else 1e-2


def refine(solver, JT_high, JT_low, g: Tensor, *, tol: float, low: torch.dtype, max_refinements: int,
           x0: Tensor | None = None, preconditioner=None, MT_low=None):
    """Mixed-precision iterative refinement of (I - J^T) u = g:

        r = g - (I - J^T) u     in g's dtype (one VJP)
        (I - J^T) d = r         solved in `low` to a relative residual inner_tolerance(low)
        u <- u + d

    until ||r|| <= tol ||g||: the accuracy reached is the high-precision residual, measured, never assumed.
    The solver's max_iter bounds the iterations of all inner solves together.
    Returns (a LinearSolution in g's dtype whose matvecs count every VJP, low and high, and whose residuals are
    the high-precision residual after each refinement; the number of low-precision VJPs among them).
    """
    from ..linsolve import LinearSolution

    if torch.finfo(low).eps <= torch.finfo(g.dtype).eps:
        raise DTypeError(f"mixed_precision={low} is not lower precision than the state's dtype {g.dtype}; use a "
                         "lower dtype (torch.float32 for a float64 map) or mixed_precision=None")
    B = g.shape[0]
    gnorm = g.norm(dim=1)
    scale = torch.where(gnorm == 0, torch.ones_like(gnorm), gnorm)
    high = low_vjps = refinements = 0
    u = torch.zeros_like(g)
    r = g.clone()
    if x0 is not None:                                    # a guess worse than zero is dropped, as in linsolve
        high += 1
        r0 = g - (x0 - JT_high(x0))
        worse = ~(r0.norm(dim=1) <= gnorm)
        u = torch.where(worse.unsqueeze(1), u, x0)
        r = torch.where(worse.unsqueeze(1), r, r0)
    rows = []
    diverged = torch.zeros(B, dtype=torch.bool, device=g.device)
    iterations = torch.zeros(B, dtype=torch.long, device=g.device)
    left = solver.max_iter                                # shared by all inner solves
    while True:
        rel = r.norm(dim=1) / scale
        rows.append(rel)
        converged = rel <= tol
        if not bool(torch.isfinite(rel).all()):
            diverged = ~torch.isfinite(rel)
            break
        left = solver.max_iter - int(iterations.max())
        if bool(converged.all()) or refinements >= max_refinements or left <= 0:
            break
        if len(rows) >= 3 and bool((rows[-1] > 0.5 * rows[-2])[~converged].any()):
            break                                         # the refinement stopped contracting
        active = ~converged
        rn = r.norm(dim=1, keepdim=True)
        rs = torch.where(rn == 0, torch.ones_like(rn), rn)
        inner = replace(solver, tol=max(inner_tolerance(low), tol), max_iter=left)
        sol = inner.solve(JT_low, (r / rs).to(low), throw=False, preconditioner=preconditioner, MT=MT_low)
        low_vjps += sol.matvecs + sol.rmatvecs
        iterations += sol.iterations.to(iterations.device) * active
        if bool(sol.diverged.any()):
            diverged = sol.diverged.to(g.device) & active
            break
        u = u + torch.where(active.unsqueeze(1), sol.u.to(g.dtype) * rs, torch.zeros_like(u))
        r = g - (u - JT_high(u))
        high += 1
        refinements += 1
    residuals = torch.stack(rows)
    reached = float(residuals[-1][torch.isfinite(residuals[-1])].max()) if torch.isfinite(residuals[-1]).any() \
        else math.nan
    what = (f"{solver.name} in {str(low).replace('torch.', '')} with refinement in "
            f"{str(g.dtype).replace('torch.', '')}: {refinements} refinements, {low_vjps} low-precision and "
            f"{high} full-precision products")
    if bool(diverged.any()):
        message = f"{what}; diverged (non-finite or growing residual): I - J may be singular or badly conditioned"
        u = torch.where(diverged.unsqueeze(1), torch.full_like(u, math.nan), u)
    elif bool(converged.all()):
        message = f"{what}; converged to {reached:.1e}"
    elif left <= 0:
        message = (f"{what}; reached {reached:.1e} > tol {tol:g} when the iteration budget max_iter={solver.max_iter} "
                   "(shared by all refinements) ran out: raise max_iter or use mixed_precision=None")
    elif refinements >= max_refinements:
        message = (f"{what}; reached {reached:.1e} > tol {tol:g} after the maximum {max_refinements} refinements: "
                   "raise max_refinements or use mixed_precision=None")
    else:
        message = (f"{what}; reached {reached:.1e} > tol {tol:g}: the refinement stopped contracting (the "
                   "low-precision solve is too inaccurate for this system): use mixed_precision=None")
    return LinearSolution(u=u, residuals=residuals, converged=converged & ~diverged, diverged=diverged,
                          iterations=iterations, matvecs=low_vjps + high, rmatvecs=0,
                          solver=f"{solver.name}+refine", message=message), low_vjps

