"""The adjoint kind's `apply`: z* from the forward solve, with a backward  grads = (df/d(params, x))^T u  at z*,
u = the estimator's `adjoint_vector(lin, g, record)` for the incoming gradient g.

Two `torch.autograd.Function`s with `setup_context` and vmap rules, so that `Estimator.apply` composes with
`loss.backward()`, `torch.func.grad` and `torch.func.vmap` (also vmap(grad(...))).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..forward import ForwardSolver
from ..forward._detached import fold_vmap, run_forward
from ._base import CostRecord, Linearisation


class _FixedPointFunction(torch.autograd.Function):
    """z* with an adjoint backward:  grads = (df/d(params, x))^T u,  u from the estimator."""

    @staticmethod
    def forward(step, forward, estimator, keys, record, x, z0, *param_values):
        return run_forward(step, forward, keys, record, x, z0, param_values)

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
        grad_params = _none_for_unused(ctx.step, ctx.keys, param_values, z, x, list(grads[1:]),
                                       ctx.needs_input_grad[7:])
        return (None, None, None, None, None, grads[0], grad_z0, *grad_params)

    @staticmethod
    def vmap(info, in_dims, step, forward, estimator, keys, record, x, z0, *param_values):
        return fold_vmap(_FixedPointFunction, info, in_dims, (step, forward, estimator, keys, record),
                         x, z0, param_values)


def _none_for_unused(step, keys, param_values, z: Tensor, x: Tensor, grads: list, needed) -> list:
    """The adjoint pullback (a torch.func VJP) gives zeros for a parameter the step never uses, where autograd,
    and fpgrad's taped estimators, give None (an optimiser then leaves it alone instead of stepping it on a
    zero gradient). When some needed gradient is exactly zero (one reduction, one host sync), one probe of the
    step under autograd tells unused parameters from used ones whose gradient happens to be zero. Skipped
    under torch.func transforms (no value-dependent control flow there)."""
    wanted = [i for i, (g, need) in enumerate(zip(grads, needed)) if need and g is not None]
    tensors = [grads[i] for i in wanted] + [z, x, *param_values]
    if not wanted or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors if t is not None):
        return grads
    peaks = torch.stack([grads[i].detach().abs().amax() if grads[i].numel() else grads[i].new_zeros(())
                         for i in wanted])
    zero = [i for i, flag in zip(wanted, (peaks == 0).tolist()) if flag]
    if not zero:
        return grads
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(i in zero) for i, (k, v) in enumerate(zip(keys, param_values))}
        out = step(leaves, z.detach(), None if x is None else x.detach())
        probe = ([None] * len(zero) if not out.requires_grad else     # none of them reaches the output
                 torch.autograd.grad(out, [leaves[keys[i]] for i in zero], torch.ones_like(out), allow_unused=True))
    for i, g in zip(zero, probe):
        if g is None:
            grads[i] = None
    return grads


class _AdjointPullback(torch.autograd.Function):
    """(grad_x, *grad_params) = (df/d(x, params))^T u at z*, u = estimator's adjoint vector for grad_z.

    A Function of its own so that the backward of fixed_point is vmap-safe (vmap(grad(...))): its vmap
    rule solves the adjoint systems of all vmapped slices as one batch, then pulls back per slice.
    """

    @staticmethod
    def forward(step, estimator, keys, record, fixed_point, grad_z, z, x, *param_values):
        start = time.perf_counter()
        params = dict(zip(keys, param_values))
        lin = Linearisation(step, params, x, z, record, fixed_point)
        g = grad_z.reshape(z.shape[0], math.prod(z.shape[1:]))
        u = estimator.adjoint_vector(lin, g, record)
        if estimator.reports_residual:
            grad_params, grad_x, JTu = lin.pullback_with_state(u)
            estimator.check_residual(lin, g, u, JTu, record)
        else:
            grad_params, grad_x = lin.pullback(u)
        record.seconds += time.perf_counter() - start          # the backward's share of the wall time
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
        g = grad_z.reshape(V * b, math.prod(z.shape[2:]))
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
            n = math.prod(z.shape[2:])
            estimator.check_residual(lin, g, u.reshape(V * b, n), JTu.reshape(V * b, n), record)
        return tuple(out), (0,) * len(out)


def adjoint_fixed_point(estimator, step, params: dict[str, Tensor], x: Tensor, z0: Tensor, forward: ForwardSolver,
                        record: CostRecord) -> Tensor:
    """z* [B, ...] solved from z0 [B, ...] by `forward`, differentiated by `estimator.adjoint_vector`: only z*, x
    and params are kept for backward, so memory does not grow with the forward iteration count."""
    keys = tuple(params)
    return _FixedPointFunction.apply(step, forward, estimator, keys, record, x, z0, *[params[k] for k in keys])
