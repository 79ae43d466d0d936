"""J = df/dz of a map at a state for the spectral measurements (the object is fpgrad.jacobian.Jacobian), and the
measurements' small shared helpers."""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch
from torch import Tensor

from .._checks import check_batch, check_inputs
from ..errors import ConvergenceWarning
from ..estimators._base import CostRecord
from ..jacobian import Jacobian
from ..results import warn

# The products with J were counted in a ProductCount of their own; they are now counted in the CostRecord the
# estimators use (same `jvps` / `vjps` fields): the old name stays for callers that build one.
ProductCount = CostRecord


class JacobianOperator(Jacobian):
    """fpgrad.jacobian.Jacobian as the spectral measurements build it: inputs detached, the JVP mode chosen
    by the adjoint test ("auto") or checked by it (an explicit mode).

    v: [B, n] (or [n] for an unbatched state), or the state's own shape; a block of p vectors
    [p, B, n] (or [p, n]) is applied in one vmapped call. `count` (a CostRecord) records the products.
    """

    def __init__(self, step: Callable, params: Mapping[str, Tensor], x: Tensor | None, z: Tensor, *,
                 batched: bool, name: str = "map", jvp: str = "auto", count: CostRecord | None = None):
        super().__init__(step, {k: v.detach() for k, v in params.items()}, None if x is None else x.detach(),
                         z.detach(), count, batched=batched, name=name, jvp=jvp, check_jvp=True)


def jacobian_operator(m, x: Tensor | None, z: Tensor, params: Mapping[str, Tensor] | None = None, *,
                      jvp: str = "auto", check_fixed_point: bool = True,
                      fixed_point_rtol: float = 1e-3) -> JacobianOperator:
    """J = df/dz of the map `m` at z (with inputs x):  matvec, rmatvec, dense, to_scipy.

    z: [B, *event] or one sample's [*event] (m.event_ndim dims); x: the matching inputs.
    params: default m.params. A z with relative residual ||f(z) - z|| / ||f(z)|| above
    `fixed_point_rtol` is warned about (ConvergenceWarning): J is then measured away from z*.
    """
    from ..forward import is_batched

    params = m.params if params is None else params
    where = f"fpgrad.spectral ({getattr(m, 'name', 'map')})"
    check_inputs(params, z, x, where=where)
    batched = is_batched(m, z)
    if batched:
        check_batch(z, x, where=where)
    J = JacobianOperator(m.step, params, x, z, batched=batched, name=getattr(m, "name", "map"), jvp=jvp)
    if check_fixed_point:
        warn_if_not_fixed_point(J, fixed_point_rtol, stacklevel=3)
    return J


def warn_if_not_fixed_point(J: Jacobian, rtol: float, stacklevel: int = 2) -> None:
    rel = J.relative_residual.reshape(-1)
    bad = (rel > rtol).nonzero().reshape(-1).tolist()
    if bad:
        worst = float(rel.max())
        where = f" in sample(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}" if J.batched else ""
        warn(
            f"fpgrad.spectral: z is not a fixed point of '{J.name}' (relative residual ||f(z) - z|| / ||f(z)|| "
            f"up to {worst:.2e}{where}, above {rtol:g}); the Jacobian is measured away from z*. Solve first "
            "(fpgrad.solve, or pass z=None to analyze), or pass check_fixed_point=False to measure J at this z "
            "on purpose", ConvergenceWarning)


def resolve_operator(m, x, z, params, where: str, *, jvp: str = "auto", check_fixed_point: bool = True,
                     fixed_point_rtol: float = 1e-3) -> Jacobian:
    """`m` may already be a Jacobian / JacobianOperator (then x and z must be None) or a Map with x and z."""
    if isinstance(m, Jacobian):
        if z is not None or x is not None:
            raise ValueError(f"{where}: given a JacobianOperator, pass neither x nor z (it is already linearised)")
        return m
    if z is None:
        raise ValueError(f"{where}: needs the state z at which to measure J (solve first with fpgrad.solve, "
                         "or use fpgrad.spectral.analyze(m, x), which solves when z is None)")
    return jacobian_operator(m, x, z, params, jvp=jvp, check_fixed_point=check_fixed_point,
                             fixed_point_rtol=fixed_point_rtol)


# ---- small shared helpers of the measurements ---------------------------------------------------------
class Meter:
    """Products and seconds spent on J between construction and `done()`."""

    def __init__(self, J: Jacobian):
        self.J = J
        self._sync()
        self.jvps0, self.vjps0, self.t0 = J.count.jvps, J.count.vjps, time.perf_counter()

    def _sync(self) -> None:
        if self.J.device.type == "cuda":
            torch.cuda.synchronize(self.J.device)

    def done(self) -> tuple[int, int, float]:
        self._sync()
        return (self.J.count.jvps - self.jvps0, self.J.count.vjps - self.vjps0, time.perf_counter() - self.t0)


def make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))


def randn(shape, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """Gaussian draws from `generator` (on its own device), moved to `device`."""
    t = torch.randn(*shape, generator=generator, dtype=torch.float64, device=generator.device)
    return t.to(device=device, dtype=dtype)


def rademacher(shape, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    t = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    return (2 * t - 1).to(device=device, dtype=dtype)


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the small dense problems (eigenvalues of projections), except where unsupported."""
    return torch.float32 if device.type == "mps" else torch.float64


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex64 if dtype == torch.float32 else torch.complex128


def resolve_method(method: str, allowed: tuple[str, ...], n: int, dense_max_n: int, where: str) -> str:
    if method not in allowed + ("auto",):
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {list(allowed + ('auto',))}")
    if method == "auto":
        return "dense" if n <= dense_max_n else allowed[1]
    return method
