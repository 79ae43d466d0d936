"""Gradient estimators against independent references: closed forms, finite differences, gradcheck,
and the exact identities between estimators."""

from __future__ import annotations

import pytest
import torch
from helpers import contractive_slot_attention, contractive_tanh, cuda, linear_problem
from hypothesis import given
from hypothesis import strategies as st

import fpgrad
from fpgrad.errors import ConvergenceWarning, DivergenceError, NonSymmetricError
from fpgrad.estimators import FiniteDifference, Implicit, Neumann, OneStep, Phantom, Truncated, Unrolled, get_estimator
from fpgrad.forward import Anderson

TIGHT = Anderson(tol=1e-14, max_iter=2000, warn=False)
EXACT_SOLVERS = ["gmres", "bicgstab", "cg_normal", "neumann", "dense"]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def flat_params(g) -> torch.Tensor:
    return g.flat()


def quadratic_loss(target):
    return lambda z: ((z - target) ** 2).sum()


def closed_form_linear(m, x, loss_grad):
    """Implicit gradient of a linear map: u = (I - A^T)^{-1} dL/dz*, dL/dA = u z*^T, dL/dB = u x^T, dL/dx = B^T u."""
    A, B = m.params["A"], m.params["B"]
    n = A.shape[0]
    z = torch.linalg.solve(torch.eye(n, dtype=A.dtype) - A, B @ x.T).T
    g = loss_grad(z)
    u = torch.linalg.solve(torch.eye(n, dtype=A.dtype) - A.T, g.T).T
    return {"A": u.T @ z, "B": u.T @ x}, u @ B


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
@given(n=st.integers(1, 10), batch=st.integers(1, 3), rho=st.floats(0.0, 0.9), seed=st.integers(0, 10_000))
def test_implicit_gradient_of_linear_map_equals_closed_form(solver, n, batch, rho, seed):
    m, x, _ = linear_problem(n=n, p=3, batch=batch, spectral_radius=rho, seed=seed)
    target = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected, expected_x = closed_form_linear(m, x, lambda z: 2 * (z - target))
    g = fpgrad.gradient(m, x, quadratic_loss(target), estimator=Implicit(solver=solver, tol=1e-12), forward=TIGHT)
    for k in ("A", "B"):
        assert rel_error(g.params[k], expected[k]) < 1e-6, k
    assert rel_error(g.x, expected_x) < 1e-6


@pytest.mark.parametrize("estimator", [Implicit(solver=s, tol=1e-12) for s in EXACT_SOLVERS] + [Unrolled(400)],
                         ids=lambda e: f"{e.name}-{getattr(e, 'solver', '')}")
@given(n=st.integers(2, 6), rho=st.floats(0.1, 0.9), seed=st.integers(0, 10_000))
def test_exact_estimators_match_finite_differences_on_tanh_maps(estimator, n, rho, seed):
    m = contractive_tanh(n, rho, seed=seed, input_dim=3)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    target = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
    loss = quadratic_loss(target)
    ref = fpgrad.gradient(m, x, loss, estimator=FiniteDifference())
    g = fpgrad.gradient(m, x, loss, estimator=estimator, forward=TIGHT)
    assert rel_error(flat_params(g), flat_params(ref)) < 1e-6
    assert rel_error(g.x, ref.x) < 1e-6


