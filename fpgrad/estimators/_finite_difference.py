"""Float64 central finite differences of the loss at the fixed point: the slow ground truth."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConvergenceError
from ..forward import get_forward, is_batched
from ._base import Cost, Estimator, Gradient


@dataclass(frozen=True)
class FiniteDifference(Estimator):
    """dL/dtheta_i ~ (L(theta + h e_i) - L(theta - h e_i)) / 2h,  L = loss(z*(theta, x)),  in float64.

    Each z* is solved to `tol` (warm-started from the unperturbed z*); a solve that does not converge
    raises, since a reference must be right. h = eps * max(1, |theta_i|). Cost: two solves per entry,
    so use it on small problems; `keys` restricts it to some parameters, `wrt_x=False` skips x.
    A reference (`is_reference`): fpgrad.gradient calls `compute`; it has no backward pass (`apply` raises).
    """

    eps: float = 1e-6
    tol: float = 1e-14
    max_iter: int = 5000
    method: str = "anderson"
    keys: tuple[str, ...] | None = None
    wrt_x: bool = True

    name = "finite_difference"
    is_reference = True

    def apply(self, step, params, x, z0, forward, record):
        raise ValueError("fixed_point: FiniteDifference is a reference for fpgrad.gradient, not a backward pass; "
                         "use Implicit(solver='dense') for an exact backward")

    @property
    def uses_forward(self) -> bool:
        return False                     # its own float64 solver (`method`, `tol`), never the caller's

    def describe(self) -> str:
        return "FiniteDifference"

    def compute(self, m, x: Tensor, loss_fn: Callable[[Tensor], Tensor], z0: Tensor | None = None,
                generator: torch.Generator | None = None) -> Gradient:
        """The float64 central-difference Gradient of loss_fn(z*) for m.params and x (z0 as in fpgrad.gradient)."""
        t0 = time.perf_counter()
        dtype = m.dtype
        params = {k: v.detach().to(torch.float64) for k, v in m.params.items()}
        x64 = x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
        if z0 is None:
            with torch.no_grad():
                z0 = m.init(params, x64, generator)
        z0 = z0.detach().to(torch.float64)
        solver = get_forward(self.method, tol=self.tol, atol=0.0, max_iter=self.max_iter, warn=False)
        batched = is_batched(m, z0)
        steps = 0

        def solve(p, xx, start):
            nonlocal steps
            fp = solver.solve(m.step, p, xx, start, batched=batched, check=False)
            steps += fp.evaluations
            if not bool(fp.converged.all()):
                raise ConvergenceError(f"FiniteDifference: a perturbed solve did not converge ({fp.message}); "
                                       "the reference needs a contractive map, raise max_iter or loosen tol")
            return fp.z

        z_star = solve(params, x64, z0)
        loss0 = loss_fn(z_star)

        def loss_at(p, xx):
            with torch.no_grad():
                return float(loss_fn(solve(p, xx, z_star)))

        grads = {}
        for k, v in params.items():
            if self.keys is not None and k not in self.keys:
                grads[k] = torch.zeros_like(v)
                continue
            grads[k] = self._central(v, lambda t, k=k: loss_at({**params, k: t}, x64))
        gx = None
        if x64.is_floating_point():
            gx = self._central(x64, lambda t: loss_at(params, t)) if self.wrt_x else torch.zeros_like(x64)
        cost = Cost(forward_steps=steps, seconds=time.perf_counter() - t0)
        return Gradient({k: g.to(dtype) for k, g in grads.items()}, None if gx is None else gx.to(x.dtype),
                        z_star.to(dtype), loss0.detach().to(dtype), cost, self.name)

    def _central(self, value: Tensor, loss: Callable[[Tensor], float]) -> Tensor:
        flat = value.reshape(-1)
        out = torch.zeros_like(flat)
        for i in range(flat.numel()):
            h = self.eps * max(1.0, abs(float(flat[i])))
            plus, minus = flat.clone(), flat.clone()
            plus[i] += h
            minus[i] -= h
            out[i] = (loss(plus.reshape(value.shape)) - loss(minus.reshape(value.shape))) / (2 * h)
        return out.reshape(value.shape)
