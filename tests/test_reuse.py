"""Reuse in exact adjoint solves: SHINE preconditioning / guesses from the forward inverse estimate, warm
starts, mixed-precision refinement. Each must reach the dense / finite-difference reference to its tolerance."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import contractive_slot_attention, contractive_tanh
from hypothesis import given, settings
from hypothesis import strategies as st

import fpgrad
from fpgrad import spectral
from fpgrad.errors import DTypeError, ShapeError
from fpgrad.estimators import CostRecord, Implicit, Linearisation, WarmStart
from fpgrad.estimators._reuse import inner_tolerance

SHINE = [dict(precondition="forward"), dict(initial_guess="forward"),
         dict(precondition="forward", initial_guess="forward")]


def tanh_case(n=40, lipschitz=0.95, seed=0, batch=3):
    m = contractive_tanh(n, lipschitz, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return m, x


def loss_fn(z):
    w = torch.linspace(-1, 1, z[0].numel(), dtype=z.dtype).reshape(z.shape[1:])
    return (z * w).sum() + 0.5 * (z ** 2).sum()


def grads(m, x, backward, forward="broyden", record=None, z0=None):
    params = {k: v.detach().clone().requires_grad_() for k, v in m.params.items()}
    z0 = m.init_state(x, None) if z0 is None else z0
    fw = fpgrad.forward.get_forward(forward, tol=1e-12, max_iter=500) if isinstance(forward, str) else forward
    z = fpgrad.fixed_point(m.step, params, x, z0, forward=fw, backward=backward, record=record)
    loss_fn(z).backward()
    return torch.cat([params[k].grad.reshape(-1) for k in sorted(params)])


def dense_grads(m, x, forward="broyden"):
    return grads(m, x, Implicit(solver="dense"), forward)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("forward", ["broyden", "anderson"])
@pytest.mark.parametrize("options", SHINE, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_shine_gradient_matches_dense(forward, options):
    m, x = tanh_case()
    record = CostRecord()
    g = grads(m, x, Implicit(tol=1e-10, **options), forward, record)
    assert rel(g, dense_grads(m, x, forward)) < 1e-8
    sol = record.solves[-1]
    assert bool(sol.converged.all()) and float(sol.residual.max()) <= 1e-10


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), lipschitz=st.floats(0.3, 0.97), n=st.integers(4, 30),
       batch=st.integers(1, 3), forward=st.sampled_from(["broyden", "anderson"]),
       solver=st.sampled_from(["gmres", "bicgstab"]))
def test_shine_preconditioned_solve_matches_dense_under_hypothesis(seed, lipschitz, n, batch, forward, solver):
    m, x = tanh_case(n, lipschitz, seed, batch)
    g = grads(m, x, Implicit(solver=solver, tol=1e-11, precondition="forward"), forward)
    assert rel(g, dense_grads(m, x, forward)) < 1e-7


def test_shine_on_slot_attention_matches_finite_differences():
    m = contractive_slot_attention(dim=6, num_slots=3, seed=2)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z0 = m.init_state(x, torch.Generator().manual_seed(1))
    fw = fpgrad.forward.Broyden(tol=1e-12, max_iter=300)
    est = Implicit(tol=1e-11, precondition="forward")
    got = fpgrad.gradient(m, x, loss_fn, est, z0=z0, forward=fw)
    ref = fpgrad.gradient(m, x, loss_fn, "finite_difference", z0=z0, forward=fw)
    assert rel(got.flat(), ref.flat()) < 1e-6


def test_shine_preconditioner_cuts_vjps_where_the_forward_inverse_is_rich():
    """On a slow map (||W|| = 0.99) Broyden's inverse estimate of rank ~ its step count preconditions GMRES:
    fewer Arnoldi steps. (The unpreconditioned solve forms its final residual from the basis; the preconditioned
    one pays a matvec for it, whose rounding the basis' bound does not cover.)"""
    m, x = tanh_case(n=200, lipschitz=0.99, seed=3, batch=1)
    steps, matvecs = {}, {}
    for name, est in (("cold", Implicit(tol=1e-8)), ("shine", Implicit(tol=1e-8, precondition="forward"))):
        record = CostRecord()
        grads(m, x, est, fpgrad.forward.Broyden(tol=1e-12, max_iter=500, memory=200), record)
        steps[name] = int(record.solves[-1].iterations.max())
        matvecs[name] = record.solves[-1].matvecs
    assert steps["shine"] < steps["cold"], steps
    assert matvecs == {"cold": steps["cold"], "shine": steps["shine"] + 1}, (matvecs, steps)


def test_forward_inverse_needs_a_quasi_newton_forward_solver():
    m, x = tanh_case()
    with pytest.raises(ValueError, match="broyden"):
        grads(m, x, Implicit(precondition="forward"), "iterate")


def test_forward_inverse_estimate_satisfies_the_secant_equations():
    """Anderson's multisecant estimate H (of (dg/dz)^-1, g = f - z) maps the last differences of g onto those
    of z exactly; applied as (I - J)^-1 it is exact for a linear map along those directions."""
    m, x = tanh_case(n=30, lipschitz=0.9, batch=2)
    fw = fpgrad.forward.Anderson(tol=1e-14, max_iter=8, memory=5, warn=False)
    state = {}
    original = fw._info

    def spy(s):
        state.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()})
        return original(s)

    object.__setattr__(fw, "_info", spy)
    fp = fw.solve(m.step, m.params, x, m.init_state(x, None))
    inv = fp.inverse
    X, F = state["X"], state["F"]
    last = (state["count"] - 1) % fw.memory
    others = [i for i in range(fw.memory) if i != last]
    S = X[:, others] - X[:, last : last + 1]
    Y = (F - X)[:, others] - (F - X)[:, last : last + 1]
    for j in range(len(others)):       # H y = s  <=>  (I - J)^-1 (-y) ~ s  <=>  inv.solve(-y) = s
        torch.testing.assert_close(inv.solve(-Y[:, j]), S[:, j], rtol=1e-6, atol=1e-9)