def test_implicit_matches_gradcheck_through_fixed_point():
    m = fpgrad.maps.tanh_rnn(n=4, spectral_radius=0.8, seed=1, input_dim=2)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    W = m.params["W"].clone().requires_grad_()
    est = Implicit(solver="gmres", tol=1e-13)

    def f(W, x):
        p = {**m.params, "W": W}
        z = fpgrad.fixed_point(m.step, p, x, torch.zeros(3, 4, dtype=torch.float64), forward=TIGHT, backward=est)
        return z
    assert torch.autograd.gradcheck(f, (W, x), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_exact_estimators_match_finite_differences_on_contractive_slot_attention():
    m = contractive_slot_attention(dim=4, num_slots=2, seed=0)
    m = fpgrad.maps.slot_attention(dim=4, num_slots=2, hidden_dim=6, dtype=torch.float64,
                                   params={k: v for k, v in _small_slot_params(m).items()})
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z0 = m.init_state(x, torch.Generator().manual_seed(1))
    target = torch.randn(2, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss = quadratic_loss(target)
    ref = fpgrad.gradient(m, x, loss, estimator=FiniteDifference(), z0=z0)
    for est in [Implicit(solver="gmres", tol=1e-12), Implicit(solver="bicgstab", tol=1e-12),
                Implicit(solver="dense"), Unrolled(300)]:
        g = fpgrad.gradient(m, x, loss, estimator=est, z0=z0, forward=TIGHT)
        keys = [k for k in m.params if not k.startswith("slots_")]   # the fixed point ignores the init
        got = torch.cat([g.params[k].reshape(-1) for k in keys])
        want = torch.cat([ref.params[k].reshape(-1) for k in keys])
        assert rel_error(got, want) < 1e-6, est
        assert rel_error(g.x, ref.x) < 1e-6, est


def _small_slot_params(m):
    """Contractive slot attention parameters with a small MLP (hidden 6) so finite differences stay cheap."""
    g = torch.Generator().manual_seed(5)
    p = fpgrad.maps.init_slot_attention_params(4, 4, 6, generator=g, dtype=torch.float64)
    for k in ("gru.weight_hh", "to_q.weight", "mlp.2.weight"):
        p[k] = p[k] * 0.3
    return p


# ---- exact identities between estimators -----------------------------------------------------------

@given(k=st.integers(0, 8), seed=st.integers(0, 1000), rho=st.floats(0.1, 0.95))
def test_neumann_k_equals_backprop_through_k_plus_one_steps_from_z_star(k, seed, rho):
    m = contractive_tanh(6, rho, seed=seed)
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    loss = quadratic_loss(torch.ones(2, 6, dtype=torch.float64))
    a = fpgrad.gradient(m, x, loss, estimator=Neumann(k), forward=TIGHT)
    b = fpgrad.gradient(m, x, loss, estimator=Truncated(k + 1), forward=TIGHT)
    assert rel_error(a.flat(), b.flat()) < 1e-10
    assert rel_error(a.x, b.x) < 1e-10
    assert a.cost.vjps == k + 1


def test_one_step_equals_neumann_zero():
    m = contractive_slot_attention(dim=6, num_slots=3)
    x = torch.randn(2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = quadratic_loss(torch.zeros(2, 3, 6, dtype=torch.float64))
    z0 = m.init_state(x, torch.Generator().manual_seed(0))
    a = fpgrad.gradient(m, x, loss, estimator=OneStep(), z0=z0, forward=TIGHT)
    b = fpgrad.gradient(m, x, loss, estimator=Neumann(0), z0=z0, forward=TIGHT)
    keys = [k for k in m.params if not k.startswith("slots_")]
    for key in keys:
        assert torch.allclose(a.params[key], b.params[key], rtol=1e-9, atol=1e-12), key
    assert torch.allclose(a.x, b.x, rtol=1e-9, atol=1e-12)


@given(T=st.integers(1, 30), seed=st.integers(0, 1000))
def test_truncated_T_of_T_equals_unrolled_T(T, seed):
    m = fpgrad.maps.tanh_rnn(n=5, spectral_radius=0.9, seed=seed)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    loss = quadratic_loss(torch.ones(3, 5, dtype=torch.float64))
    a = fpgrad.gradient(m, x, loss, estimator=Truncated(T, T=T))
    b = fpgrad.gradient(m, x, loss, estimator=Unrolled(T))
    assert torch.equal(a.flat(), b.flat()) and torch.equal(a.x, b.x)


def test_truncated_k_of_T_equals_unrolled_with_detached_prefix():
    m = fpgrad.maps.tanh_rnn(n=5, spectral_radius=0.9, seed=0)
    x = torch.randn(2, 5, dtype=torch.float64)
    params = {k: v.clone().requires_grad_() for k, v in m.params.items()}
    z = torch.zeros(2, 5, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(7):
            z = m.step(params, z, x)
    for _ in range(3):
        z = m.step(params, z, x)
    (z ** 2).sum().backward()
    g = fpgrad.gradient(m, x, lambda z: (z ** 2).sum(), estimator=Truncated(3, T=10))
    for k in params:
        assert torch.allclose(g.params[k], params[k].grad, rtol=1e-12, atol=1e-14)


@given(k=st.integers(1, 8), tau=st.floats(0.1, 1.0), seed=st.integers(0, 1000))
def test_phantom_equals_backprop_through_damped_steps_from_z_star(k, tau, seed):
    m = fpgrad.maps.tanh_rnn(n=6, spectral_radius=0.8, seed=seed)
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    loss = quadratic_loss(torch.ones(2, 6, dtype=torch.float64))
    a = fpgrad.gradient(m, x, loss, estimator=Phantom(k, tau), forward=TIGHT)
    b = fpgrad.gradient(m, x, loss, estimator=Truncated(k, damping=1.0 - tau), forward=TIGHT)
    assert rel_error(a.flat(), b.flat()) < 1e-9


@given(rho=st.floats(0.3, 0.9), seed=st.integers(0, 1000))
def test_neumann_converges_to_implicit_as_k_grows(rho, seed):
    m = contractive_tanh(8, rho, seed=seed)
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    loss = quadratic_loss(torch.ones(2, 8, dtype=torch.float64))
    exact = fpgrad.gradient(m, x, loss, estimator=Implicit(solver="dense"), forward=TIGHT).flat()
    errors = [rel_error(fpgrad.gradient(m, x, loss, estimator=Neumann(k), forward=TIGHT).flat(), exact)
              for k in (0, 5, 40)]
    assert errors[2] < errors[0] and errors[2] < 1e-3


# ---- the one-step gradient and the slot initialisation ---------------------------------------------

def test_one_step_gives_init_params_zero_gradient_and_straight_through_does_not():
    m = contractive_slot_attention(dim=4, num_slots=2)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = quadratic_loss(torch.zeros(2, 2, 4, dtype=torch.float64))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = fpgrad.gradient(m, x, loss, estimator=OneStep(), generator=gen())
    st_ = fpgrad.gradient(m, x, loss, estimator=OneStep(straight_through=True), generator=gen())
    assert plain.params["slots_mu"].abs().max() == 0 and plain.params["slots_log_sigma"].abs().max() == 0
    assert st_.params["slots_mu"].abs().max() > 0 and st_.params["slots_log_sigma"].abs().max() > 0
    # straight-through passes dL/d(step input) unchanged to z0: dL/dmu = sum over batch and slots
    z0 = m.init_state(x, gen())
    zs = fpgrad.solve(m, x, z0=z0, method=TIGHT).z.requires_grad_()
    loss(m.step(m.params, zs, x)).backward()
    assert torch.allclose(st_.params["slots_mu"].reshape(-1), zs.grad.sum(dim=(0, 1)), rtol=1e-8)
    for k in m.params:
        if not k.startswith("slots_"):
            assert torch.allclose(plain.params[k], st_.params[k]), k


# ---- failures are reported, never silent ----------------------------------------------------------

def _expanding_linear(rho=1.2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.diag(torch.linspace(-rho, rho * 0.5, n, dtype=torch.float64))
    Q = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = Q @ A @ torch.linalg.inv(Q)
    B = torch.randn(n, 2, generator=g, dtype=torch.float64)
    m = fpgrad.maps.linear(A, B)
    x = torch.randn(2, 2, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, B @ x.T).T
    return m, x, z_star


def test_neumann_solver_with_spectral_radius_above_one_is_reported_divergent():
    m, x, z_star = _expanding_linear()
    with pytest.raises(DivergenceError, match="spectral radius"):
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Implicit(solver="neumann", max_iter=500), z0=z_star,
                        forward=TIGHT)


def test_neumann_estimator_with_spectral_radius_above_one_is_reported_divergent():
    m, x, z_star = _expanding_linear(rho=1.5)
    with pytest.raises(DivergenceError, match="diverges"):
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Neumann(60), z0=z_star, forward=TIGHT)
    with pytest.warns(ConvergenceWarning, match="not shrinking"):
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Neumann(5), z0=z_star, forward=TIGHT)


# non-normal random A can make the first powers grow (rho < 1): the series then warns, which is not tested here
@pytest.mark.filterwarnings("ignore::fpgrad.errors.ConvergenceWarning")
@given(k=st.integers(0, 6), n=st.integers(1, 8), batch=st.integers(1, 3), rho=st.floats(0.0, 0.95),
       tau=st.sampled_from([None, 0.3, 1.0]), seed=st.integers(0, 10_000))
def test_truncated_series_report_their_residual_in_the_adjoint_system(k, n, batch, rho, tau, seed):
    # closed form for a linear map: Neumann(k) leaves g - (I - A^T) u = (A^T)^{k+1} g, Phantom(k, tau) leaves
    # M^k g with M = (1 - tau) I + tau A^T; measured by the pullback's VJP, so the product count is unchanged
    m, x, _ = linear_problem(n=n, p=3, batch=batch, spectral_radius=rho, seed=seed)
    target = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    A = m.params["A"]
    if tau is None:
        est, M, power, vjps = Neumann(k), A.T, k + 1, k + 1
    else:
        est = Phantom(k + 1, tau)
        M, power, vjps = (1 - tau) * torch.eye(n, dtype=A.dtype) + tau * A.T, k + 1, k + 1
    g = fpgrad.gradient(m, x, quadratic_loss(target), estimator=est, forward=TIGHT)
    gz = 2 * (g.z - target)
    left = gz.T
    for _ in range(power):
        left = M @ left
    expected = left.norm(dim=0) / gz.norm(dim=1)
    assert g.series is not None and g.series.residual.shape == (batch,)
    assert torch.allclose(g.series.residual, expected, rtol=1e-8, atol=1e-13)
    assert torch.equal(g.series.solved, expected <= g.series.tol)
    assert g.cost.vjps == vjps
    assert g.solve is None


def test_truncated_series_warn_when_they_leave_more_residual_than_zero():
    m, x, z_star = _expanding_linear(rho=1.2)
    with pytest.warns(ConvergenceWarning, match="more than u = 0"):
        g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Neumann(0), z0=z_star, forward=TIGHT)
    assert float(g.series.residual.max()) > 1.0 and not bool(g.series.solved.any())
    assert "not a solution" in g.series.message


def test_truncated_series_residual_under_vmap_matches_a_loop():
    # vmap(grad(fixed_point)) solves the vmapped slices as one batch: their residuals are the loop's
    m = contractive_tanh(5, 0.8, seed=3)
    xs = torch.randn(4, 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = dict(m.params)

    def loss(p, x, record):
        z = fpgrad.fixed_point(m.step, p, x, torch.zeros(1, 5, dtype=torch.float64), forward=TIGHT,
                               backward=Neumann(2), record=record)
        return (z ** 2).sum()

    batched = fpgrad.estimators.CostRecord()
    torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(params, xs, batched)
    looped = []
    for i in range(4):
        record = fpgrad.estimators.CostRecord()
        torch.func.grad(loss)(params, xs[i], record)
        looped.append(record.series[-1].residual)
    assert len(batched.series) == 1
    assert torch.allclose(batched.series[-1].residual, torch.cat(looped), rtol=1e-9)


@pytest.mark.parametrize("solver", ["gmres", "bicgstab", "cg_normal", "dense"])
def test_krylov_solvers_still_give_the_exact_gradient_when_rho_exceeds_one(solver):
    m, x, z_star = _expanding_linear()
    expected, _ = closed_form_linear(m, x, lambda z: torch.ones_like(z))
    g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Implicit(solver=solver, tol=1e-12), z0=z_star,
                        forward=TIGHT)
    assert rel_error(g.params["A"], expected["A"]) < 1e-6


def test_cg_solves_symmetric_systems_and_refuses_nonsymmetric_ones():
    m = fpgrad.maps.gradient_step(n=8, spectral_radius=0.9, seed=0)
    x = torch.randn(2, 8, dtype=torch.float64)
    loss = quadratic_loss(torch.ones(2, 8, dtype=torch.float64))
    exact = fpgrad.gradient(m, x, loss, estimator=Implicit(solver="dense"), forward=TIGHT)
    cg = fpgrad.gradient(m, x, loss, estimator=Implicit(solver="cg", tol=1e-12), forward=TIGHT)
    assert rel_error(cg.flat(), exact.flat()) < 1e-8
    t = fpgrad.maps.tanh_rnn(n=8, spectral_radius=0.9, seed=0)
    with pytest.raises(NonSymmetricError, match="cg_normal"):
        fpgrad.gradient(t, x, loss, estimator=Implicit(solver="cg"), forward=TIGHT)


def test_implicit_records_its_linear_solve_and_cost():
    m, x, _ = linear_problem(n=6, batch=2, spectral_radius=0.7)
    g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Implicit(solver="gmres", tol=1e-10))
    assert g.solve is not None and bool(g.solve.converged.all())
    assert g.cost.vjps == g.solve.matvecs + 1          # the solve's VJPs plus the final pullback
    assert g.forward is not None and g.cost.forward_steps == g.forward.evaluations


