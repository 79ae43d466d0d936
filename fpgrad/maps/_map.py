"""The `Map` type: a pure refinement step, its parameters and how its state starts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch
from torch import Tensor

Params = Mapping[str, Tensor]
StepFn = Callable[[Params, Tensor, Tensor], Tensor]
InitFn = Callable[[Params, Tensor, torch.Generator | None], Tensor]


@dataclass(frozen=True)
class Map:
    """A map iterated to a fixed point: z_next = step(params, z, x).

    step: pure function of explicit tensors (torch.func transforms apply to it).
    params: dict of tensors (a pytree).
    init: init(params, x, generator) -> z0; pure in params so a gradient can reach the init parameters.
    event_ndim: number of trailing dims of one sample's state (slots [K, D]: 2; vectors [n]: 1).
        A state with event_ndim dims is one unbatched sample; one more leading dim is a batch.
        None: inferred from each state (`is_batched`): a state of 2 or more dims is a batch along its
        leading dim (as everywhere in torch), a vector [n] is one sample.
    name: for reports.
    buffers: tensors the step holds fixed (a module's buffers), moved with the params by `to`.
    """

    step: StepFn
    params: dict[str, Tensor]
    init: InitFn | None = None
    event_ndim: int | None = 1
    name: str = "map"
    info: dict = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)

    def is_batched(self, z: Tensor) -> bool:
        """Whether z carries a leading batch dim: z [B, *event] -> True, one sample's [*event] -> False."""
        if self.event_ndim is None:
            return z.dim() >= 2
        if z.dim() == self.event_ndim:
            return False
        if z.dim() == self.event_ndim + 1:
            return True
        from ..errors import ShapeError
        source = self.info.get("event_ndim_from", "the map's event_ndim")
        raise ShapeError(
            f"{self.name}: state has shape {tuple(z.shape)} ({z.dim()} dims), but {source} is {self.event_ndim}: "
            f"one sample has {self.event_ndim} dims, a batch {self.event_ndim + 1}; for this state pass "
            f"event_ndim={max(z.dim() - 1, 0)} (batched) or leave it unset to infer it")

    def init_state(self, x: Tensor, generator: torch.Generator | None = None,
                   params: Params | None = None) -> Tensor:
        """Initial state z0 for inputs x (params default to self.params)."""
        if self.init is None:
            raise ValueError(
                f"map '{self.name}' has no init: pass z0 explicitly, or build the map with init=...")
        return self.init(self.params if params is None else params, x, generator)

    def __call__(self, z: Tensor, x: Tensor) -> Tensor:
        """One step with the map's own parameters."""
        return self.step(self.params, z, x)

    def with_params(self, params: Params) -> Map:
        """The same map with other parameter values (same keys)."""
        missing = set(self.params) ^ set(params)
        if missing:
            raise KeyError(f"with_params: keys differ from the map's params: {sorted(missing)}")
        return replace(self, params=dict(params), info=dict(self.info))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Map:
        """The same map with floating params AND buffers cast to `dtype` and every tensor moved to `device`."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        params = {k: move(v) for k, v in self.params.items()}
        buffers = {k: move(v) for k, v in self.buffers.items()}
        step = self.step.with_buffers(buffers) if hasattr(self.step, "with_buffers") else self.step
        return replace(self, step=step, params=params, buffers=buffers, info=dict(self.info))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())
