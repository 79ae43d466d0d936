"""The forward solve as a constant of the autograd graph, vmap-safe: what the estimators build on.

`solve_detached` runs a forward solver inside a `torch.autograd.Function` whose output is non-differentiable;
`fold_vmap` is the vmap rule shared with the estimators' adjoint Function (fpgrad/estimators/_adjoint_function.py):
it folds the vmapped dimension into the solver's own per-sample batch, so that `torch.func.vmap` of a solve is
one batched solve.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ._common import ForwardSolver


def fold_vmap(fn, info, in_dims, static: tuple, x: Tensor, z0: Tensor, params: tuple):
    """vmap rule of a Function `fn.apply(*static, x, z0, *params)`: the vmapped dim of x and z0 [V, b, ...] is
    folded into the batch [V * b, ...] (one solve); vmapped params are solved slice by slice."""
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
    for name, t in (("x", x), ("z0", z0)):
        _check_finite_unfolded(name, t)
    try:
        out = fn.apply(*static, x.reshape(V * b, *x.shape[2:]), z0.reshape(V * b, *z0.shape[2:]), *params)
    except NonFiniteError as err:
        if getattr(err, "samples", None) is None:
            raise
        raise NonFiniteError(str(err).replace(
            f"in sample(s) {err.samples[:10]}", f"in (vmapped call, sample) {_unfold(err.samples, b)[:10]}")) from None
    return out.reshape(V, b, *out.shape[1:]), 0


def _unfold(samples: list[int], b: int) -> list[tuple[int, int]]:
    """Folded batch indices (vmapped call * b + sample) back to (vmapped call, sample within the call)."""
    return [divmod(int(s), b) for s in samples]


def _check_finite_unfolded(name: str, t: Tensor) -> None:
    """Name NaN/Inf in a vmapped input [V, b, ...] by (vmapped call, sample) before the folded solve would blame
    the map for it (the values are readable here, one level below vmap, unless an outer transform wraps them)."""
    if not t.is_floating_point() or _wrapped(t) or t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t.reshape(t.shape[0] * t.shape[1], -1)).all(dim=1)
    if bool(bad.any()):
        pairs = _unfold(bad.nonzero().squeeze(1).tolist(), t.shape[1])
        raise NonFiniteError(f"fixed_point under vmap: {name} contains NaN/Inf in (vmapped call, sample) "
                             f"{pairs[:10]}{' ...' if len(pairs) > 10 else ''}; fpgrad needs finite inputs")


def run_forward(step, forward: ForwardSolver, keys: tuple[str, ...], record: Any, x: Tensor, z0: Tensor,
                param_values) -> Tensor:
    """The batched forward solve z* from z0 [B, ...]; its FixedPoint and step count go into `record`
    (a CostRecord: `forward_steps`, `forward`)."""
    fp = forward.solve(step, dict(zip(keys, param_values)), x, z0, batched=True, check=False)
    record.forward_steps += fp.evaluations
    record.forward.append(fp)
    return fp.z


class _DetachedSolve(torch.autograd.Function):
    """z* = forward solve of z = step(params, z, x) from z0, treated as a constant (no gradient)."""

    @staticmethod
    def forward(step, forward, keys, record, x, z0, *param_values):
        return run_forward(step, forward, keys, record, x, z0, param_values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):  # never reached: the output is marked non-differentiable
        return (None,) * ctx.num_inputs

    @staticmethod
    def vmap(info, in_dims, step, forward, keys, record, x, z0, *param_values):
        return fold_vmap(_DetachedSolve, info, in_dims, (step, forward, keys, record), x, z0, param_values)


def _wrapped(t) -> bool:
    return isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def solve_detached(step, params: Mapping[str, Tensor], x: Tensor, z0: Tensor, forward: ForwardSolver,
                   record: Any) -> Tensor:
    """The forward solve as a constant of the graph (no gradient flows through it); vmap-safe.

    z0: [B, ...] (a batch of independent samples); x: [B, ...]; record: a CostRecord (fpgrad.estimators)
    that receives the FixedPoint and the step count. Returns z* [B, ...], detached.
    """
    keys = tuple(params)
    values = [params[k] for k in keys]
    if (torch._C._functorch.peek_interpreter_stack() is None and not torch.compiler.is_compiling()) \
            or not any(map(_wrapped, (x, z0, *values))):
        # no torch.func transform to fold: the solver runs under no_grad, its output is already a constant
        return run_forward(step, forward, keys, record, x, z0.detach(), values)
    return _DetachedSolve.apply(step, forward, keys, record, x, z0.detach(), *[params[k] for k in keys])
