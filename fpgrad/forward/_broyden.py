"""Broyden's ("good") method on g(z) = f(z) - z, with a low-rank inverse-Jacobian estimate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import ForwardSolver

_INITIAL_ROWS = 32


def _low_rank(A: Tensor, C: Tensor, v: Tensor) -> Tensor:
    """-v + A^T (C v) per sample for A, C: [B, r, n] (rows), v: [B, n]: two batched matrix products."""
    if A.shape[1] == 0:
        return -v
    return torch.baddbmm(v.unsqueeze(1), torch.bmm(C, v.unsqueeze(2)).transpose(1, 2), A, alpha=1, beta=-1).squeeze(1)


@dataclass(frozen=True)
class LowRankInverse:
    """H = -I + U V^T per sample, an estimate of (dg/dz)^{-1} = -(I - J)^{-1}.   U, V: [B, n, r].

    So (I - J)^{-1} v ~ v - U (V^T v) and (I - J^T)^{-1} v ~ v - V (U^T v): the estimate a backward
    solve can use as a warm start or preconditioner (SHINE, Ramzi et al. 2022).
    """

    U: Tensor
    V: Tensor

    def solve(self, v: Tensor) -> Tensor:
        """~ (I - J)^{-1} v = -H v.   v: [B, n]."""
        return -_low_rank(self.U.mT, self.V.mT, v)

    def solve_transpose(self, v: Tensor) -> Tensor:
        """~ (I - J^T)^{-1} v = -H^T v.   v: [B, n]."""
        return -_low_rank(self.V.mT, self.U.mT, v)


class DeferredLowRankInverse(LowRankInverse):
    """A LowRankInverse whose U, V are built by `build()` on first access (then kept): a solver can offer its
    estimate without paying for it when nobody reads it."""

    def __init__(self, build):
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_factors", None)

    def _get(self) -> tuple[Tensor, Tensor]:
        if self._factors is None:
            object.__setattr__(self, "_factors", tuple(self._build()))
            object.__setattr__(self, "_build", None)          # (drops the solver state it closed over)
        return self._factors

    @property
    def U(self) -> Tensor:  # noqa: D102
        return self._get()[0]

    @property
    def V(self) -> Tensor:  # noqa: D102
        return self._get()[1]

    def __reduce__(self):
        # pickle / deepcopy as the plain estimate (the builder is a closure)
        return LowRankInverse, self._get()

    def __repr__(self) -> str:
        return "DeferredLowRankInverse(built)" if self._factors is not None else "DeferredLowRankInverse(unbuilt)"


@dataclass(frozen=True)
class Broyden(ForwardSolver):
    """Broyden's good method for g(z) = f(z) - z = 0 with inverse estimate H = -I + U V^T.

    z_{t+1} = z_t - H g_t;  H <- H + (s - H y) s^T H / (s^T H y),  s = dz, y = dg.
    Memory `memory` rank-one terms; the oldest is dropped when full. The terms are stored as rows,
    U, V: [B, memory, n], so that the filled part is one contiguous block for the batched products.
    """

    memory: int = 50

    name = "broyden"
    restarts = True

    def _init(self, z: Tensor, fz: Tensor):
        B, n = z.shape
        # grown on demand up to `memory` rows (a large memory costs only the rows filled)
        U = torch.zeros(B, min(self.memory, _INITIAL_ROWS), n, dtype=z.dtype, device=z.device)
        return {"U": U, "V": torch.zeros_like(U), "count": 0, "dropped": 0}

    @staticmethod
    def _H(state, v: Tensor) -> Tensor:            # H v, over the filled rows only
        r = state["count"]
        return _low_rank(state["U"][:, :r], state["V"][:, :r], v)

    @staticmethod
    def _HT(state, v: Tensor) -> Tensor:           # H^T v
        r = state["count"]
        return _low_rank(state["V"][:, :r], state["U"][:, :r], v)

    def _propose(self, state, z: Tensor, fz: Tensor) -> Tensor:
        return z - self._H(state, fz - z)

    def _update(self, state, z, fz, z_new, fz_new, active):
        s = z_new - z
        y = (fz_new - z_new) - (fz - z)
        Hy = self._H(state, y)
        vT = self._HT(state, s)                                   # (s^T H)^T
        denom = (s * Hy).sum(dim=1, keepdim=True)
        scale = s.norm(dim=1, keepdim=True) * Hy.norm(dim=1, keepdim=True)
        ok = active & (denom.abs() > torch.finfo(z.dtype).eps * scale)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u = torch.where(ok, (s - Hy) / safe, torch.zeros_like(s))
        v = torch.where(ok, vT, torch.zeros_like(s))
        if state["count"] < self.memory:
            slot = state["count"]
            if slot == state["U"].shape[1]:
                rows = min(2 * slot, self.memory)
                for key in ("U", "V"):
                    grown = state[key].new_zeros(state[key].shape[0], rows, state[key].shape[2])
                    grown[:, :slot] = state[key]
                    state[key] = grown
        else:                                                     # drop the oldest term
            state["dropped"] += 1
            state["U"] = torch.roll(state["U"], -1, dims=1)
            state["V"] = torch.roll(state["V"], -1, dims=1)
            slot = self.memory - 1
        state["U"][:, slot] = u
        state["V"][:, slot] = v
        state["count"] = min(state["count"] + 1, self.memory)
        return state

    def _restart(self, state, z, fz, keep):
        keep = keep.view(-1, 1, 1).to(z.dtype)
        state["U"] = state["U"] * keep
        state["V"] = state["V"] * keep
        return state

    def _info(self, state) -> dict:
        r = state["count"]
        return {"inverse": LowRankInverse(state["U"][:, :r].transpose(1, 2), state["V"][:, :r].transpose(1, 2)),
                "dropped_updates": state["dropped"]}