def test_shine_under_vmap_of_grad_equals_a_loop():
    m, x = tanh_case(n=12, batch=1)
    xs = torch.randn(4, 1, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    est = Implicit(tol=1e-11, precondition="forward")
    fw = fpgrad.forward.Broyden(tol=1e-12, max_iter=300)

    def f(params, xi):
        return loss_fn(fpgrad.fixed_point(m.step, params, xi, torch.zeros_like(xi), forward=fw, backward=est))

    batched = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(dict(m.params), xs)
    for i in range(4):
        single = torch.func.grad(f)(dict(m.params), xs[i])
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-8, atol=1e-10)


# --- warm starts ---------------------------------------------------------------------------------------------

def test_warm_start_reuses_the_last_adjoint_of_the_same_batch():
    m, x = tanh_case(n=60, lipschitz=0.97)
    cache = WarmStart()
    est = Implicit(tol=1e-10, warm_start=cache)
    first, second = CostRecord(), CostRecord()
    g1 = grads(m, x, est, "anderson", first)
    g2 = grads(m, x, est, "anderson", second)
    ref = dense_grads(m, x, "anderson")
    assert rel(g1, ref) < 1e-8 and rel(g2, ref) < 1e-8
    assert second.solves[-1].matvecs < first.solves[-1].matvecs / 2
    assert cache.hits == 3 and cache.misses == 3


def test_warm_start_keyed_by_sample_ids_follows_each_sample_across_batches():
    m, x = tanh_case(n=40, lipschitz=0.95, batch=4)
    cache = WarmStart()
    est = Implicit(tol=1e-10, warm_start=cache)
    cache.bind([10, 11, 12, 13])
    grads(m, x, est, "anderson")
    perm = torch.tensor([2, 0, 3])
    cache.bind([12, 10, 13])
    record = CostRecord()
    g = grads(m, x[perm], est, "anderson", record)
    assert rel(g, dense_grads(m, x[perm], "anderson")) < 1e-8
    assert not bool(record.solves[-1].rejected_guess.any())
    assert float(record.solves[-1].residuals[0].max()) < 1e-8      # each sample started at its own adjoint
    cache.bind([1, 2])
    with pytest.raises(ShapeError, match="2 sample ids"):
        grads(m, x[perm], est, "anderson")


def test_warm_start_from_a_different_system_still_converges_to_the_right_answer():
    m, x = tanh_case(n=40, lipschitz=0.95)
    other, _ = tanh_case(n=40, lipschitz=0.95, seed=7)
    cache = WarmStart()
    grads(other, -x, Implicit(tol=1e-10, warm_start=cache), "anderson")
    g = grads(m, x, Implicit(tol=1e-10, warm_start=cache), "anderson")
    assert rel(g, dense_grads(m, x, "anderson")) < 1e-8