def test_cg_normal_counts_jvps():
    m, x, _ = linear_problem(n=6, batch=2, spectral_radius=0.7)
    g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Implicit(solver="cg_normal", tol=1e-10))
    assert g.cost.jvps > 0 and g.cost.jvps == g.solve.rmatvecs


def test_unknown_estimator_name_lists_the_choices():
    with pytest.raises(ValueError, match="neumann-K"):
        get_estimator("magic")
    with pytest.raises(ValueError, match="gmres"):
        Implicit(solver="lsqr")


@pytest.mark.parametrize("name,expected", [("one_step", OneStep()), ("one-step-st", OneStep(straight_through=True)),
                                           ("neumann-3", Neumann(3)), ("phantom-4-0.3", Phantom(4, 0.3)),
                                           ("implicit-bicgstab", Implicit(solver="bicgstab")),
                                           ("truncated-2", Truncated(2, T=5)), ("unrolled", Unrolled(5))])
def test_estimators_by_name(name, expected):
    assert get_estimator(name, iters=5) == expected


def test_loss_must_be_scalar():
    m, x, _ = linear_problem()
    with pytest.raises(fpgrad.errors.ShapeError, match="scalar"):
        fpgrad.gradient(m, x, lambda z: z, estimator=OneStep())


@cuda
@pytest.mark.parametrize("estimator", [Implicit(solver="gmres", tol=1e-10), OneStep(), Neumann(5), Unrolled(50)],
                         ids=lambda e: e.name)
