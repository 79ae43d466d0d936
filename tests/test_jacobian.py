"""fpgrad.jacobian.Jacobian: the one Jacobian-at-z* object of the estimators, the spectral measurements and the
benchmarks: its products against dense jacrev, its counts, its relative residual, and its old names."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import contractive_slot_attention, contractive_tanh
from hypothesis import given, settings
from hypothesis import strategies as st

import fpgrad
from fpgrad.errors import ConvergenceWarning
from fpgrad.estimators import CostRecord, Linearisation
from fpgrad.jacobian import Jacobian, relative_residual
from fpgrad.spectral import JacobianOperator, ProductCount, jacobian_operator

F64 = torch.float64


def tanh_at_fixed_point(n: int = 5, batch: int = 3, seed: int = 0):
    m = contractive_tanh(n, 0.8, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        z = fpgrad.solve(m, x, tol=1e-13, max_iter=500).z
    return m, x, z


def dense_jacobian(m, x, z) -> torch.Tensor:
    """Per-sample J = df/dz by torch.func.jacrev, [B, n, n] (the independent reference)."""
    def one(zb, xb):
        return m.step(m.params, zb[None], xb[None])[0]
    return torch.stack([torch.func.jacrev(one)(z[b], x[b]).reshape(z[b].numel(), -1) for b in range(z.shape[0])])


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 7), batch=st.integers(1, 4), seed=st.integers(0, 1000))
def test_products_match_dense_jacrev(n, batch, seed):
    m, x, z = tanh_at_fixed_point(n, batch, seed)
    D = dense_jacobian(m, x, z)
    J = Jacobian(m.step, m.params, x, z)
    v = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    assert torch.allclose(J.JT(v), torch.einsum("bij,bi->bj", D, v), atol=1e-12)
    assert torch.allclose(J.J(v), torch.einsum("bij,bj->bi", D, v), atol=1e-12)
    assert torch.allclose(J.rmatvec(v), J.JT(v), atol=1e-13) and torch.allclose(J.matvec(v), J.J(v), atol=1e-13)
    assert torch.allclose(J.dense(), D, atol=1e-12)


def test_products_on_a_structured_state_match_dense_jacrev():
    m = contractive_slot_attention(dim=4, num_slots=2)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        z = fpgrad.solve(m, x, tol=1e-12, max_iter=500).z
    D = dense_jacobian(m, x, z)                                  # [2, 8, 8]
    J = Jacobian(m.step, m.params, x, z)
    v = torch.randn(2, 8, dtype=F64)
    assert torch.allclose(J.JT(v), torch.einsum("bij,bi->bj", D, v), atol=1e-12)
    assert torch.allclose(J.J(v), torch.einsum("bij,bj->bi", D, v), atol=1e-12)
    assert J.JT(v.reshape(z.shape)).shape == z.shape             # the result keeps the input's shape


def test_every_product_is_counted_once_per_call_and_blocks_count_p():
    m, x, z = tanh_at_fixed_point(n=4, batch=3)
    record = CostRecord()
    J = Jacobian(m.step, m.params, x, z, record)
    v = torch.randn(3, 4, dtype=F64)
    J.JT(v), J.J(v), J.J(v), J.rmatvec(v)
    J.matvec(torch.randn(5, 3, 4, dtype=F64))                   # a block of 5 vectors per sample
    J.pullback(v), J.pullback_with_state(v)
    assert (record.vjps, record.jvps) == (1 + 1 + 2, 2 + 5)
    assert J.count is record and J.cast(torch.float32).record is record
    J.cast(torch.float32).JT(v.float())
    assert record.vjps == 5


def test_pullback_matches_autograd_of_the_step():
    m, x, z = tanh_at_fixed_point(n=4, batch=2)
    u = torch.randn(2, 4, dtype=F64)
    gp, gx = Jacobian(m.step, m.params, x, z).pullback(u)
    gp2, gx2, JTu = Jacobian(m.step, m.params, x, z).pullback_with_state(u)
    params = {k: v.clone().requires_grad_(True) for k, v in m.params.items()}
    xr = x.clone().requires_grad_(True)
    zr = z.clone().requires_grad_(True)
    out = m.step(params, zr, xr)
    grads = torch.autograd.grad(out, [*params.values(), xr, zr], u)
    for k, g in zip(params, grads, strict=False):
        assert torch.allclose(gp[k], g, atol=1e-13) and torch.allclose(gp2[k], g, atol=1e-13)
    assert torch.allclose(gx, grads[-2], atol=1e-13) and torch.allclose(JTu, grads[-1], atol=1e-13)


def test_relative_residual_is_distance_over_the_norm_of_f():
    # away from the fixed point, with ||z|| > ||f(z)||: the definition is ||f(z) - z|| / ||f(z)||, not / max(...)
    m, x, _ = tanh_at_fixed_point(n=4, batch=2)
    z = 5.0 * torch.ones(2, 4, dtype=F64)
    fz = m.step(m.params, z, x)
    expected = (fz - z).norm(dim=1) / fz.norm(dim=1)
    J = Jacobian(m.step, m.params, x, z)
    assert torch.allclose(J.relative_residual, expected, rtol=1e-14)
    with pytest.warns(ConvergenceWarning, match="not a fixed point"):
        op = jacobian_operator(m, x, z)
    assert torch.allclose(op.relative_residual, expected, rtol=1e-14)
    assert torch.allclose(relative_residual(z, fz), expected, rtol=1e-14)
    assert not torch.allclose(expected, (fz - z).norm(dim=1) / torch.maximum(fz.norm(dim=1), z.norm(dim=1)))


def test_relative_residual_is_the_forward_solvers_own():
    m, x, _ = tanh_at_fixed_point(n=6, batch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sol = fpgrad.solve(m, x, method="iterate", tol=0.0, max_iter=7, return_best=False)
    J = Jacobian(m.step, m.params, x, sol.z)
    assert torch.allclose(J.relative_residual, sol.relative_residuals[-1], rtol=1e-10)


def test_old_names_are_the_one_object():
    m, x, z = tanh_at_fixed_point(n=4, batch=2)
    assert Linearisation is Jacobian and fpgrad.estimators.Linearisation is Jacobian
    assert issubclass(JacobianOperator, Jacobian) and ProductCount is CostRecord
    op = jacobian_operator(m, x, z)
    assert isinstance(op, JacobianOperator) and isinstance(op.count, CostRecord)
    lin = Linearisation(m.step, m.params, x, z)
    v = torch.randn(2, 4, dtype=F64)
    assert torch.allclose(op.rmatvec(v), lin.JT(v), atol=1e-14) and torch.allclose(op.matvec(v), lin.J(v), atol=1e-13)
    rho = fpgrad.spectral.spectral_radius(lin, method="dense")                    # the spectral tools take it
    assert torch.allclose(rho, torch.linalg.eigvals(dense_jacobian(m, x, z)).abs().amax(dim=1), atol=1e-12)


def test_unbatched_state_pullback_keeps_the_inputs_shape():
    m, x, z = tanh_at_fixed_point(n=4, batch=1)
    J = Jacobian(m.step, m.params, x[0], z[0], batched=False)
    gp, gx = J.pullback(torch.ones(4, dtype=F64))
    assert gx.shape == x[0].shape and J.relative_residual.dim() == 0