def test_warm_start_fixed_points_shorten_the_forward_solve():
    m, x = tanh_case(n=40, lipschitz=0.95)
    cache = WarmStart().bind([0, 1, 2])
    fw = fpgrad.forward.Anderson(tol=1e-12, max_iter=300)
    z0 = m.init_state(x, None)
    first = fw.solve(m.step, m.params, x, cache.initial_state(z0))
    cache.store_state(first.z)
    again = fw.solve(m.step, m.params, x, cache.initial_state(z0))
    assert int(again.steps.max()) < int(first.steps.max())
    torch.testing.assert_close(again.z, first.z, rtol=1e-10, atol=1e-12)


def test_warm_start_capacity_drops_the_least_recently_used():
    cache = WarmStart(capacity=2)
    cache.bind([1, 2]).store(torch.ones(2, 3, dtype=torch.float64))
    cache.bind([3]).store(torch.ones(1, 3, dtype=torch.float64))
    assert len(cache) == 2
    assert cache.bind([1]).guess(torch.ones(1, 3, dtype=torch.float64)) is None
    with pytest.raises(ValueError):
        WarmStart(capacity=0)


# --- mixed precision -----------------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), lipschitz=st.floats(0.3, 0.97), n=st.integers(4, 40),
       solver=st.sampled_from(["gmres", "bicgstab"]))
def test_mixed_precision_reaches_float64_accuracy(seed, lipschitz, n, solver):
    m, x = tanh_case(n, lipschitz, seed, batch=2)
    record = CostRecord()
    g = grads(m, x, Implicit(solver=solver, tol=1e-10, mixed_precision=torch.float32), "anderson", record)
    assert rel(g, dense_grads(m, x, "anderson")) < 1e-8
    sol = record.solves[-1]
    assert bool(sol.converged.all()) and float(sol.residual.max()) <= 1e-10
    assert record.low_precision_vjps > 0 and "float32" in sol.message


def test_mixed_precision_residual_trace_is_the_measured_float64_residual():
    m, x = tanh_case(n=50, lipschitz=0.95)
    record = CostRecord()
    grads(m, x, Implicit(tol=1e-12, mixed_precision=torch.float32), "anderson", record)
    sol = record.solves[-1]
    lin = Linearisation(m.step, m.params, x, record.forward[-1].z)
    gz = torch.func.grad(loss_fn)(record.forward[-1].z).reshape(3, -1)
    r = gz - (sol.u - lin.JT(sol.u))
    torch.testing.assert_close(sol.residual, r.norm(dim=1) / gz.norm(dim=1), rtol=1e-6, atol=1e-16)
    # each refinement cuts the residual by about the inner float32 tolerance
    assert sol.residuals.shape[0] <= 1 + 12 // 4 + 1
    assert inner_tolerance(torch.float32) == 1e-4


def test_mixed_precision_on_a_float32_map_is_refused():
    m, x = tanh_case()
    m32 = m.with_params({k: v.float() for k, v in m.params.items()})
    with pytest.raises(DTypeError, match="not lower precision"):
        grads(m32, x.float(), Implicit(mixed_precision=torch.float32), fpgrad.forward.Anderson(tol=1e-5))


def test_mixed_precision_that_cannot_reach_tol_is_reported_not_hidden():
    m, x = tanh_case(n=30, lipschitz=0.95)
    record = CostRecord()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads(m, x, Implicit(tol=1e-12, mixed_precision=torch.float32, max_refinements=1), "anderson", record)
    sol = record.solves[-1]
    assert not bool(sol.converged.all())
    assert any("did not converge" in str(w.message) and "max_refinements" in str(w.message) for w in caught)


