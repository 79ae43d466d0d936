"""The differentiable fixed-point op: `fixed_point(step, params, x, z0, forward=..., backward=...)`.

Composes with `loss.backward()`, `torch.func.grad` and `torch.func.vmap`: `fixed_point` checks its inputs and
hands the batch to the estimator's one entry point, `Estimator.apply` (fpgrad/estimators), whose solver loops
(data-dependent stopping) run inside `torch.autograd.Function`s with `setup_context` and vmap rules that fold
the vmapped dimension into the solver's own per-sample batch (fpgrad/forward/_detached.py). Dependencies run
one way: autograd -> estimators -> forward.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Mapping, Union

import torch
from torch import Tensor

from ._checks import check_inputs
from .estimators import Estimator, Implicit, get_estimator
from .estimators._base import CostRecord
from .forward import ForwardSolver, default_tolerance, get_forward, solve_detached
from .results import warn

__all__ = ["fixed_point", "solve_detached"]


def _default_forward(dtype: torch.dtype) -> ForwardSolver:
    """fixed_point's forward when none is given: Anderson to 1e-10 in float64, else to default_tolerance(dtype)
    (1e-5 in float32, 1e-2 in bfloat16 / float16), at most 500 steps."""
    tol = 1e-10 if dtype == torch.float64 else default_tolerance(dtype)
    return get_forward("anderson", tol=tol, max_iter=500)


_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def warn_ignored_forward(estimator: Estimator, forward, where: str, depth: int = 2) -> None:
    """Warn when a caller outside fpgrad passes forward= to an estimator that runs its own iterations (Unrolled,
    Truncated(k, T)): the forward solver is ignored. (fpgrad's own callers pass one forward to every estimator.)"""
    if forward is None or estimator.uses_forward or torch.compiler.is_compiling():
        return
    frame = sys._getframe(depth)                  # the frame that called the public entry point
    if frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        return
    warn(f"{where}: forward={getattr(forward, 'name', forward)!r} is ignored by {estimator.describe()}, which runs "
         "its own plain iterations from z0 (no forward solve); drop forward=, or use an estimator that differentiates "
         "the forward's fixed point (Implicit(), OneStep(), Neumann(k), Truncated(k) without T)", UserWarning)


def _infer_batched(x: Tensor, z0: Tensor) -> bool:
    return z0.dim() >= 2 and x.dim() >= 1 and x.shape[0] == z0.shape[0]


def fixed_point(step: Callable, params: Mapping[str, Tensor], x: Tensor, z0: Tensor, *,
                forward: Union[str, ForwardSolver, None] = None,
                backward: Union[str, Estimator, None] = None,
                record: CostRecord | None = None, batched: bool | None = None,
                check: bool = True) -> Tensor:
    """Differentiable fixed point z* = step(params, z*, x), found from z0 by `forward`, differentiated by `backward`.

    step: step(params, z, x) -> z_next, a pure function of its tensors, same shape and dtype as z (with
        batched=True it receives the whole batch [B, ...]).
    params: dict name -> Tensor (any shapes); gradients flow to those that require grad.
    x: the context (e.g. encoded inputs [B, N, D]; [B, ...] when batched, one sample's shape otherwise).
    z0: the initial state (e.g. slots [B, K, D]); the output has its shape. The adjoint estimators give it an
        exact zero gradient (z* does not depend on it); Unrolled and OneStep(straight_through=True) reach it.
    forward: the forward solver: "iterate" | "anderson" | "broyden" or a ForwardSolver object (default
        Anderson to 1e-10 in float64, 1e-5 otherwise, at most 500 steps). Unrolled(T) ignores it.
    backward: the gradient estimator (default Implicit(solver="gmres")): Unrolled(T), Truncated(k), OneStep(),
        Neumann(k), Phantom(k, tau), Implicit(solver=...), any Estimator subclass, or a name ("one_step",
        "implicit-gmres", "neumann-5", ...). Adjoint estimators keep only z*, x and params for backward, so
        memory does not grow with the forward iteration count. FiniteDifference is refused (a reference for
        fpgrad.gradient, not a backward pass).
    record: a CostRecord the caller owns, filled with forward steps, VJPs/JVPs and the solver results
        (FixedPoint in record.forward, LinearSolution in record.solves, SeriesResidual in record.series).
    batched: whether dim 0 of z0 and x is a batch of independent samples (inferred when None: z0 has >= 2 dims
        and x's leading size equals z0's); each sample then stops on its own residual.
    check: check shapes, dtypes, devices and finiteness of params, z0 and x first (raises fpgrad.errors with the
        fix); False skips it (e.g. inside a training step whose inputs are checked elsewhere).
    Returns z: the state the estimator differentiates (z* for the solver-based estimators, z_T for Unrolled),
    shaped like z0.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"fixed_point: x must be a Tensor, got {type(x).__name__}")
    estimator = Implicit() if backward is None else get_estimator(backward)
    warn_ignored_forward(estimator, forward, "fixed_point")
    if torch.compiler.is_compiling() and estimator.runs_solver_loop:
        # under torch.compile: the solver loop stops on data (per-sample residuals), so it runs eagerly,
        # outside the graph: one graph break here instead of one per iteration
        return _fixed_point_eagerly(step, params, x, z0, forward=forward, backward=estimator, record=record,
                                    batched=batched, check=check)
    solver = _default_forward(z0.dtype) if forward is None else get_forward(forward)
    estimator.check_forward(solver)
    record = CostRecord() if record is None else record
    params = dict(params)
    if check:       # (under torch.func transforms: shapes, dtypes and devices; values are read below vmap)
        check_inputs(params, z0, x, where="fixed_point")
    if batched is None:
        batched = _infer_batched(x, z0)
    if not batched:
        return fixed_point(step, params, x.unsqueeze(0), z0.unsqueeze(0), forward=solver, backward=estimator,
                           record=record, batched=True, check=False)[0]
    if torch.compiler.is_compiling():               # (no host clock inside a compiled graph)
        return estimator.apply(step, params, x, z0, solver, record)
    start = time.perf_counter()
    z = estimator.apply(step, params, x, z0, solver, record)
    record.seconds += time.perf_counter() - start             # wall time of the forward (the backward adds its own)
    return z


# fixed_point with torch.compile's tracing disabled (dynamo sees one skipped call and runs it eagerly)
_fixed_point_eagerly = torch._disable_dynamo(fixed_point)