def test_estimators_on_cuda(estimator):
    m, x, _ = linear_problem(n=6, batch=2, spectral_radius=0.5)
    cpu = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=estimator)
    mc = fpgrad.maps.linear(m.params["A"].cuda(), m.params["B"].cuda())
    gpu = fpgrad.gradient(mc, x.cuda(), lambda z: z.sum(), estimator=estimator)
    assert gpu.params["A"].device.type == "cuda"
    assert torch.allclose(gpu.params["A"].cpu(), cpu.params["A"], atol=1e-8)


@pytest.mark.parametrize("estimator", [Implicit(solver="gmres"), Neumann(3), Phantom(3, 0.5)], ids=lambda e: e.name)
def test_adjoint_estimators_warn_when_the_state_is_not_a_fixed_point(estimator):
    m = contractive_tanh(6, 0.9, seed=0)
    x = torch.randn(2, 6, dtype=torch.float64)
    early = fpgrad.forward.Iterate(tol=0.0, max_iter=2, warn=False)          # stopped long before z*
    with pytest.warns(ConvergenceWarning, match="not a fixed point"):
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=estimator, forward=early)


def test_no_fixed_point_warning_at_a_converged_state():
    import warnings
    m = contractive_tanh(6, 0.9, seed=0)
    x = torch.randn(2, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Implicit(solver="gmres"), forward=TIGHT)


