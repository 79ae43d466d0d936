"""check_every=k in the forward solvers and the Krylov loops (GMRES, BiCGSTAB): the host is asked only every k
iterations (converged? which samples are active? a NaN?), the per-sample masking stays on the device, and the
result equals check_every=1's up to round-off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linsolve_helpers import make_problem

from benchmarks._sync import syncs_per_iteration
from fpgrad._checks import host_check
from fpgrad.errors import ConvergenceWarning, NonFiniteError
from fpgrad.forward import Anderson, Broyden, Iterate, get_forward
from fpgrad.linsolve import GMRES, BiCGSTAB

SOLVERS = {"iterate": Iterate, "anderson": Anderson, "broyden": Broyden}


def _tanh_map(n: int, B: int, seed: int, rho: float):
    """z -> tanh(A_b z + x_b) with a different contraction level per sample (so samples stop at different
    iterations): ||A_b||_2 = rho * (0.5 + 0.5 b / B)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    levels = rho * (0.5 + 0.5 * torch.arange(1, B + 1, dtype=torch.float64) / B)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    z0 = torch.zeros(B, n, dtype=torch.float64)

    def step(params, z, x_):
        # each sample's own level travels with x (the loop indexes x by the active subset)
        level, xx = x_[:, :1], x_[:, 1:]
        return torch.tanh(level * (z @ params["W"].T) + xx)

    return step, {"W": W}, torch.cat([levels[:, None], x], dim=1), z0


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(sorted(SOLVERS)), k=st.sampled_from([2, 3, 8]), B=st.integers(1, 5),
       n=st.integers(2, 12), seed=st.integers(0, 2 ** 16), rho=st.floats(0.2, 0.95))
def test_checking_every_k_iterations_gives_the_result_of_checking_every_one(method, k, B, n, seed, rho):
    step, params, x, z0 = _tanh_map(n, B, seed, rho)
    every = SOLVERS[method](tol=1e-10, max_iter=400, check_every=1)
    sparse = SOLVERS[method](tol=1e-10, max_iter=400, check_every=k)
    a = every.solve(step, params, x, z0)
    b = sparse.solve(step, params, x, z0)
    assert torch.equal(a.converged, b.converged)
    assert torch.equal(a.steps, b.steps)                 # iterations each sample was active: the same
    assert a.residuals.shape == b.residuals.shape        # the rows run after the last convergence are dropped
    torch.testing.assert_close(b.z, a.z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.residuals, a.residuals, rtol=1e-6, atol=1e-13)
    assert torch.equal(a.status, b.status)


def test_a_sample_that_does_not_converge_is_reported_the_same():
    step, params, x, z0 = _tanh_map(6, 3, 0, 0.99)
    a = Anderson(tol=1e-14, max_iter=7, check_every=1, warn=False).solve(step, params, x, z0)
    b = Anderson(tol=1e-14, max_iter=7, check_every=4, warn=False).solve(step, params, x, z0)
    assert not bool(b.converged.any()) and torch.equal(a.steps, b.steps)
    assert a.residuals.shape == b.residuals.shape == (8, 3)
    torch.testing.assert_close(b.z, a.z)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_nan_between_checks_is_raised_with_its_iteration_and_sample(method):
    calls = {"n": 0}

    def step(params, z, x):
        calls["n"] += 1
        out = torch.tanh(0.5 * z) + x
        if calls["n"] == 4:                   # the 3rd iteration's evaluation (the 1st is f(z0))
            out = out.clone()
            out[1, 0] = float("nan")
        return out

    x = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"iteration 3 in sample\(s\) \[1\]"):
        SOLVERS[method](tol=1e-15, max_iter=50, check_every=8).solve(step, {}, x, torch.zeros(3, 4,
                                                                                                dtype=torch.float64))
    assert calls["n"] <= 1 + 8                            # raised at the next check, not at the end of the solve


