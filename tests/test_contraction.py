"""Contraction-control penalties: Hutchinson Frobenius, warm-started spectral penalty, fixed-point correction."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from contraction_helpers import dense_jacobians, tanh_with_spectrum
from hypothesis import given, settings
from hypothesis import strategies as st

import fpgrad
from fpgrad.contraction import (
    ProductCount,
    SpectralState,
    correction_weights,
    dense_radius,
    draw_probes,
    fixed_point_correction,
    frobenius_exact,
    frobenius_penalty,
    spectral_estimate,
    spectral_penalty,
)
from fpgrad.errors import ShapeError

HAVE_TORCHDEQ = importlib.util.find_spec("torchdeq") is not None


@pytest.fixture(scope="module")
def tanh_map():
    m = fpgrad.maps.tanh_rnn(6, 0.9, seed=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    z = fpgrad.solve(m, x, tol=1e-12, max_iter=1000).z
    return m, x, z


def _leaf_params(m):
    return {k: v.detach().clone().requires_grad_(True) for k, v in m.params.items()}


# ---- Frobenius --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["vjp", "jvp"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_frobenius_estimate_matches_exact_within_its_standard_error(tanh_map, form, distribution):
    m, x, z = tanh_map
    P = 600
    g = torch.Generator().manual_seed(7)
    est = frobenius_penalty(m.step, m.params, z, x, probes=P, generator=g, form=form, distribution=distribution,
                            reduction="none")
    J = dense_jacobians(m, x, z)
    exact = J.pow(2).sum(dim=(1, 2)) / 6
    assert torch.allclose(exact, frobenius_exact(m.step, m.params, z, x), rtol=1e-12)
    # the per-probe variance, from the dense J and fresh probes of the same distribution
    V = draw_probes((P, 3, 6), torch.Generator().manual_seed(8), torch.float64, "cpu", distribution)
    M = J if form == "jvp" else J.mT
    q = torch.einsum("bij,pbj->pbi", M, V).pow(2).sum(-1) / 6              # [P, B]
    stderr = q.std(0) / P ** 0.5
    assert ((est - exact).abs() < 5 * stderr).all(), (est, exact, stderr)


@pytest.mark.parametrize("form", ["vjp", "jvp"])
def test_frobenius_with_fixed_probes_is_the_dense_quadratic_form(tanh_map, form):
    m, x, z = tanh_map
    V = draw_probes((4, 3, 6), torch.Generator().manual_seed(0), torch.float64, "cpu")
    est = frobenius_penalty(m.step, m.params, z, x, vectors=V, form=form, reduction="none")
    J = dense_jacobians(m, x, z)
    M = J if form == "jvp" else J.mT
    ref = torch.einsum("bij,pbj->pbi", M, V).pow(2).sum(-1).mean(0) / 6
    assert torch.allclose(est, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", ["vjp", "jvp"])
def test_frobenius_gradient_with_fixed_probes_matches_finite_differences(tanh_map, form):
    m, x, z = tanh_map
    V = draw_probes((2, 3, 6), torch.Generator().manual_seed(2), torch.float64, "cpu")
    params = _leaf_params(m)
    value = frobenius_penalty(m.step, params, z, x, vectors=V, form=form)
    grads = torch.autograd.grad(value, list(params.values()))
    h = 1e-6
    for (k, p), gk in zip(params.items(), grads):
        direction = torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        def f(t, k=k, direction=direction):
            q = {kk: vv.detach() for kk, vv in params.items()}
            q[k] = q[k] + t * direction
            return float(frobenius_penalty(m.step, q, z, x, vectors=V, form=form))
        fd = (f(h) - f(-h)) / (2 * h)
        assert abs(float((gk * direction).sum()) - fd) <= 1e-6 * max(1.0, abs(fd)), (k, fd)


def test_frobenius_gradient_in_expectation_matches_finite_differences_of_the_exact_norm(tanh_map):
    m, x, z = tanh_map
    params = _leaf_params(m)
    g = torch.Generator().manual_seed(11)
    groups = []
    for _ in range(8):
        value = frobenius_penalty(m.step, params, z, x, probes=200, generator=g)
        groups.append(torch.autograd.grad(value, params["W"])[0])
    G = torch.stack(groups)
    mean, stderr = G.mean(0), G.std(0) / 8 ** 0.5
    h = 1e-6
    fd = torch.zeros_like(mean)
    W0 = params["W"].detach()
    for i in range(6):
        for j in range(6):
            E = torch.zeros_like(W0)
            E[i, j] = h
            q = {k: v.detach() for k, v in params.items()}
            plus = frobenius_exact(m.step, {**q, "W": W0 + E}, z, x).mean()
            minus = frobenius_exact(m.step, {**q, "W": W0 - E}, z, x).mean()
            fd[i, j] = (plus - minus) / (2 * h)
    # the exact norm's autograd gradient is the finite difference (a check of the reference itself)
    exact_grad = torch.autograd.grad(frobenius_exact(m.step, params, z, x).mean(), params["W"])[0]
    assert torch.allclose(exact_grad, fd, atol=1e-7)
    assert ((mean - fd).abs() <= 5 * stderr + 1e-9).all()


def test_frobenius_probes_reproduce_with_the_generator_seed(tanh_map):
    m, x, z = tanh_map
    a = frobenius_penalty(m.step, m.params, z, x, probes=3, generator=torch.Generator().manual_seed(4))
    b = frobenius_penalty(m.step, m.params, z, x, probes=3, generator=torch.Generator().manual_seed(4))
    c = frobenius_penalty(m.step, m.params, z, x, probes=3, generator=torch.Generator().manual_seed(5))
    assert float(a) == float(b)
    assert float(a) != float(c)


def test_frobenius_counts_one_product_per_probe(tanh_map):
    m, x, z = tanh_map
    count = ProductCount()
    frobenius_penalty(m.step, m.params, z, x, probes=3, generator=torch.Generator(), form="vjp", counter=count)
    frobenius_penalty(m.step, m.params, z, x, probes=2, generator=torch.Generator(), form="jvp", counter=count)
    assert (count.vjps, count.jvps) == (3, 2)


def test_frobenius_under_vmap_gives_the_per_sample_values(tanh_map):
    m, x, z = tanh_map
    V = draw_probes((2, 3, 6), torch.Generator().manual_seed(0), torch.float64, "cpu")
    batched = frobenius_penalty(m.step, m.params, z, x, vectors=V, reduction="none")
    for form in ("vjp", "jvp"):
        per = torch.func.vmap(lambda zz, xx, vv, form=form: frobenius_penalty(m.step, m.params, zz, xx, vectors=vv,
                                                                              form=form),
                              in_dims=(0, 0, 1))(z, x, V)
        assert torch.allclose(per, batched, rtol=1e-12) if form == "vjp" else per.shape == batched.shape


def test_frobenius_rejects_bad_arguments_with_named_fixes(tanh_map):
    m, x, z = tanh_map
    with pytest.raises(ValueError, match="form"):
        frobenius_penalty(m.step, m.params, z, x, form="double")
    with pytest.raises(ShapeError, match="vectors"):
        frobenius_penalty(m.step, m.params, z, x, vectors=torch.ones(2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        frobenius_penalty(m.step, m.params, z, x, reduction="max")


@pytest.mark.skipif(not HAVE_TORCHDEQ, reason="torchdeq (the bench extra) is not installed")
def test_frobenius_equals_torchdeq_jac_reg_with_the_same_gaussian_probes(tanh_map):
    from torchdeq.loss import jac_reg
    m, x, z = tanh_map
    z0 = z.detach().clone().requires_grad_(True)
    f0 = m.step(m.params, z0, x)
    torch.manual_seed(123)
    peer = jac_reg(f0, z0, vecs=3)
    torch.manual_seed(123)
    V = torch.stack([torch.randn(*z0.shape).to(z0) for _ in range(3)])
    ours = frobenius_penalty(m.step, m.params, z, x, vectors=V, form="vjp")
    assert abs(float(ours) - float(peer)) <= 1e-12 * abs(float(peer))


# ---- spectral ---------------------------------------------------------------------------------------------

SPECTRA = {
    "real dominant": dict(eigs=[0.8, -0.55], n=7, seed=0),
    "negative dominant": dict(eigs=[-0.85, 0.5], n=6, seed=1),
    "complex dominant": dict(eigs=[0.4], n=6, seed=2, rotation=(0.8, 1.1)),
    "real dominant then complex pair": dict(eigs=[0.9], n=8, seed=3, rotation=(0.6, 0.7)),
}


@pytest.mark.parametrize("case", list(SPECTRA))
@pytest.mark.parametrize("form", ["jvp", "vjp"])
def test_spectral_radius_estimate_matches_dense_eigenvalues(case, form):
    m, x, z = tanh_with_spectrum(**SPECTRA[case])
    J = dense_jacobians(m, x, z)
    rho = torch.linalg.eigvals(J).abs().amax(-1)
    est = spectral_estimate(m.step, m.params, z, x, kind="radius", iters=150, form=form,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est.value, rho, rtol=1e-7), (est.value, rho)
    assert (est.residual < 1e-6).all()
    assert torch.allclose(dense_radius(m.step, m.params, z, x), rho, rtol=1e-12)


@pytest.mark.parametrize("form", ["jvp", "vjp"])
def test_spectral_norm_estimate_matches_dense_singular_values(form):
    m, x, z = tanh_with_spectrum(**SPECTRA["complex dominant"])
    sigma = torch.linalg.matrix_norm(dense_jacobians(m, x, z), ord=2)
    est = spectral_estimate(m.step, m.params, z, x, kind="norm", iters=150, form=form,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est.value, sigma, rtol=1e-9)
    assert (est.residual < 1e-6).all()


def _fd_of_dense(m, x, z, params, key, direction, kind, h=1e-6):
    def f(t):
        q = {k: v.detach() for k, v in params.items()}
        q[key] = q[key] + t * direction
        return dense_radius(m.step, q, z, x, kind=kind)
    return (f(h) - f(-h)) / (2 * h)


@pytest.mark.parametrize("kind,form", [("radius", "jvp"), ("radius", "vjp"), ("norm", "jvp"), ("norm", "vjp")])
@pytest.mark.parametrize("case", ["real dominant", "negative dominant", "complex dominant"])
def test_spectral_estimate_gradient_matches_finite_differences_of_the_dense_value(kind, form, case):
    m, x, z = tanh_with_spectrum(**SPECTRA[case])
    params = _leaf_params(m)
    est = spectral_estimate(m.step, params, z, x, kind=kind, iters=150, form=form,
                            generator=torch.Generator().manual_seed(0))
    for key in ("W", "U"):
        direction = torch.randn(params[key].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        grads = [torch.autograd.grad(est.value[b], params[key], retain_graph=True)[0] for b in range(3)]
        ad = torch.stack([(gb * direction).sum() for gb in grads])
        fd = _fd_of_dense(m, x, z, params, key, direction, kind)
        assert torch.allclose(ad, fd, rtol=1e-5, atol=1e-8), (key, ad, fd)


@pytest.mark.parametrize("case", list(SPECTRA))
def test_a_krylov_start_of_n_steps_finds_the_dense_radius_and_its_gradient(case):
    m, x, z = tanh_with_spectrum(**SPECTRA[case])
    n = z.shape[1]
    params = _leaf_params(m)
    count = ProductCount()
    est = spectral_estimate(m.step, params, z, x, iters=1, krylov=n, generator=torch.Generator().manual_seed(0),
                            counter=count)
    rho = torch.linalg.eigvals(dense_jacobians(m, x, z)).abs().amax(-1)
    torch.testing.assert_close(est.value.detach(), rho, rtol=1e-9, atol=0)       # the Krylov space is all of R^n
    assert count.jvps == n + 2 + 2 and count.vjps == n + 2                        # Arnoldi + one power step + tape
    direction = torch.randn(params["W"].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ad = torch.stack([(torch.autograd.grad(est.value[b], params["W"], retain_graph=True)[0] * direction).sum()
                      for b in range(z.shape[0])])
    torch.testing.assert_close(ad, _fd_of_dense(m, x, z, params, "W", direction, "radius"), rtol=1e-5, atol=1e-8)


def _nonnormal_batch(n, B=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, n, generator=g, dtype=torch.float64) / n ** 0.5
    A = A + 0.5 * torch.triu(torch.randn(B, n, n, generator=g, dtype=torch.float64), 1) / n ** 0.5

    def step(params, z, x):                      # z -> s A_b z, the matrix per sample through x
        return params["s"] * torch.einsum("...ij,...j->...i", x, z)
    return step, {"s": torch.ones((), dtype=torch.float64)}, A, torch.linalg.eigvals(A).abs().amax(-1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 10), B=st.integers(1, 4), seed=st.integers(0, 10_000), scale=st.floats(0.1, 3.0))
def test_krylov_of_n_steps_is_exact_on_any_linear_map(n, B, seed, scale):
    step, params, A, rho = _nonnormal_batch(n, B, seed)
    est = spectral_estimate(step, {"s": params["s"] * scale}, torch.zeros(B, n, dtype=torch.float64), A, iters=1,
                            krylov=n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(est.value, scale * rho, rtol=1e-7, atol=1e-12)


def test_a_krylov_start_sees_more_of_rho_than_power_steps_for_the_same_products():
    step, params, A, rho = _nonnormal_batch(60)
    z = torch.zeros(A.shape[0], 60, dtype=torch.float64)

    def ratios(**kw):
        count = ProductCount()
        value = spectral_estimate(step, params, z, A, generator=torch.Generator().manual_seed(2), counter=count,
                                  **kw).value
        return value / rho, count.vjps + count.jvps
    power, power_products = ratios(iters=9)
    krylov, krylov_products = ratios(iters=1, krylov=16)
    assert krylov_products == 38 == power_products
    # measured: power steps median 0.39 (min 0.03); 16 Arnoldi steps median 0.98 (min 0.85)
    assert krylov.median() > 0.95 and krylov.min() > 0.8 and power.median() < 0.6, (krylov, power)


def test_a_krylov_start_runs_under_vmap_with_the_per_sample_values(tanh_map):
    m, x, z = tanh_map
    g = torch.Generator().manual_seed(5)
    right, left = (torch.randn(3, 6, 2, generator=g, dtype=torch.float64) for _ in range(2))

    def one(zz, xx, r, u):
        return spectral_estimate(m.step, m.params, zz, xx, iters=1, krylov=4, right=r, left=u, batched=False).value
    looped = spectral_estimate(m.step, m.params, z, x, iters=1, krylov=4, right=right, left=left).value
    torch.testing.assert_close(torch.func.vmap(one)(z, x, right, left), looped)


def test_krylov_is_refused_where_it_does_not_apply(tanh_map):
    m, x, z = tanh_map
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="krylov"):
            spectral_estimate(m.step, m.params, z, x, krylov=bad)
    with pytest.raises(ValueError, match="kind='radius'"):
        spectral_estimate(m.step, m.params, z, x, kind="norm", krylov=4)


def test_spectral_penalty_passes_krylov_and_starts_it_from_the_stored_vectors(tanh_map):
    m, x, z = tanh_map
    state = SpectralState(generator=torch.Generator().manual_seed(0), cold_iters=3)
    spectral_penalty(m.step, m.params, z, x, state=state, target=0.0)
    right, left = state.right.clone(), state.left.clone()
    with_state = spectral_penalty(m.step, m.params, z, x, state=state, target=0.0, iters=1, krylov=6,
                                  reduction="none")
    direct = spectral_estimate(m.step, m.params, z, x, iters=1, krylov=6, right=right, left=left).value
    torch.testing.assert_close(with_state, direct, rtol=0, atol=0)
    torch.testing.assert_close(with_state, dense_radius(m.step, m.params, z, x), rtol=1e-9, atol=0)


def test_warm_start_with_two_steps_is_as_accurate_as_a_cold_start_with_many_more():
    # a slow power iteration (sample 0: |lambda| 0.896, 0.837, 0.756): cold starts need many steps
    m, x, z = tanh_with_spectrum(eigs=[0.9, -0.85, 0.81, 0.78], n=10, seed=4)
    params = {k: v.detach() for k, v in m.params.items()}
    state = SpectralState(generator=torch.Generator().manual_seed(0), cold_iters=100)
    spectral_penalty(m.step, params, z, x, state=state, target=0.0)            # converged vectors
    # one training-like step: every parameter moves by 0.1% of its rms (an Adam step at lr 1e-3), z* with them
    g = torch.Generator().manual_seed(1)
    moved = {k: v + 1e-3 * v.norm() / v.numel() ** 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype)
             for k, v in params.items()}
    m2 = m.with_params(moved)
    z2 = fpgrad.solve(m2, x, z0=z, tol=1e-13, max_iter=2000).z
    rho = dense_radius(m2.step, moved, z2, x)
    warm_count = ProductCount()
    warm = spectral_penalty(m2.step, moved, z2, x, state=state, target=0.0, iters=2, counter=warm_count,
                            reduction="none")
    errors, products = {}, {}
    for iters in (10, 20):
        count = ProductCount()
        cold = spectral_estimate(m2.step, moved, z2, x, iters=iters, generator=torch.Generator().manual_seed(3),
                                 counter=count).value
        errors[iters] = float(((cold - rho).abs() / rho).max())
        products[iters] = count.vjps + count.jvps
    warm_err = float(((warm - rho).abs() / rho).max())
    assert warm_count.vjps + warm_count.jvps == 10 and products == {10: 42, 20: 82}
    # measured: warm 5.3e-6 (10 products); cold 0.16 (42 products), 7.7e-6 (82 products)
    assert warm_err < 1e-5, warm_err
    assert warm_err < errors[20] and errors[10] > 1e3 * warm_err, (warm_err, errors)


def test_spectral_penalty_is_the_hinge_of_the_estimate(tanh_map):
    m, x, z = tanh_map
    est = spectral_estimate(m.step, m.params, z, x, iters=100, generator=torch.Generator().manual_seed(0))
    rho = est.value
    target = float(rho.mean())
    kw = dict(iters=100, generator=torch.Generator().manual_seed(0), reduction="none")
    p = spectral_penalty(m.step, m.params, z, x, target=target, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    p2 = spectral_penalty(m.step, m.params, z, x, target=target, squared=True, **kw)
    assert torch.allclose(p, torch.relu(rho - target), atol=1e-12)
    assert torch.allclose(p2, torch.relu(rho - target) ** 2, atol=1e-12)
    assert (p == 0).any() and (p > 0).any()


def test_smooth_spectral_penalty_is_the_huber_hinge_with_a_continuous_bounded_gradient(tanh_map):
    m, x, z = tanh_map
    est = spectral_estimate(m.step, m.params, z, x, iters=100, generator=torch.Generator().manual_seed(0))
    rho, d = est.value, 0.05
    for target in (float(rho.min()) - 0.2, float(rho.mean()), float(rho.max()) - 0.01):
        p = spectral_penalty(m.step, m.params, z, x, target=target, smooth=d, iters=100,
                             generator=torch.Generator().manual_seed(0), reduction="none")
        e = torch.relu(rho - target)
        expected = torch.where(e < d, e ** 2 / (2 * d), e - d / 2)
        assert torch.allclose(p, expected, atol=1e-12)
    # beyond the width its gradient in the parameters is the plain hinge's (bounded by the weight, not growing
    # with the excess as the squared hinge's does); inside it, e / d times that
    params = _leaf_params(m)
    low = float(rho.min()) - 2.0                   # every excess >= 2: far beyond the width

    def grads(target, **kw):
        pen = spectral_penalty(m.step, params, z, x, target=target, iters=100,
                               generator=torch.Generator().manual_seed(0), **kw)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(pen, list(params.values()))])
    torch.testing.assert_close(grads(low, smooth=d), grads(low), rtol=1e-9, atol=1e-12)
    assert float(grads(low, squared=True).norm()) > 3 * float(grads(low).norm())    # 2 e >= 4 times
    with pytest.raises(ValueError, match="smooth"):
        spectral_penalty(m.step, m.params, z, x, target=0.5, smooth=0.1, squared=True)


def test_spectral_penalty_below_target_has_zero_gradient(tanh_map):
    m, x, z = tanh_map
    params = _leaf_params(m)
    p = spectral_penalty(m.step, params, z, x, target=5.0, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(p, list(params.values()), allow_unused=True)
    assert float(p) == 0.0
    assert all(g_ is None or float(g_.abs().max()) == 0.0 for g_ in grads)


def test_spectral_state_keeps_vectors_counts_products_and_serves_a_smaller_batch(tanh_map):
    m, x, z = tanh_map
    state = SpectralState(generator=torch.Generator().manual_seed(0), cold_iters=5)
    spectral_penalty(m.step, m.params, z, x, state=state, iters=2)
    assert state.right.shape == (3, 6, 2) and state.left.shape == (3, 6, 2)
    assert (state.products.vjps, state.products.jvps) == (10, 12)             # 5 cold steps + 2 on the tape
    spectral_penalty(m.step, m.params, z[:2], x[:2], state=state, iters=2)
    assert state.calls == 2 and state.right.shape[0] == 2
    assert (state.products.vjps, state.products.jvps) == (14, 18)             # + 2 warm steps + 2


def test_spectral_penalty_under_vmap_gives_the_per_sample_penalties(tanh_map):
    m, x, z = tanh_map
    g = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(3, 6, 2, generator=g, dtype=torch.float64))[0]
    L = torch.linalg.qr(torch.randn(3, 6, 2, generator=g, dtype=torch.float64))[0]
    batched = spectral_penalty(m.step, m.params, z, x, target=0.1, right=R, left=L, iters=3, reduction="none")
    per = torch.func.vmap(lambda zz, xx, r, l_: spectral_penalty(m.step, m.params, zz, xx, target=0.1, right=r,
                                                                 left=l_, iters=3))(z, x, R, L)
    assert torch.allclose(per, batched, rtol=1e-10)
    with pytest.raises(ValueError, match="right= / left="):
        torch.func.vmap(lambda zz, xx: spectral_penalty(m.step, m.params, zz, xx, state=SpectralState()))(z, x)


def test_spectral_penalty_in_a_fixed_point_training_step():
    m = fpgrad.maps.tanh_rnn(8, 1.2, seed=0)
    params = _leaf_params(m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    state = SpectralState(generator=g)
    z = fpgrad.fixed_point(m.step, params, x, torch.zeros(4, 8, dtype=torch.float64), backward="one_step")
    task = z.pow(2).mean()
    penalty = spectral_penalty(m.step, params, z, x, state=state, target=0.5)
    (task + penalty).backward()
    # the penalty's gradient is the estimate's, at z* held fixed
    grad_total = params["W"].grad.clone()
    params2 = _leaf_params(m)
    z2 = fpgrad.fixed_point(m.step, params2, x, torch.zeros(4, 8, dtype=torch.float64), backward="one_step")
    z2.pow(2).mean().backward()
    rho = dense_radius(m.step, m.params, z, x)
    assert abs(float(penalty) - float(torch.relu(state.last - 0.5).mean())) < 1e-12
    # where the cold start converged (sample 2 has |lambda_2 / lambda_1| = 0.97 and says so), the estimate is rho
    ok = state.residual < 1e-6
    assert int(ok.sum()) == 3 and bool(state.residual[2] > 1e-3)
    assert torch.allclose(state.last[ok], rho[ok], rtol=1e-6)
    assert not torch.allclose(grad_total, params2["W"].grad)


# ---- fixed-point correction -------------------------------------------------------------------------------

def test_correction_weights_follow_torchdeq_schedules_and_normalise():
    lin = correction_weights(4, "linear", normalize=False)
    exp = correction_weights(4, "exp", normalize=False)
    assert torch.allclose(lin, torch.tensor([1 - 3 / 4 * 0.9, 1 - 2 / 4 * 0.9, 1 - 1 / 4 * 0.9, 1.0],
                                            dtype=torch.float64))
    assert torch.allclose(exp, torch.tensor([0.8 ** 3, 0.8 ** 2, 0.8, 1.0], dtype=torch.float64))
    for w in ("linear", "exp", "const", [1.0, 2.0, 3.0, 4.0]):
        assert abs(float(correction_weights(4, w).sum()) - 1.0) < 1e-15
    with pytest.raises(ValueError, match="one weight per entry"):
        correction_weights(4, [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown weight schedule"):
        correction_weights(4, "cosine")


@pytest.mark.parametrize("weights", ["linear", "exp"])
def test_fixed_point_correction_equals_a_hand_written_weighted_loop(tanh_map, weights):
    m, x, _ = tanh_map
    t = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss_fn(z):
        return (z - t).pow(2).mean()
    iters = [3, 6, 9]
    params = _leaf_params(m)
    total, losses = fixed_point_correction(m.step, params, x, torch.zeros_like(t), iters, loss_fn, weights=weights,
                                           return_losses=True)
    grads = torch.autograd.grad(total, list(params.values()))
    # by hand: iterate without the tape, one taped step at each sampled iterate, TorchDEQ's raw weights / sum
    params2 = _leaf_params(m)
    raw = [(1 - (3 - k - 1) / 3 * 0.9) if weights == "linear" else 0.8 ** (3 - k - 1) for k in range(3)]
    z = torch.zeros_like(t)
    ref, done = 0.0, 0
    for k, i in enumerate(iters):
        with torch.no_grad():
            for _ in range(i - 1 - done):
                z = m.step(m.params, z, x)
        done = i - 1
        ref = ref + raw[k] / sum(raw) * loss_fn(m.step(params2, z.detach(), x))
    ref_grads = torch.autograd.grad(ref, list(params2.values()))
    assert abs(float(total) - float(ref)) <= 1e-14
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(grads, ref_grads))
    assert losses.shape == (3,)


def test_fixed_point_correction_without_detach_is_unrolled_backprop(tanh_map):
    m, x, _ = tanh_map

    def loss_fn(z):
        return z.sum()
    params = _leaf_params(m)
    total = fixed_point_correction(m.step, params, x, torch.zeros(3, 6, dtype=torch.float64), [2, 4], loss_fn,
                                   weights=torch.tensor([1.0, 3.0]), detach=False)
    params2 = _leaf_params(m)
    z = torch.zeros(3, 6, dtype=torch.float64)
    zs = []
    for _ in range(4):
        z = m.step(params2, z, x)
        zs.append(z)
    ref = 0.25 * zs[1].sum() + 0.75 * zs[3].sum()
    a = torch.autograd.grad(total, params["W"])[0]
    b = torch.autograd.grad(ref, params2["W"])[0]
    assert torch.allclose(a, b, rtol=1e-12)


@pytest.mark.skipif(not HAVE_TORCHDEQ, reason="torchdeq (the bench extra) is not installed")
def test_fixed_point_correction_unnormalised_equals_torchdeq_fp_correction(tanh_map):
    from torchdeq.loss import fp_correction
    m, x, _ = tanh_map
    t = torch.zeros(3, 6, dtype=torch.float64)
    iters = [2, 5, 7]
    ours = fixed_point_correction(m.step, m.params, x, t, iters, lambda z: z.pow(2).mean(), weights="exp",
                                  normalize=False)
    zs, z = [], t
    for i in range(1, 8):
        z = m.step(m.params, z, x)
        if i in iters:
            zs.append(z)
    peer = fp_correction(lambda a: a.pow(2).mean(), (zs,), weight_func="exp")
    assert abs(float(ours) - float(peer)) <= 1e-13


def test_fixed_point_correction_rejects_bad_iterations(tanh_map):
    m, x, _ = tanh_map
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="increasing"):
        fixed_point_correction(m.step, m.params, x, z0, [4, 2], lambda z: z.sum())
    with pytest.raises(ValueError, match="grad_steps"):
        fixed_point_correction(m.step, m.params, x, z0, [1, 2], lambda z: z.sum(), grad_steps=2)


# ---- precision and devices ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["jvp", "vjp"])
def test_penalties_run_under_bfloat16_autocast_close_to_float32(form):
    m = fpgrad.maps.tanh_rnn(16, 0.9, seed=0, dtype=torch.float32)
    params = {k: v.clone().requires_grad_(True) for k, v in m.params.items()}
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    z = fpgrad.solve(m, x).z
    V = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    ref = float(frobenius_penalty(m.step, params, z, x, vectors=V, form=form))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = frobenius_penalty(m.step, params, z, x, vectors=V, form=form)
        grad = torch.autograd.grad(value, params["W"])[0]
        spectral = spectral_penalty(m.step, params, z, x, target=0.0, form=form,
                                    generator=torch.Generator().manual_seed(0))
    assert abs(float(value) - ref) <= 0.03 * ref
    assert bool(torch.isfinite(grad).all()) and bool(torch.isfinite(spectral))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_penalties_on_cuda_match_cpu():
    m, x, z = tanh_with_spectrum(eigs=[0.8, -0.55], n=7, seed=0)
    V = draw_probes((2, 3, 7), torch.Generator().manual_seed(0), torch.float64, "cpu")
    cuda = {k: v.cuda() for k, v in m.params.items()}
    for form in ("vjp", "jvp"):
        a = frobenius_penalty(m.step, m.params, z, x, vectors=V, form=form)
        b = frobenius_penalty(m.step, cuda, z.cuda(), x.cuda(), vectors=V.cuda(), form=form)
        assert b.device.type == "cuda" and abs(float(a) - float(b.cpu())) <= 1e-10 * abs(float(a))
    rho = spectral_estimate(m.step, cuda, z.cuda(), x.cuda(), iters=150,
                            generator=torch.Generator(device="cuda").manual_seed(0)).value
    assert torch.allclose(rho.cpu(), dense_radius(m.step, m.params, z, x), rtol=1e-7)
