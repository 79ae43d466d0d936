"""What every gradient estimator shares: the linearised step and the Estimator base (the cost record and the
result type, Cost / CostRecord / Gradient, live in fpgrad.results and are re-exported here)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..results import Cost, CostRecord, Gradient

__all__ = ["Cost", "CostRecord", "Estimator", "Gradient", "Linearisation"]


# The step linearised at z* (J^T v, J v, pullback, cast): one object shared with fpgrad.spectral and the benchmarks.
from ..jacobian import Jacobian as Linearisation  # noqa: E402  (where the class was)


class Estimator:
    """Base of the gradient estimators: one entry point, `apply`, and what callers may ask as properties.

    `apply(step, params, x, z0, forward, record) -> z` returns the differentiable state (z* or an iterate near
    it); torch autograd (loss.backward(), torch.func.grad / vmap) then gives the gradients. Subclasses are
    frozen dataclasses of one of two kinds:
    - adjoint (implement `adjoint_vector(lin, g, record)`; `apply` is inherited): the forward solve gives z*,
      and the gradient is (df/d(params, x))^T u at z* with u the hook's answer for g = dL/dz* (Neumann,
      Phantom, Implicit). Only z*, x and params are kept for backward.
    - native (implement `apply`): the state is built on the autograd tape (Unrolled, Truncated, OneStep).
    A reference (`is_reference`, FiniteDifference) computes a whole gradient with `compute(m, x, loss_fn, ...)`
    for `fpgrad.gradient` and has no `apply`.

    Callers (fixed_point, ImplicitSlotAttention, compare) ask the properties below, never the class:
    taped_steps_after_solve, reaches_initial_state, runs_solver_loop, uses_forward, is_reference, describe().
    """

    name: str = "estimator"
    reports_residual: bool = False    # adjoint kind: the pullback also gives J^T u, passed to check_residual
    is_reference: bool = False        # a reference gradient for fpgrad.gradient (compute), not a backward pass

    # ---- the one entry point ------------------------------------------------------------------------------
    def apply(self, step, params: dict[str, Tensor], x: Tensor, z0: Tensor, forward, record: CostRecord) -> Tensor:
        """The differentiable state for the batch z0 [B, ...], x [B, ...] (params: dict of tensors).

        forward: the ForwardSolver that finds z* (an estimator whose `uses_forward` is False ignores it);
        record: the caller's CostRecord, filled with forward steps, VJPs/JVPs and the solver results.
        Default (adjoint kind): z* from `forward`, with the backward (df/d(params, x))^T adjoint_vector(g).
        """
        if self.adjoint:
            from ._adjoint_function import adjoint_fixed_point
            return adjoint_fixed_point(self, step, params, x, z0, forward, record)
        return self.differentiate(step, params, x, z0, forward, record)

    # ---- the hooks behind apply ---------------------------------------------------------------------------
    def adjoint_vector(self, lin: Linearisation, g: Tensor, record: CostRecord) -> Tensor:
        """Adjoint kind: u [B, n] such that the gradient is (df/d(params, x))^T u at z*, for g = dL/dz* [B, n]
        (the exact answer solves (I - J^T) u = g; lin gives J^T v products, counted in record)."""
        raise NotImplementedError(self._no_entry_point())

    def differentiate(self, step, params, x, z0, forward, record: CostRecord) -> Tensor:
        """The native hook of earlier versions (a subclass that defines it instead of `apply` still works)."""
        raise NotImplementedError(self._no_entry_point())

    def check_residual(self, lin: Linearisation, g: Tensor, u: Tensor, JTu: Tensor, record: CostRecord) -> None:
        """Adjoint kind with reports_residual: record what u leaves of (I - J^T) u = g (JTu = J^T u, free)."""

    def check_forward(self, forward) -> None:
        """Raise if this estimator cannot work with the forward solver `forward` (default: any works)."""

    def compute(self, m, x: Tensor, loss_fn, z0: Tensor | None = None, generator: torch.Generator | None = None):
        """A reference (is_reference): the whole Gradient of loss_fn(z*) for fpgrad.gradient."""
        raise NotImplementedError(f"{type(self).__name__} is not a reference estimator (is_reference is False): "
                                  "fpgrad.gradient differentiates it through apply")

    def _no_entry_point(self) -> str:
        return (f"{type(self).__name__}: an Estimator implements apply(step, params, x, z0, forward, record) -> state "
                "(differentiated by the autograd tape) or adjoint_vector(lin, g, record) -> u (the adjoint kind, "
                "whose apply is inherited)")

    # ---- what callers ask -----------------------------------------------------------------------------------
    @property
    def adjoint(self) -> bool:
        """Whether this is the adjoint kind: it implements `adjoint_vector` and the inherited `apply` uses it."""
        return type(self).adjoint_vector is not Estimator.adjoint_vector

    @property
    def taped_steps_after_solve(self) -> int:
        """Steps applied on the autograd tape after the forward solver's solve (OneStep: 1, Truncated(k) after
        a solve: k; the adjoint kind: 0). A caller that wants `iters` applications of the step in all runs the
        solver for iters minus these."""
        return 0

    @property
    def reaches_initial_state(self) -> bool:
        """Whether the backward reaches z0 (and so the parameters of the initialisation): True unless z0 is
        detached (OneStep without straight-through, Truncated after a solve). The adjoint kind reaches it
        with an exact zero (z* does not depend on z0)."""
        return True

    @property
    def runs_solver_loop(self) -> bool:
        """Whether apply runs a solver loop (data-dependent stopping: under torch.compile it runs eagerly)."""
        return True

    @property
    def uses_forward(self) -> bool:
        """Whether apply uses the forward solver it is given (Unrolled iterates from z0 itself)."""
        return True

    def describe(self) -> str:
        """A short readable label, e.g. 'Neumann(5)', 'Implicit(gmres)', 'OneStep(ST)' (default: the repr)."""
        return repr(self)