def _exact_run(method: str, k: int):
    step, params, x, z0 = _tanh_map(16, 4, 1, 0.9)

    def run(T: int):
        # tol 0: no sample ever stops, so the solver runs exactly T iterations
        return SOLVERS[method](tol=0.0, max_iter=T, check_every=k, warn=False).solve(step, params, x, z0)
    return run


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_syncs_per_iteration_fall_with_the_check_period(method):
    every = syncs_per_iteration(_exact_run(method, 1), "cpu", low=8, high=24)["per_iteration"]
    sparse = syncs_per_iteration(_exact_run(method, 8), "cpu", low=8, high=24)["per_iteration"]
    assert every >= 1.5                     # how many are active (one sum)? finite? (and lost? with restarts)
    assert sparse <= 0.5
    assert sparse <= every / 3


def test_default_period_is_one_on_the_cpu_and_eight_on_cuda():
    solver = Anderson()
    assert solver.check_every is None
    assert solver.check_period(torch.device("cpu")) == 1
    assert solver.check_period(torch.device("cuda")) == 8       # reads the device type only: no GPU needed
    assert Anderson(check_every=3).check_period(torch.device("cuda")) == 3
    assert get_forward("iterate", check_every=4).check_every == 4


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_a_bad_check_period_is_named(bad):
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        Iterate(check_every=bad).solve(lambda p, z, x: 0.5 * z, {}, None, torch.zeros(2, 3))


# ---- the Krylov loops (GMRES's batched cycle, BiCGSTAB) ------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["gmres", "bicgstab"]), k=st.sampled_from([2, 3, 8]), B=st.integers(2, 5),
       n=st.integers(2, 30), seed=st.integers(0, 2 ** 16), radius=st.floats(0.1, 0.95),
       restart=st.integers(2, 30))
def test_krylov_checking_every_k_iterations_gives_the_result_of_checking_every_one(name, k, B, n, seed, radius,
                                                                                    restart):
    radii = [radius * (0.4 + 0.6 * i / (B - 1)) for i in range(B)]   # samples that stop at different steps
    p = make_problem(n, radii, seed=seed)

    def build(period):
        if name == "gmres":
            return GMRES(tol=1e-10, max_iter=300, restart=restart, check_every=period)
        return BiCGSTAB(tol=1e-10, max_iter=300, check_every=period)
    a = build(1).compute(p.M, p.b)
    b = build(k).compute(p.M, p.b)
    assert torch.equal(a.status, b.status) and torch.equal(a.iterations, b.iterations)
    assert a.residuals.shape == b.residuals.shape       # the idle steps after the last sample stopped are dropped
    torch.testing.assert_close(b.u, a.u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.residuals, a.residuals, rtol=1e-6, atol=1e-13)
    assert b.matvecs >= a.matvecs                       # idle steps are computed, and counted
    assert bool((p.residual(b.u) <= 2e-10).all())


@pytest.mark.parametrize("name", ["gmres", "bicgstab"])
def test_krylov_syncs_per_iteration_fall_with_the_check_period(name):
    p = make_problem(24, [0.9, 0.95, 0.99], seed=3)

    def run_with(period):
        def run(T):
            # tol 0: no sample stops; GMRES with one cycle of T steps (restart = T), BiCGSTAB T iterations
            solver = (GMRES(tol=0.0, max_iter=T, restart=T, check_every=period) if name == "gmres"
                      else BiCGSTAB(tol=0.0, max_iter=T, check_every=period))
            return solver.compute(p.M, p.b)
        return run
    every = syncs_per_iteration(run_with(1), "cpu", low=8, high=16)["per_iteration"]
    sparse = syncs_per_iteration(run_with(8), "cpu", low=8, high=16)["per_iteration"]
    assert every >= 1
    assert sparse <= 0.25


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_a_bad_krylov_check_period_is_named(bad):
    for solver in (GMRES(check_every=bad), BiCGSTAB(check_every=bad)):
        with pytest.raises(ValueError, match="check_every must be an int >= 1"):
            solver.compute(lambda v: 0.5 * v, torch.ones(2, 3))


# ---- when the next check comes: predicted from the residual's rate ----------------------------------------------

