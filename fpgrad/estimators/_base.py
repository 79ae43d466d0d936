"""What every gradient estimator shares: the linearised step and the Estimator base (the cost record and the
result type, Cost / CostRecord / Gradient, live in fpgrad.results and are re-exported here)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..results import Cost, CostRecord, Gradient

__all__ = ["Cost", "CostRecord", "Estimator", "Gradient", "Linearisation"]


class Linearisation:
    """The step linearised at z*:  J^T v (VJP) and J v (JVP) on flat per-sample vectors [B, n].

    `JT` is what the adjoint solvers call (M = J^T in (I - M) u = g); `J` (forward-mode, one JVP per
    call) only when a solver needs products with J (CG on the normal equations).
    """

    def __init__(self, step: Callable, params: Mapping[str, Tensor], x: Tensor | None, z_star: Tensor,
                 record: CostRecord | None = None, forward: Any = None):
        self.step, self.params, self.x, self.z_star = step, params, x, z_star
        self.forward = forward          # the FixedPoint of the forward solve that found z*, when known
        self.shape = z_star.shape
        self.record = record if record is not None else CostRecord()
        with torch.enable_grad():
            fz, self._vjp_z = torch.func.vjp(lambda z: step(params, z, x), z_star)
        self._jvp = None
        # how far z* is from a fixed point, per sample (free: the VJP's forward gives f(z*))
        B = z_star.shape[0]
        diff = (fz.detach() - z_star.detach()).reshape(B, -1).norm(dim=1)
        self.relative_residual = diff / fz.detach().reshape(B, -1).norm(dim=1).clamp_min(torch.finfo(fz.dtype).tiny)

    def JT(self, v: Tensor) -> Tensor:
        self.record.vjps += 1
        return self._vjp_z(v.reshape(self.shape))[0].reshape(v.shape)

    def J(self, v: Tensor) -> Tensor:
        # J v as the transpose of the (linear) map w -> J^T w: one backward through the stored VJP graph,
        # no re-run of the step (a fresh torch.func.jvp per product re-runs it: ~5x slower)
        self.record.jvps += 1
        if self._jvp is None:
            w0 = torch.zeros(self.shape, dtype=self.z_star.dtype, device=self.z_star.device)
            with torch.enable_grad():
                _, self._jvp = torch.func.vjp(lambda w: self._vjp_z(w)[0], w0)
        return self._jvp(v.reshape(self.shape))[0].reshape(v.shape)

    def cast(self, dtype: torch.dtype) -> Linearisation:
        """The same step linearised at z* with params, x and z* cast to `dtype` (for low-precision products);
        its products are counted in the same record."""
        def to(t):
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
        params = {k: to(v) for k, v in self.params.items()}
        return Linearisation(self.step, params, to(self.x), to(self.z_star), self.record, self.forward)

    def pullback(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """(df/dparams)^T u and (df/dx)^T u at z*:  one VJP."""
        gp, gx, _ = self._pull(u, with_state=False)
        return gp, gx

    def pullback_with_state(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor | None, Tensor]:
        """(df/dparams)^T u, (df/dx)^T u and J^T u (flat, like u) at z*: the same one VJP, also taken w.r.t. z
        (what lets a truncated series measure its residual without another product)."""
        return self._pull(u, with_state=True)

    def _pull(self, u: Tensor, with_state: bool):
        self.record.vjps += 1
        has_x = self.x is not None
        primals = (dict(self.params),) + ((self.x,) if has_x else ()) + ((self.z_star,) if with_state else ())

        def f(p, *rest):
            return self.step(p, rest[-1] if with_state else self.z_star, rest[0] if has_x else None)
        _, fn = torch.func.vjp(f, *primals)
        grads = fn(u.reshape(self.shape))
        return (grads[0], grads[1] if has_x else None,
                grads[-1].reshape(u.shape) if with_state else None)


class Estimator:
    """Base of the estimators. Subclasses are frozen dataclasses.

    Two kinds:
    - native (`adjoint = False`): `differentiate(step, params, x, z0, forward, record)` returns a state
      built with the autograd tape (unrolled, truncated, one-step); torch autograd differentiates it.
    - adjoint (`adjoint = True`): the forward solve gives z*, and `adjoint_vector(lin, g, record)`
      returns u such that the gradient is (df/d(params, x))^T u at z* (Neumann, phantom, implicit).
    """

    adjoint: bool = False
    name: str = "estimator"
    reports_residual: bool = False    # adjoint kind: the pullback also gives J^T u, passed to check_residual

    def check_residual(self, lin: Linearisation, g: Tensor, u: Tensor, JTu: Tensor, record: CostRecord) -> None:
        """Adjoint kind with reports_residual: record what u leaves of (I - J^T) u = g (JTu = J^T u, free)."""

    def differentiate(self, step, params, x, z0, forward, record: CostRecord) -> Tensor:  # native kind
        raise NotImplementedError

    def adjoint_vector(self, lin: Linearisation, g: Tensor, record: CostRecord) -> Tensor:  # adjoint kind
        raise NotImplementedError

    def check_forward(self, forward) -> None:
        """Raise if this estimator cannot work with the forward solver `forward` (default: any works)."""

    def describe(self) -> str:
        return repr(self)
