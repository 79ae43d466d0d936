"""frobenius_penalty(..., fz=f): the VJP form reuses the task's evaluation f = step(params, z, x) (as TorchDEQ's
jac_reg) instead of evaluating the step again: same value and gradient, one step evaluation fewer."""

from __future__ import annotations

import pytest
import torch
from contraction_helpers import tanh_with_spectrum

from fpgrad.contraction import frobenius_penalty


def _setup(batched=True):
    m, x, z = tanh_with_spectrum([0.8], 6, seed=0)
    calls = []

    def step(params, zz, xx):
        calls.append(1)
        return m.step(params, zz, xx)
    params = {k: v.clone().requires_grad_(True) for k, v in m.params.items()}
    if not batched:
        x, z = x[0], z[0]
    probes = torch.randn(3, *z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return step, params, x, z, probes, t, calls


@pytest.mark.parametrize("batched", [True, False])
def test_reuse_gives_the_same_value_and_gradient_with_one_evaluation_less(batched):
    step, params, x, z, probes, t, calls = _setup(batched)
    kw = dict(vectors=probes, batched=batched)

    def loss(reuse):
        calls.clear()
        zl = z.detach().clone().requires_grad_(True)
        f = step(params, zl, x)
        pen = frobenius_penalty(step, params, zl, x, fz=f, **kw) if reuse else \
            frobenius_penalty(step, params, z, x, **kw)
        total = (f - t).pow(2).mean() + pen
        grads = torch.autograd.grad(total, list(params.values()))
        return pen.detach(), grads, len(calls)
    p0, g0, c0 = loss(False)
    p1, g1, c1 = loss(True)
    torch.testing.assert_close(p1, p0, rtol=1e-12, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert c1 == 1 and c0 == 2                    # the task's evaluation only, vs the task's + the penalty's


def test_reuse_errors_name_the_fix():
    step, params, x, z, probes, t, _ = _setup()
    zl = z.detach().clone().requires_grad_(True)
    f = step(params, zl, x)
    with pytest.raises(ValueError, match="VJP form only"):
        frobenius_penalty(step, params, zl, x, fz=f, form="jvp", vectors=probes)
    with pytest.raises(ValueError, match="requires_grad_"):
        frobenius_penalty(step, params, z, x, fz=step(params, z, x), vectors=probes)
    with pytest.raises(Exception, match="z's shape"):
        frobenius_penalty(step, params, zl, x, fz=f[:1], vectors=probes)