def test_the_next_check_comes_when_the_slowest_sample_is_predicted_to_stop():
    active = torch.tensor([True, True, False])
    now = torch.tensor([1e-2, 1e-3, 1.0])
    before = torch.tensor([1e-1, 1e-2, 2.0])           # both active fall 10x a step; the inactive one is ignored
    assert host_check(active, 8, now, before, 1, 1e-5) == (2, 3)      # 1e-2 -> 1e-5: three more steps
    assert host_check(active, 8, now, before ** 0 * now, 1, 1e-5) == (2, 8)   # not falling: a full period
    assert host_check(active, 2, now, before, 1, 1e-5) == (2, 2)      # never beyond the period
    assert host_check(active, 8, now, before, 1, 1.0) == (2, 1)       # already there: the very next iteration
    assert host_check(active, 8, now, before, 2, torch.tensor([1e-4, 1e-5, 0.0])) == (2, 4)   # rate 10^-1/2 a step
    assert host_check(active, 1, now, before, 1, 1e-5) == (2, 1)      # period 1: every iteration, no prediction
    assert host_check(active, 8) == (2, 8)                            # no history yet: a full period
    assert host_check(torch.tensor([False, False]), 8, count=False) == (0, 8)
    assert host_check(active, 8, torch.tensor([float("nan"), 1e-3, 1.0]), before, 1, 1e-5) == (2, 8)


def _idle(method: str, seeds: int = 40) -> list[int]:
    """Extra evaluations check_every=8 runs past check_every=1's on varied tanh maps (tol 1e-8)."""
    import random
    idle = []
    for seed in range(seeds):
        r = random.Random(seed)
        step, params, x, z0 = _tanh_map(r.randint(4, 30), r.randint(1, 6), seed, r.uniform(0.2, 0.97))
        a = SOLVERS[method](tol=1e-8, max_iter=400, check_every=1).solve(step, params, x, z0)
        b = SOLVERS[method](tol=1e-8, max_iter=400, check_every=8).solve(step, params, x, z0)
        assert torch.equal(a.steps, b.steps)
        idle.append(b.evaluations - a.evaluations)
    return idle


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_few_iterations_run_past_the_last_convergence_between_checks(method):
    # a check every 8 iterations alone would run 3.5 past it on average (measured: 3.5-3.8 before the prediction)
    idle = _idle(method)
    assert 0 <= min(idle) and max(idle) <= 7
    assert sum(idle) / len(idle) <= 1.0, idle


@pytest.mark.parametrize("name", ["gmres", "bicgstab"])
def test_few_krylov_steps_run_past_the_last_convergence_between_checks(name):
    import random
    idle = []
    for seed in range(40):
        r = random.Random(seed)
        B, radius = r.randint(2, 5), r.uniform(0.1, 0.97)
        p = make_problem(r.randint(4, 30), [radius * (0.4 + 0.6 * i / (B - 1)) for i in range(B)], seed=seed)

        def build(period):
            if name == "gmres":
                return GMRES(tol=1e-8, max_iter=300, restart=30, check_every=period)
            return BiCGSTAB(tol=1e-8, max_iter=300, check_every=period)
        idle.append(build(8).compute(p.M, p.b).matvecs - build(1).compute(p.M, p.b).matvecs)
    # measured before the prediction: GMRES 1.35 matvecs on average, BiCGSTAB 7.3 (two a step); after 0.55, 4.4
    assert sum(idle) / len(idle) <= (1.0 if name == "gmres" else 5.5), idle


@pytest.mark.parametrize("k", [1, 8])
def test_gmres_flags_a_sample_whose_operator_turns_nan_mid_cycle_and_solves_the_other(k):
    # the batched Arnoldi loop leaves the diverged samples out of its mask step by step and flags them once, after
    # the loop (record_step / settle): sample 0's products turn NaN at the 4th matvec; sample 1 must not notice
    p = make_problem(20, [0.9, 0.9], seed=11)
    calls = {"n": 0}

    def M(v):
        calls["n"] += 1
        out = p.M(v)
        if calls["n"] >= 4:
            out = out.clone()
            out[0] = float("nan")
        return out

    with pytest.warns(ConvergenceWarning, match="NaN"):
        sol = GMRES(tol=1e-10, check_every=k).solve(M, p.b, throw=False)
    assert sol.diverged.tolist() == [True, False] and sol.converged.tolist() == [False, True]
    assert "NaN" in sol.message
    torch.testing.assert_close(sol.u[1], p.u[1], rtol=1e-8, atol=1e-9)