def test_compare_estimators_rows_carry_error_cost_and_adjoint_residual():
    from fpgrad.compare import compare_estimators
    m, x, _ = linear_problem(n=6, batch=2, spectral_radius=0.6, seed=5)
    target = torch.ones(2, 6, dtype=torch.float64)
    expected, _ = closed_form_linear(m, x, lambda z: 2 * (z - target))
    exact = torch.cat([expected[k].reshape(-1) for k in sorted(expected)])
    rows = compare_estimators(m, x, quadratic_loss(target), [Implicit(tol=1e-12), Neumann(3), OneStep()],
                              forward=TIGHT)
    by = {r["estimator"]: r for r in rows}
    implicit, neumann, one_step = (by[k] for k in ("Implicit(gmres, tol=1e-12)", "Neumann(3)", "OneStep"))
    assert implicit["relative_error"] < 1e-9 and implicit["adjoint_residual"] <= 1e-12 and implicit["converged"]
    g = fpgrad.gradient(m, x, quadratic_loss(target), estimator=Neumann(3), forward=TIGHT)
    assert neumann["relative_error"] == pytest.approx(rel_error(g.flat(), exact), rel=1e-6)
    assert neumann["adjoint_residual"] == pytest.approx(float(g.series.residual.max()), rel=1e-9)
    assert 0 < neumann["adjoint_residual"] < 1 and neumann["vjps"] == 4
    assert one_step["adjoint_residual"] != one_step["adjoint_residual"]        # NaN: no adjoint formed


def test_not_a_fixed_point_names_the_module_knob():
    from fpgrad.nn import ImplicitSlotAttention
    layer = ImplicitSlotAttention(8, 3, iters=2, backward="implicit", seed=0).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    slots = layer(x, noise=torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.warns(ConvergenceWarning, match="ImplicitSlotAttention's iters / tol"):
        slots.sum().backward()
