"""Forward solvers: closed-form fixed points, speed ordering, per-sample flags, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import contractive_slot_attention, cuda, linear_problem
from hypothesis import given
from hypothesis import strategies as st

import fpgrad
from fpgrad.errors import ConvergenceError, ConvergenceWarning, DeviceError, DTypeError, NonFiniteError, ShapeError

METHODS = ["iterate", "anderson", "broyden"]


@pytest.mark.parametrize("method", METHODS)
@given(n=st.integers(1, 24), batch=st.integers(1, 4), rho=st.floats(0.0, 0.95), seed=st.integers(0, 10_000))
def test_solver_finds_closed_form_fixed_point_of_linear_map(method, n, batch, rho, seed):
    m, x, z_star = linear_problem(n=n, batch=batch, spectral_radius=rho, seed=seed)
    sol = fpgrad.solve(m, x, method=method, tol=1e-10, max_iter=3000, throw=True)
    assert bool(sol.converged.all())
    inverse_norm = torch.linalg.matrix_norm(torch.linalg.inv(torch.eye(n, dtype=torch.float64) - m.params["A"]), 2)
    # ||z - z*|| <= ||(I - A)^{-1}|| ||residual|| ; residual <= tol ||f(z)|| (~ tol ||z*||); 2x for round-off
    bound = 1e-10 * inverse_norm * z_star.norm(dim=1).clamp_min(1.0) * 2
    assert ((sol.z - z_star).norm(dim=1) <= bound).all()


@pytest.mark.parametrize("method", METHODS)
def test_unbatched_state_gives_unbatched_result(method):
    m, x, z_star = linear_problem(n=5, batch=1)
    sol = fpgrad.solve(m, x[0], method=method, tol=1e-12, max_iter=500)
    assert sol.z.shape == (5,) and sol.converged.dim() == 0 and sol.steps.dim() == 0
    assert sol.residuals.dim() == 1
    assert torch.allclose(sol.z, z_star[0], atol=1e-9)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_accelerated_solvers_need_fewer_steps_at_radius_095(method):
    m, x, _ = linear_problem(n=40, batch=3, spectral_radius=0.95, seed=1)
    plain = fpgrad.solve(m, x, method="iterate", tol=1e-8, max_iter=5000)
    fast = fpgrad.solve(m, x, method=method, tol=1e-8, max_iter=5000)
    assert plain.all_converged and fast.all_converged
    assert int(fast.steps.max()) < int(plain.steps.min())


def test_per_sample_flags_in_a_batch_mixing_contractive_and_expanding_samples():
    # z_next = a * z + x with a per-sample factor carried in x: samples 0, 2 contract, 1, 3 do not
    def step(params, z, x):
        return x[:, :1] * z + x[:, 1:]

    a = torch.tensor([0.5, 1.2, 0.9, 1.0], dtype=torch.float64)
    x = torch.stack([a, torch.ones(4, dtype=torch.float64)], dim=1)
    z0 = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="2 of 4 sample"):
        sol = fpgrad.forward.Iterate(tol=1e-10, max_iter=400).solve(step, {}, x, z0)
    assert sol.converged.tolist() == [True, False, True, False]
    assert sol.steps[0] < sol.steps[2] < sol.steps[1]
    assert torch.allclose(sol.z[[0, 2]].squeeze(1), 1 / (1 - a[[0, 2]]), atol=1e-8)


def test_converged_samples_do_not_drift_while_others_iterate():
    m, x, z_star = linear_problem(n=6, batch=2, spectral_radius=0.3, seed=0)
    fast_only = fpgrad.solve(m, x[:1], method="iterate", tol=1e-6)
    # sample 1 gets a far-away start so it needs many more steps
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    z0[1] = 1e6
    both = fpgrad.solve(m, x, z0=z0, method="iterate", tol=1e-6, max_iter=500)
    assert both.steps[0] == fast_only.steps[0] < both.steps[1]
    # a batch of two against a batch of one: kernels may differ in the last bits (MKL), so round-off, not
    # bitwise; one more step of this map would move z by ~1e-7, far above the tolerance
    eps = torch.finfo(both.z.dtype).eps
    torch.testing.assert_close(both.z[0], fast_only.z[0], rtol=64 * eps, atol=64 * eps)


def test_nonconvergence_warns_with_residual_and_cause_and_throw_raises():
    m = fpgrad.maps.linear(torch.eye(3, dtype=torch.float64) * 1.01, torch.eye(3, dtype=torch.float64))
    x = torch.ones(1, 3, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=r"worst residual .* not contractive"):
        sol = fpgrad.solve(m, x, method="iterate", max_iter=50)
    assert not bool(sol.converged.any())
    with pytest.raises(ConvergenceError, match="did not converge in 50 steps"):
        fpgrad.solve(m, x, method="iterate", max_iter=50, throw=True)


def test_slow_convergence_is_described_as_slow():
    m = fpgrad.maps.linear(0.99 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    with pytest.warns(ConvergenceWarning, match=r"converging slowly \(rate 0.9900"):
        fpgrad.solve(m, torch.ones(1, 3, dtype=torch.float64), method="iterate", max_iter=30, tol=1e-12)


def test_damping_still_reaches_the_fixed_point():
    m, x, z_star = linear_problem(n=5, batch=2, spectral_radius=0.8, seed=2)
    sol = fpgrad.solve(m, x, method="iterate", damping=0.5, tol=1e-12, max_iter=2000)
    assert torch.allclose(sol.z, z_star, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_slot_attention_converges_per_sample(method):
    m = contractive_slot_attention(dim=8, num_slots=3)
    x = torch.randn(3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sol = fpgrad.solve(m, x, method=method, tol=1e-10, max_iter=300, generator=torch.Generator().manual_seed(1))
    assert sol.all_converged
    assert torch.allclose(m.step(m.params, sol.z, x), sol.z, atol=1e-8)
    assert sol.residuals.shape[1] == 3


def test_residual_trace_matches_returned_state():
    m, x, _ = linear_problem(n=8, batch=3, spectral_radius=0.7)
    sol = fpgrad.solve(m, x, method="broyden", tol=1e-9)
    actual = (m.step(m.params, sol.z, x) - sol.z).norm(dim=1)
    assert torch.allclose(sol.residual, actual, rtol=1e-6, atol=1e-14)


def test_unknown_method_names_the_choices():
    m, x, _ = linear_problem()
    with pytest.raises(ValueError, match="anderson"):
        fpgrad.solve(m, x, method="newton")


# ---- bad input -----------------------------------------------------------------------------------

def test_dtype_mismatch_names_the_tensor():
    m, x, _ = linear_problem()
    with pytest.raises(DTypeError, match=r"x has dtype torch.float32"):
        fpgrad.solve(m, x.float(), z0=torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(DTypeError, match=r"params\['A'\]"):
        fpgrad.solve(m, x.float(), z0=torch.zeros(2, 6, dtype=torch.float32))


def test_integer_state_is_rejected():
    m, x, _ = linear_problem()
    with pytest.raises(DTypeError, match="floating"):
        fpgrad.solve(m, x, z0=torch.zeros(2, 6, dtype=torch.long))


def test_device_mismatch_names_the_tensor():
    m, x, _ = linear_problem()
    with pytest.raises(DeviceError, match="x is on meta"):
        fpgrad.solve(m, x.to("meta"), z0=torch.zeros(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("where", ["x", "z0", "param"])
def test_nan_in_inputs_names_the_tensor(where):
    m, x, _ = linear_problem()
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    if where == "x":
        x = x.clone()
        x[0, 0] = float("nan")
    elif where == "z0":
        z0[1, 2] = float("inf")
    else:
        A = m.params["A"].clone()
        A[0, 0] = float("nan")
        m = fpgrad.maps.linear(A, m.params["B"])
    name = {"x": "x", "z0": "z", "param": r"params\['A'\]"}[where]
    with pytest.raises(NonFiniteError, match=name):
        fpgrad.solve(m, x, z0=z0)


def test_finite_values_whose_sum_overflows_are_not_taken_for_inf():
    # the finiteness checks sum first (a NaN/Inf makes the sum non-finite) and look closer when it is not:
    # huge finite entries that overflow the sum must pass, a real Inf among them must still be named
    from fpgrad._checks import check_finite, check_inputs
    big = torch.full((4, 3), 3e38, dtype=torch.float32)
    check_finite(big, "big")
    check_inputs({"W": big}, torch.zeros(4, 3), big.clone())
    bad = big.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"params\['W'\] contains 0 NaN and 1 Inf"):
        check_inputs({"W": bad}, torch.zeros(4, 3), big.clone())

    def step(params, z, x):               # iterates grow to a fixed point at 3e38: finite, their sum is not
        return torch.clamp(z * 1e3 + 1, max=3e38)

    sol = fpgrad.forward.Iterate(max_iter=40).solve(step, {}, torch.zeros(2, 4), torch.zeros(2, 4))
    assert sol.all_converged and float(sol.z.min()) == pytest.approx(3e38, rel=1e-6)
    assert not bool(torch.isfinite(sol.z.sum(dim=1)).any())


def test_finiteness_checks_record_no_autograd_graph():
    # isfinite on a parameter that requires grad records abs() and saves the parameter: that inflated the
    # bytes-saved figures (fpgrad.gradient's SavedBytes) before the checks detached
    from fpgrad._checks import check_finite, check_inputs
    W = torch.randn(50, 50, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(2, 50, dtype=torch.float64, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        check_inputs({"W": W}, torch.zeros(2, 50, dtype=torch.float64), x)
        check_finite(W, "W")
    assert packed == []


def test_nan_appearing_during_iteration_is_an_error():
    def step(params, z, x):
        return torch.where(z > 3, torch.full_like(z, float("nan")), z + 1)

    with pytest.raises(NonFiniteError, match="iteration"):
        fpgrad.forward.Iterate(max_iter=20).solve(step, {}, torch.zeros(2, 1), torch.zeros(2, 1))


def test_step_that_changes_the_state_shape_is_an_error():
    def step(params, z, x):
        return torch.cat([z, z], dim=-1)

    with pytest.raises(ShapeError, match="changed the state's shape"):
        fpgrad.forward.Iterate().solve(step, {}, torch.zeros(2, 3), torch.zeros(2, 3))


def test_batch_mismatch_between_x_and_z_is_an_error():
    m, x, _ = linear_problem(batch=3)
    with pytest.raises(ShapeError, match="batch"):
        fpgrad.solve(m, x, z0=torch.zeros(2, 6, dtype=torch.float64))


def test_state_with_wrong_rank_is_an_error():
    m, x, _ = linear_problem(batch=3)
    with pytest.raises(ShapeError, match=r"3 dims\), but the map's event_ndim is 1.*event_ndim=2"):
        fpgrad.solve(m, x, z0=torch.zeros(1, 3, 6, dtype=torch.float64))


@cuda
@pytest.mark.parametrize("method", METHODS)
def test_solvers_on_cuda(method):
    m, x, z_star = linear_problem(n=10, batch=3, spectral_radius=0.8)
    A, B = (t.cuda() for t in (m.params["A"], m.params["B"]))
    sol = fpgrad.solve(fpgrad.maps.linear(A, B), x.cuda(), method=method, tol=1e-10, max_iter=500)
    assert sol.z.device.type == "cuda"
    assert torch.allclose(sol.z.cpu(), z_star, atol=1e-8)


def test_no_warning_when_everything_converges():
    m, x, _ = linear_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpgrad.solve(m, x)


def test_a_tolerance_below_float32_round_off_is_named_as_such():
    m = fpgrad.maps.tanh_rnn(n=30, spectral_radius=0.5, seed=0, dtype=torch.float32)
    x = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    with pytest.warns(fpgrad.errors.ConvergenceWarning, match="round-off floor of float32"):
        fp = fpgrad.solve(m, x, torch.zeros(2, 30), method="anderson", tol=1e-12, max_iter=100)
    assert not bool(fp.converged.any())
    assert "not contractive" not in fp.message
