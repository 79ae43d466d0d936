"""The differentiable fixed-point op: `fixed_point(step, params, x, z0, forward=..., backward=...)`.

Composes with `loss.backward()`, `torch.func.grad` and `torch.func.vmap`: the solver loop (data-dependent
stopping) runs inside `torch.autograd.Function`s with `setup_context` and a `vmap` rule that folds
the vmapped dimension into the solver's own per-sample batch.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
from torch import Tensor

from ._checks import check_inputs
from .estimators import Estimator, FiniteDifference, Implicit, get_estimator
from .estimators._base import CostRecord, Linearisation
from .forward import ForwardSolver, get_forward


def _default_forward(dtype: torch.dtype) -> ForwardSolver:
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    return get_forward("anderson", tol=tol, max_iter=500)


# ---- vmap: fold the vmapped dim into the per-sample batch (or loop when params are vmapped) -----------

def _vmap_rule(fn, info, in_dims, static: tuple, x: Tensor, z0: Tensor, params: tuple):
    x_dim, z_dim, p_dims = in_dims[len(static)], in_dims[len(static) + 1], in_dims[len(static) + 2:]
    V = info.batch_size
    if any(d is not None for d in p_dims):
        # per-sample parameters: solve each vmapped slice on its own
        outs = []
        for i in range(V):
            xi = x if x_dim is None else x.select(x_dim, i)
            zi = z0 if z_dim is None else z0.select(z_dim, i)
            pi = tuple(p if d is None else p.select(d, i) for p, d in zip(params, p_dims))
            outs.append(fn.apply(*static, xi, zi, *pi))
        return torch.stack(outs), 0
    x = x.expand(V, *x.shape) if x_dim is None else x.movedim(x_dim, 0)
    z0 = z0.expand(V, *z0.shape) if z_dim is None else z0.movedim(z_dim, 0)
    b = z0.shape[1]
    if x.shape[1] != b:
        raise ValueError(f"fixed_point under vmap: x has per-call batch {x.shape[1]} but z0 has {b}")
    out = fn.apply(*static, x.reshape(V * b, *x.shape[2:]), z0.reshape(V * b, *z0.shape[2:]), *params)
    return out.reshape(V, b, *out.shape[1:]), 0


def _run_forward(step, forward, keys, record, x, z0, param_values) -> Tensor:
    """The forward solve shared by both Functions: z*, with its FixedPoint and steps put in the record."""
    fp = forward.solve(step, dict(zip(keys, param_values)), x, z0, batched=True, check=False)
    record.forward_steps += fp.evaluations
    record.forward.append(fp)
    return fp.z


class _DetachedSolve(torch.autograd.Function):
    """z* = forward solve of z = step(params, z, x) from z0, treated as a constant (no gradient)."""

    @staticmethod
    def forward(step, forward, keys, record, x, z0, *param_values):
        return _run_forward(step, forward, keys, record, x, z0, param_values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):  # never reached: the output is marked non-differentiable
        return (None,) * ctx.num_inputs

    @staticmethod
    def vmap(info, in_dims, step, forward, keys, record, x, z0, *param_values):
        return _vmap_rule(_DetachedSolve, info, in_dims, (step, forward, keys, record), x, z0, param_values)


def solve_detached(step, params: Mapping[str, Tensor], x: Tensor, z0: Tensor, forward: ForwardSolver,
                   record: CostRecord) -> Tensor:
    """The forward solve as a constant of the graph; vmap-safe. z0: [B, ...]."""
    keys = tuple(params)
    return _DetachedSolve.apply(step, forward, keys, record, x, z0.detach(), *[params[k] for k in keys])


class _FixedPointFunction(torch.autograd.Function):
    """z* with an adjoint backward:  grads = (df/d(params, x))^T u,  u from the estimator."""

    @staticmethod
    def forward(step, forward, estimator, keys, record, x, z0, *param_values):
        return _run_forward(step, forward, keys, record, x, z0, param_values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        step, forward, estimator, keys, record, x, z0, *param_values = inputs
        ctx.step, ctx.estimator, ctx.keys, ctx.record = step, estimator, keys, record
        # the forward solve just appended its FixedPoint: the backward may reuse what it learnt (SHINE)
        ctx.fixed_point = record.forward[-1] if record.forward else None
        ctx.save_for_backward(output, x, *param_values)

    @staticmethod
    def backward(ctx, grad_z):
        z, x, *param_values = ctx.saved_tensors
        grads = _AdjointPullback.apply(ctx.step, ctx.estimator, ctx.keys, ctx.record, ctx.fixed_point, grad_z, z, x,
                                       *param_values)
        # z* does not depend on z0: its gradient is exactly zero (filled so that an initialisation's
        # parameters get a .grad of zero rather than None)
        grad_z0 = torch.zeros_like(z) if ctx.needs_input_grad[6] else None
        return (None, None, None, None, None, grads[0], grad_z0, *grads[1:])

    @staticmethod
    def vmap(info, in_dims, step, forward, estimator, keys, record, x, z0, *param_values):
        return _vmap_rule(_FixedPointFunction, info, in_dims, (step, forward, estimator, keys, record),
                          x, z0, param_values)


class _AdjointPullback(torch.autograd.Function):
    """(grad_x, *grad_params) = (df/d(x, params))^T u at z*, u = estimator's adjoint vector for grad_z.

    A Function of its own so that the backward of fixed_point is vmap-safe (vmap(grad(...))): its vmap
    rule solves the adjoint systems of all vmapped slices as one batch, then pulls back per slice.
    """

    @staticmethod
    def forward(step, estimator, keys, record, fixed_point, grad_z, z, x, *param_values):
        params = dict(zip(keys, param_values))
        lin = Linearisation(step, params, x, z, record, fixed_point)
        g = grad_z.reshape(z.shape[0], -1)
        u = estimator.adjoint_vector(lin, g, record)
        if estimator.reports_residual:
            grad_params, grad_x, JTu = lin.pullback_with_state(u)
            estimator.check_residual(lin, g, u, JTu, record)
        else:
            grad_params, grad_x = lin.pullback(u)
        return (grad_x, *[grad_params[k] for k in keys])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_inputs = len(inputs)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fpgrad.fixed_point: double backward (Hessian-vector products through the "
                                  "adjoint) is not supported; use backward=Unrolled(T) for higher derivatives")

    @staticmethod
    def vmap(info, in_dims, step, estimator, keys, record, fixed_point, grad_z, z, x, *param_values):
        g_dim, z_dim, x_dim = in_dims[5:8]
        p_dims = in_dims[8:]
        V = info.batch_size
        if any(d is not None for d in p_dims):
            outs = []
            for i in range(V):
                sl = [t if d is None else t.select(d, i) for t, d in zip((grad_z, z, x, *param_values), in_dims[5:])]
                outs.append(_AdjointPullback.apply(step, estimator, keys, record, None, *sl))
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * (1 + len(keys))

        def front(t, d):
            return t.expand(V, *t.shape) if d is None else t.movedim(d, 0)

        grad_z, z, x = front(grad_z, g_dim), front(z, z_dim), front(x, x_dim)
        b = z.shape[1]
        params = dict(zip(keys, param_values))
        zm, xm = z.reshape(V * b, *z.shape[2:]), x.reshape(V * b, *x.shape[2:])
        # the forward's FixedPoint is reusable only if it describes this very (folded) batch
        fp = fixed_point if fixed_point is not None and fixed_point.z.shape == zm.shape else None
        lin = Linearisation(step, params, xm, zm, record, fp)
        g = grad_z.reshape(V * b, -1)
        u = estimator.adjoint_vector(lin, g, record).reshape(z.shape)
        with_state = estimator.reports_residual

        def pull(zv, xv, uv):
            if with_state:
                _, fn = torch.func.vjp(lambda p, xx, zz: step(p, zz, xx), params, xv, zv)
                gp, gx, gz = fn(uv)
                return (gx, *[gp[k] for k in keys], gz)
            _, fn = torch.func.vjp(lambda p, xx: step(p, zv, xx), params, xv)
            gp, gx = fn(uv)
            return (gx, *[gp[k] for k in keys])

        record.vjps += 1
        out = tuple(torch.func.vmap(pull)(z, x, u))
        if with_state:
            *out, JTu = out
            estimator.check_residual(lin, g, u.reshape(V * b, -1), JTu.reshape(V * b, -1), record)
        return tuple(out), (0,) * len(out)


def _infer_batched(x: Tensor, z0: Tensor) -> bool:
    return z0.dim() >= 2 and x.dim() >= 1 and x.shape[0] == z0.shape[0]


def fixed_point(step: Callable, params: Mapping[str, Tensor], x: Tensor, z0: Tensor, *,
                forward: Union[str, ForwardSolver, None] = None,
                backward: Union[str, Estimator, None] = None,
                record: CostRecord | None = None, batched: bool | None = None,
                check: bool = True) -> Tensor:
    """Differentiable fixed point z* = step(params, z*, x), found from z0 by `forward`.

    backward: the gradient estimator (default Implicit(solver="gmres")): Unrolled(T), Truncated(k),
    OneStep(), Neumann(k), Phantom(k, tau), Implicit(solver=...), or their names ("one_step",
    "implicit-gmres", "neumann-5", ...). Adjoint estimators keep only z*, x and params for backward,
    so memory does not grow with the forward iteration count.
    batched: whether dim 0 of z0 and x is a batch of independent samples (inferred when None: z0 has
    >= 2 dims and x's leading size equals z0's). record: a CostRecord the caller owns, filled with
    forward steps, VJPs/JVPs and the solver results.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"fixed_point: x must be a Tensor, got {type(x).__name__}")
    estimator = Implicit() if backward is None else get_estimator(backward)
    if torch.compiler.is_compiling() and runs_solver_loop(estimator):
        # under torch.compile: the solver loop stops on data (per-sample residuals), so it runs eagerly,
        # outside the graph: one graph break here instead of one per iteration
        return _fixed_point_eagerly(step, params, x, z0, forward=forward, backward=estimator, record=record,
                                    batched=batched, check=check)
    if isinstance(estimator, FiniteDifference):
        raise ValueError("fixed_point: FiniteDifference is a reference for fpgrad.gradient, not a backward pass; "
                         "use Implicit(solver='dense') for an exact backward")
    solver = _default_forward(z0.dtype) if forward is None else get_forward(forward)
    estimator.check_forward(solver)
    record = CostRecord() if record is None else record
    params = dict(params)
    if check and not torch._C._functorch.is_functorch_wrapped_tensor(z0) \
            and not torch._C._functorch.is_functorch_wrapped_tensor(x):
        check_inputs(params, z0, x, where="fixed_point")
    if batched is None:
        batched = _infer_batched(x, z0)
    if not batched:
        return fixed_point(step, params, x.unsqueeze(0), z0.unsqueeze(0), forward=solver, backward=estimator,
                           record=record, batched=True, check=False)[0]
    if estimator.adjoint:
        keys = tuple(params)
        return _FixedPointFunction.apply(step, solver, estimator, keys, record, x, z0,
                                         *[params[k] for k in keys])
    return estimator.differentiate(step, params, x, z0, solver, record)


def runs_solver_loop(estimator: Estimator) -> bool:
    """Whether fixed_point runs a solver loop with data-dependent stopping (every estimator but unrolled)."""
    from .estimators import Truncated, Unrolled
    return not (isinstance(estimator, Unrolled) or (isinstance(estimator, Truncated) and estimator.T == estimator.k))


# fixed_point with torch.compile's tracing disabled (dynamo sees one skipped call and runs it eagerly)
_fixed_point_eagerly = torch._disable_dynamo(fixed_point)
