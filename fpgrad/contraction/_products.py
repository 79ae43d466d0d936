"""Products with J = d step(params, z, x) / dz at a fixed state, per sample, counted.

Power steps run on detached parameters (no tape); a penalty's last product runs with the caller's
parameters, so autograd differentiates it w.r.t. params (torch.func.jvp / vjp compose with the outer tape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import ShapeError


@dataclass
class ProductCount:
    """Products with J done so far: a product with one vector per sample counts 1, however large the batch;
    a block of p vectors per sample counts p. Any object with `vjps` / `jvps` fields (e.g. a CostRecord)
    can be passed where a counter is expected."""

    vjps: int = 0
    jvps: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"vjps": self.vjps, "jvps": self.jvps}


def add_products(counter: Any, *, vjps: int = 0, jvps: int = 0) -> None:
    """Add to a counter with `vjps` / `jvps` fields (None: nothing to count)."""
    if counter is not None:
        counter.vjps += vjps
        counter.jvps += jvps


class _Missing:
    def __repr__(self) -> str:
        return "<from the module>"


FROM_MODULE: Any = _Missing()   # params / z / x not given: the first argument is a module (or its `last`)


def resolve(step: Any, params: Any, z: Any, x: Any, where: str) -> tuple[Callable, Mapping[str, Tensor], Tensor,
                                                                          Tensor | None]:
    """(step, params, z, x) as given, or from a module: an ImplicitSlotAttention after its forward (its `last`),
    a model holding exactly one, or such a `last` (an object with step, params, x, z)."""
    given = [a is not FROM_MODULE for a in (params, z, x)]
    if all(given):
        return step, params, z, x
    if any(given):
        raise TypeError(f"{where}: give step, params, z and x, or a module alone (e.g. penalty(model, ...)), "
                        "not a part of them")
    if all(hasattr(step, a) for a in ("step", "params", "x", "z")):
        last = step
    elif isinstance(step, torch.nn.Module):
        holders = [m for m in step.modules() if hasattr(m, "last")]
        if len(holders) != 1:
            found = "none" if not holders else f"{len(holders)} ({', '.join(type(m).__name__ for m in holders)})"
            raise TypeError(f"{where}: {type(step).__name__} must hold exactly one module that records its solve "
                            f"(an ImplicitSlotAttention), found {found}; pass that module, or step, params, z, x")
        last = holders[0].last
        if last is None:
            raise ValueError(f"{where}: {type(holders[0]).__name__} has no solve to penalise yet: call the model "
                             "on a batch first (outside torch.func transforms), then the penalty")
    else:
        raise TypeError(f"{where}: the first argument must be a step function (with params, z, x) or a module "
                        f"(an ImplicitSlotAttention, or a model holding one), got {type(step).__name__}")
    return last.step, last.params, last.z, last.x


def infer_batched(z: Tensor, x: Tensor | None, batched: bool | None) -> bool:
    """Whether dim 0 of z (and x) is a batch of samples: as `fpgrad.fixed_point` infers it when None."""
    if batched is not None:
        return bool(batched)
    return z.dim() >= 2 and x is not None and x.dim() >= 1 and x.shape[0] == z.shape[0]


class Linearised:
    """The step around a fixed state z [B, *event]: J v and J^T u on flat per-sample vectors [B, n], ON THE TAPE.

    z is detached (the state the backward linearises at); params are used as given, so the products are
    differentiable in them. Detached products (the power steps) use fpgrad.jacobian.Jacobian; this class stays
    for what Jacobian does not do: J^T u by one taped step and autograd.grad(create_graph=True) (as TorchDEQ's
    jac_reg: cheaper than torch.func.vjp's wrappers under double backward) and J v by torch.func.jvp on the tape
    (reverse-over-forward, no double backward: the form for torch.compile and fp16 autocast); built lazily
    (no step evaluation until the first product).
    """

    def __init__(self, step: Callable, params: Mapping[str, Tensor], z: Tensor, x: Tensor | None,
                 counter: Any = None, where: str = "fpgrad.contraction", taped: tuple[Tensor, Tensor] | None = None):
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(f"{where}: z must be a floating torch.Tensor, got "
                            f"{getattr(z, 'dtype', type(z).__name__)}")
        self.step, self.params, self.x, self.where = step, params, x, where
        self.z = z.detach()
        self.batch = int(self.z.shape[0])
        self.n = int(self.z[0].numel())
        self.counter = counter
        self._vjp_fn = None
        if taped is not None:       # (z, f(z)) evaluated by the caller with z on the tape: J^T u from its graph
            z_in, fz = taped
            taped_params = any(p.requires_grad for p in params.values()) or (x is not None and x.requires_grad)

            def reuse(v):
                with torch.enable_grad():
                    return (torch.autograd.grad(fz, z_in, v.reshape(fz.shape), retain_graph=True,
                                                create_graph=taped_params)[0].reshape(self.z.shape),)
            self._vjp_fn = reuse

    def _f(self, z: Tensor) -> Tensor:
        out = self.step(self.params, z, self.x)
        if not isinstance(out, Tensor) or out.shape != z.shape:
            raise ShapeError(f"{self.where}: the step maps a state of shape {tuple(z.shape)} to "
                             f"{tuple(getattr(out, 'shape', ()))}; J = df/dz needs a step that returns a state "
                             "of the input's shape")
        return out

    def jvp(self, v: Tensor) -> Tensor:
        """J v for v [B, n] -> [B, n] (forward mode: no double backward)."""
        add_products(self.counter, jvps=1)
        out = torch.func.jvp(self._f, (self.z,), (v.reshape(self.z.shape).to(self.z.dtype),))[1]
        return out.reshape(self.batch, self.n)

    def vjp(self, u: Tensor) -> Tensor:
        """J^T u for u [B, n] -> [B, n] (reverse mode; on the tape this is a double backward)."""
        add_products(self.counter, vjps=1)
        u = u.reshape(self.z.shape).to(self.z.dtype)
        if self._vjp_fn is None:
            if _plain_autograd(self.z, self.x, self.params):
                # outside torch.func transforms: one taped step and autograd.grad (as TorchDEQ's jac_reg), which
                # costs less than torch.func.vjp's wrappers
                with torch.enable_grad():
                    z_leaf = self.z.detach().requires_grad_(True)
                    fz = self._f(z_leaf)
                taped = fz.requires_grad and any(p.requires_grad for p in self.params.values()) \
                    or (self.x is not None and self.x.requires_grad)

                def fn(v):
                    with torch.enable_grad():
                        return (torch.autograd.grad(fz, z_leaf, v, retain_graph=True, create_graph=taped)[0],)
                self._vjp_fn = fn
            else:
                with torch.enable_grad():
                    _, self._vjp_fn = torch.func.vjp(self._f, self.z)
        return self._vjp_fn(u)[0].reshape(self.batch, self.n)

    def apply(self, V: Tensor, transpose: bool = False) -> Tensor:
        """J V (or J^T V) for a block V [B, n, p] -> [B, n, p] (p products)."""
        fn = self.vjp if transpose else self.jvp
        return torch.stack([fn(V[..., j]) for j in range(V.shape[-1])], dim=-1)


def _plain_autograd(*tensors_or_dicts) -> bool:
    """Whether no argument is a torch.func-wrapped tensor (no vmap / grad transform around this call)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors_or_dicts:
        items = t.values() if isinstance(t, Mapping) else [t]
        if any(isinstance(v, Tensor) and wrapped(v) for v in items):
            return False
    return True


def unit_columns(V: Tensor) -> Tensor:
    """Orthonormal columns spanning V [B, n, p] (reduced QR)."""
    return torch.linalg.qr(V)[0]


def small_dtype(dtype: torch.dtype) -> torch.dtype:
    """Small dense algebra runs in float32 or wider."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
