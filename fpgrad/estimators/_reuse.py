"""Reuse for exact adjoint solves: warm starts the caller owns (mixed-precision refinement is the linear solver
fpgrad.linsolve.MixedPrecision; `inner_tolerance` is re-exported from there).

Everything that carries state from one solve to the next lives in an object the caller creates and passes in
(`Implicit(warm_start=WarmStart())`); nothing is kept in module state.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

import torch
from torch import Tensor

from ..errors import ShapeError
from ..linsolve._mixed import inner_tolerance

__all__ = ["WarmStart", "inner_tolerance"]


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