def test_a_posteriori_error_bound_holds_for_every_reuse_strategy():
    """||u - u*|| <= ||r|| / sigma_min(I - J^T) with the residual each strategy reports."""
    m, x = tanh_case(n=30, lipschitz=0.9, batch=2)
    fw = fpgrad.forward.Broyden(tol=1e-12, max_iter=300)
    z = fw.solve(m.step, m.params, x, m.init_state(x, None))
    lin = Linearisation(m.step, m.params, x, z.z, forward=z)
    J = torch.func.vmap(torch.func.jacrev(lambda zi, xi: m.step(m.params, zi[None], xi[None])[0]))(z.z, x)
    I = torch.eye(30, dtype=torch.float64)
    gvec = torch.randn(2, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.linalg.solve(I - J.transpose(1, 2), gvec.unsqueeze(2)).squeeze(2)
    sigma = torch.linalg.svdvals(I - J)[:, -1]
    from fpgrad.linsolve import RecycleSpace
    space = RecycleSpace(k=4)
    for options in [*SHINE, dict(mixed_precision=torch.float32), dict(warm_start=WarmStart()),
                    dict(recycle=space, options={"restart": 10}), dict(recycle=space, options={"restart": 10})]:
        est = Implicit(tol=1e-4, **options)
        record = CostRecord()
        u = est.adjoint_vector(lin, gvec, record)
        r = (gvec - (u - lin.JT(u))).norm(dim=1)
        bound = spectral.adjoint_error_bound(r, sigma)
        assert bool(((u - exact).norm(dim=1) <= bound * (1 + 1e-6)).all()), options


def test_implicit_reuse_options_are_validated():
    with pytest.raises(ValueError, match="precondition"):
        Implicit(precondition="magic")
    with pytest.raises(ValueError, match="cannot use precondition"):
        Implicit(solver="cg", precondition="forward")
    with pytest.raises(ValueError, match="not both"):
        Implicit(warm_start=WarmStart(), initial_guess="forward")
    with pytest.raises(TypeError, match="WarmStart"):
        Implicit(warm_start={})
    with pytest.raises(TypeError, match="dtype"):
        Implicit(mixed_precision="float32")


# --- recycling -------------------------------------------------------------------------------------------------

def test_recycling_through_implicit_matches_dense_and_carries_its_space():
    from fpgrad.linsolve import RecycleSpace
    space = RecycleSpace(k=4)
    est = Implicit(tol=1e-10, recycle=space, options={"restart": 12})
    assert est.solver == "gmres" and est.solver_name == "gcrodr"     # the config as given; the solver it builds
    m, x = tanh_case(n=40, lipschitz=0.97)
    for seed in range(3):
        xs = x + 0.01 * seed
        g = grads(m, xs, est, "anderson")
        assert rel(g, dense_grads(m, xs, "anderson")) < 1e-8
    assert space.solves == 3 and space.columns > 0
    with pytest.raises(ValueError, match="gcrodr"):
        Implicit(solver="bicgstab", recycle=space)


def test_mixed_precision_max_iter_bounds_all_refinements_together():
    m, x = tanh_case(n=80, lipschitz=0.99, batch=1)
    record = CostRecord()
    with pytest.warns(fpgrad.errors.ConvergenceWarning, match="budget"):
        grads(m, x, Implicit(tol=1e-13, max_iter=12, mixed_precision=torch.float32), "anderson", record)
    sol = record.solves[-1]
    assert int(sol.iterations.max()) <= 12
    # inner Arnoldi steps + one true-residual check per inner cycle; the budget is not multiplied by refinements
    assert record.low_precision_vjps <= 12 + 2 * 10


def test_a_truncated_broyden_estimate_is_noted_in_the_record():
    m, x = tanh_case(n=60, lipschitz=0.97, batch=1)
    record = CostRecord()
    grads(m, x, Implicit(tol=1e-10, precondition="forward"), fpgrad.forward.Broyden(tol=1e-12, max_iter=300, memory=5),
          record)
    assert record.forward[-1].info["dropped_updates"] > 0
    assert any("dropped" in msg for msg in record.messages)


def test_anderson_builds_its_inverse_estimate_only_when_read_and_once():
    """The multisecant estimate costs ~30 operations and a batched pseudo-inverse: a solve whose estimate nobody
    reads (every backward but precondition / initial_guess="forward") must not pay for it."""
    import copy
    import pickle
    m, x = tanh_case(n=20, lipschitz=0.9, batch=3)
    fw = fpgrad.forward.Anderson(tol=1e-12, max_iter=50, memory=5)
    calls = []
    original = fw._multisecant

    def spy(*args):
        calls.append(1)
        return original(*args)

    object.__setattr__(fw, "_multisecant", spy)
    fp = fw.solve(m.step, m.params, x, m.init_state(x, None))
    assert calls == []
    U, V = fp.inverse.U, fp.inverse.V
    assert calls == [1] and fp.inverse.U is U and calls == [1]
    assert U.shape == V.shape == (3, 20, 4)
    for clone in (pickle.loads(pickle.dumps(fp.inverse)), copy.deepcopy(fp).inverse):
        assert type(clone) is fpgrad.forward.LowRankInverse
        torch.testing.assert_close(clone.U, U)
        torch.testing.assert_close(clone.V, V)