# ---- GMRES's deferred factorisation (check_every > 1): the Hessenberg is factored at host checks only ----------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(34, 90), B=st.integers(2, 4), seed=st.integers(0, 2 ** 16), radius=st.floats(0.9, 0.99),
       restart=st.sampled_from([33, 40, 64, 200]), k=st.sampled_from([3, 8]), precondition=st.booleans())
def test_gmres_deferred_factorisation_past_the_first_workspace_equals_the_rotated_loop(n, B, seed, radius, restart,
                                                                                      k, precondition):
    # restarts > 32 grow the basis and the stored Hessenberg past their first allocation; tol 1e-12 makes the
    # near-unit radii take most of n steps
    p = make_problem(n, [radius * (0.5 + 0.5 * i / (B - 1)) for i in range(B)], seed=seed)
    P = (lambda v: v + 0.5 * p.M(v)) if precondition else None                  # ~ (I - M)^{-1}
    a = GMRES(tol=1e-12, max_iter=400, restart=restart, check_every=1).compute(p.M, p.b, preconditioner=P)
    b = GMRES(tol=1e-12, max_iter=400, restart=restart, check_every=k).compute(p.M, p.b, preconditioner=P)
    assert torch.equal(a.status, b.status) and torch.equal(a.iterations, b.iterations)
    assert a.residuals.shape == b.residuals.shape
    torch.testing.assert_close(b.u, a.u, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b.residuals, a.residuals, rtol=1e-5, atol=1e-13)
    torch.testing.assert_close(b.u, p.u, rtol=1e-7, atol=1e-8)          # and against the dense solve


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gmres_deferred_factorisation_in_low_precision_reaches_what_the_dtype_allows(dtype):
    # the residual estimate is the tail norm of Q's first row, not 1 - sum of squares (which would floor at
    # ~sqrt(eps) = 2e-4 in float32 and stop no sample at 1e-5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    p = make_problem(48, [0.6, 0.8, 0.9], seed=5, dtype=dtype)
    a = GMRES(tol=tol, max_iter=200, restart=60, check_every=1).compute(p.M, p.b)
    b = GMRES(tol=tol, max_iter=200, restart=60, check_every=8).compute(p.M, p.b)
    assert bool(a.converged.all()) and bool(b.converged.all()) and b.u.dtype == dtype, b.message
    assert bool((p.residual(b.u) <= 20 * tol).all())
    assert (b.iterations - a.iterations).abs().max() <= 1                # round-off may move a stop by a step
    assert bool((p.error(b.u) <= 50 * tol).all())


def test_gmres_deferred_factorisation_stops_a_singular_sample_as_the_rotated_loop_does():
    # sample 0's system is singular (I - M = diag(1, .., 1, 0), b with a component outside its range): its Krylov
    # space breaks down on a singular Hessenberg after 2 steps and no u solves it; both loops stop it, unconverged
    # and with the same status (its u is meaningless and differs), and solve sample 1 as usual
    p = make_problem(30, [0.5, 0.7], seed=2)
    Mmat = p.Mmat.clone()
    Mmat[0] = torch.diag(torch.tensor([0.0] * 29 + [1.0], dtype=torch.float64))

    def M(v):
        return torch.einsum("bij,bj->bi", Mmat, v)
    a = GMRES(tol=1e-10, max_iter=100, check_every=1).compute(M, p.b)
    b = GMRES(tol=1e-10, max_iter=100, check_every=8).compute(M, p.b)
    assert not bool(a.converged[0]) and bool(a.converged[1]), a.message
    assert torch.equal(a.status, b.status) and torch.equal(a.iterations, b.iterations), (a.message, b.message)
    assert int(b.status[0]) != 1 and not bool(b.converged[0])
    torch.testing.assert_close(b.u[1], a.u[1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b.u[1], p.u[1], rtol=1e-8, atol=1e-9)
