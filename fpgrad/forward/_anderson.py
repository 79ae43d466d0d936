"""Anderson acceleration (type II, Walker & Ni 2011), batched per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._broyden import DeferredLowRankInverse
from ._common import ForwardSolver


def _constants(state: dict, m: int, B: int, device, regularization: float) -> tuple[Tensor, Tensor]:
    """regularization * I [m, m] and ones [B, m, 1] in float64, made once per history length and kept in the
    solve's state (each would be a kernel per iteration)."""
    cache = state.setdefault("constants", {})
    if m not in cache:
        cache[m] = (regularization * torch.eye(m, dtype=torch.float64, device=device),
                    torch.ones(B, m, 1, dtype=torch.float64, device=device))
    return cache[m]


@dataclass(frozen=True)
class Anderson(ForwardSolver):
    """Anderson acceleration with memory `memory`.

    z_{t+1} = sum_i alpha_i f(z_i) over the last m iterates, alpha = argmin ||sum_i alpha_i g_i||
    subject to sum alpha = 1 (g_i = f(z_i) - z_i), solved with Tikhonov regularisation `regularization`.
    FixedPoint.inverse: the multisecant inverse-Jacobian estimate of the last m iterates
    (Fang & Saad 2009), H = -I + (S + Y)(Y^T Y)^+ Y^T with H Y = S for the differences S of z and Y of g:
    a LowRankInverse of rank m - 1 (used by Implicit(precondition="forward")).
    """

    memory: int = 5
    regularization: float = 1e-8

    name = "anderson"
    restarts = True

    def _init(self, z: Tensor, fz: Tensor):
        B, n = z.shape
        X = torch.zeros(B, self.memory, n, dtype=z.dtype, device=z.device)
        F = torch.zeros_like(X)
        X[:, 0], F[:, 0] = z, fz
        return {"X": X, "F": F, "count": 1}

    def _propose(self, state, z: Tensor, fz: Tensor) -> Tensor:
        m = min(state["count"], self.memory)
        if m == 1:
            return fz
        X, F = (state["X"], state["F"]) if m == self.memory else (state["X"][:, :m], state["F"][:, :m])
        G = F - X                                                        # [B, m, n]
        # the small m x m system is solved in float64 whatever the state's dtype: in float32 the
        # regularised Gram matrix can be numerically singular
        H = torch.bmm(G, G.transpose(1, 2))                              # [B, m, m]
        if H.dtype != torch.float64:
            H = H.double()
        scale = H.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        eye, ones = _constants(state, m, z.shape[0], z.device, self.regularization)
        H = H / scale.view(-1, 1, 1) + eye
        # solve_ex without its error check: no host sync; a singular system gives non-finite weights, and the
        # loop then takes the plain step for that sample and restarts its history
        w = torch.linalg.solve_ex(H, ones, check_errors=False)[0]        # [B, m, 1]
        alpha = w / w.sum(dim=1, keepdim=True)
        alpha = torch.nan_to_num(alpha, nan=0.0)
        if alpha.dtype != z.dtype:
            alpha = alpha.to(z.dtype)
        return torch.bmm(alpha.transpose(1, 2), F).squeeze(1)             # sum_i alpha_i f(z_i)

    def _restart(self, state, z, fz, keep):
        # (where broadcasts z, fz [B, 1, n] over the history: no expand a step)
        k = keep.view(-1, 1, 1)
        state["X"] = torch.where(k, state["X"], z.unsqueeze(1))
        state["F"] = torch.where(k, state["F"], fz.unsqueeze(1))
        return state

    def _update(self, state, z, fz, z_new, fz_new, active):
        slot = state["count"] % self.memory
        x, f = state["X"][:, slot], state["F"][:, slot]        # views: written in place (active: [B, 1])
        torch.where(active, z_new, x, out=x)
        torch.where(active, fz_new, f, out=f)
        state["count"] += 1
        return state

    def _info(self, state) -> dict:
        # built on first use (only Implicit(precondition="forward") / initial_guess="forward" read it): its ~30
        # operations and batched pseudo-inverse would otherwise run after every solve
        m, count = min(state["count"], self.memory), state["count"]
        X, F = state["X"][:, :m], state["F"][:, :m]
        return {"inverse": DeferredLowRankInverse(lambda: self._multisecant(X, F, m, count))}

    def _multisecant(self, X: Tensor, F: Tensor, m: int, count: int) -> tuple[Tensor, Tensor]:
        B, _, n = X.shape
        if m < 2:
            empty = X.new_zeros(B, n, 0)
            return empty, empty.clone()
        last = (count - 1) % self.memory
        others = [i for i in range(m) if i != last]
        G = F - X
        S = (X[:, others] - X[:, last : last + 1]).double()              # [B, m-1, n]
        Y = (G[:, others] - G[:, last : last + 1]).double()
        gram_inv = torch.linalg.pinv(Y @ Y.transpose(1, 2), hermitian=True, rtol=1e-10)
        U = (S + Y).transpose(1, 2)                                      # [B, n, m-1]
        V = (gram_inv @ Y).transpose(1, 2)                               # Y (Y^T Y)^+
        return U.to(X.dtype), V.to(X.dtype)
