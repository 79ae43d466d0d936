"""What every gradient estimator shares: its cost record, its result type and the linearised step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class CostRecord:
    """Work done by a forward solve and an estimator, accumulated while it runs.

    vjps / jvps: vector-Jacobian / Jacobian-vector products with the step (a batched call counts one).
    forward_steps: step evaluations without the tape; backward_steps: step evaluations on the tape.
    bytes_saved: bytes held for backward (measured by fpgrad.gradient with saved-tensor hooks).
    A caller owns this object and passes it in (`fixed_point(..., record=CostRecord())`).
    """

    vjps: int = 0
    jvps: int = 0
    forward_steps: int = 0
    backward_steps: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0
    low_precision_vjps: int = 0                      # of the vjps, those in a lower dtype (mixed precision)
    forward: list = field(default_factory=list)      # FixedPoint results of the forward solves
    solves: list = field(default_factory=list)       # LinearSolution results of the adjoint solves
    series: list = field(default_factory=list)       # SeriesResidual of the truncated series (Neumann, Phantom)
    messages: list = field(default_factory=list)

    def snapshot(self) -> Cost:
        return Cost(self.vjps, self.jvps, self.forward_steps, self.backward_steps, self.bytes_saved, self.seconds)


@dataclass(frozen=True)
class Cost:
    """The cost of one gradient: see CostRecord for the fields."""

    vjps: int = 0
    jvps: int = 0
    forward_steps: int = 0
    backward_steps: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"vjps": self.vjps, "jvps": self.jvps, "forward_steps": self.forward_steps,
                "backward_steps": self.backward_steps, "bytes_saved": self.bytes_saved, "seconds": self.seconds}


@dataclass(frozen=True)
class Gradient:
    """Result of fpgrad.gradient: gradients of the loss at the (approximate) fixed point.

    params: dict like the map's params; x: gradient w.r.t. the inputs; z: the state the loss saw;
    loss: its value; cost: work done; forward: the forward solve (FixedPoint) if one ran;
    solve: the adjoint linear solve (LinearSolution) for Implicit; series: for Neumann and Phantom, the
    residual their truncated series leaves in the adjoint system (SeriesResidual).
    """

    params: dict[str, Tensor]
    x: Tensor | None
    z: Tensor
    loss: Tensor
    cost: Cost
    estimator: str
    forward: Any = None
    solve: Any = None
    z0: Tensor | None = None
    series: Any = None

    def flat(self) -> Tensor:
        """All parameter gradients concatenated in key order (for errors and cosines)."""
        return torch.cat([self.params[k].reshape(-1) for k in sorted(self.params)])


# The step linearised at z* (J^T v, J v, pullback, cast): one object shared with fpgrad.spectral and the benchmarks.
from ..jacobian import Jacobian as Linearisation  # noqa: E402  (where the class was)


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
