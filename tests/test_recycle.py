"""fpgrad.linsolve.GCRODR and RecycleSpace: GMRES that deflates a subspace recycled across a sequence of solves."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linsolve_helpers import SOLVE_TOL, Counter, Problem, _orthogonal, assert_solved, make_problem

from fpgrad.errors import ConvergenceError, ConvergenceWarning, DeviceError, DivergenceError, DTypeError, ShapeError
from fpgrad.linsolve import GCRODR, GMRES, RecycleSpace, get_solver

DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gcrodr(dtype=torch.float64, n=40, **options) -> GCRODR:
    return GCRODR(**{"tol": SOLVE_TOL[dtype], "max_iter": 20 * n + 50, **options})


def perturbed(p: Problem, eps: float, seed: int, new_b: bool = True) -> Problem:
    """p with M + eps E (E ~ N(0, 1/n)) and, if new_b, a new right-hand side; reference solved in float64."""
    B, n, _ = p.Mmat.shape
    g = torch.Generator().manual_seed(seed)
    M = p.Mmat.double() + eps * torch.randn(B, n, n, generator=g, dtype=torch.float64) / n ** 0.5
    b = torch.randn(B, n, generator=g, dtype=torch.float64) if new_b else p.b.double()
    u = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, b.unsqueeze(-1)).squeeze(-1)
    return Problem(M.to(p.b.dtype), b.to(p.b.dtype), u)


def slow_outliers(n: int, batch: int, seed: int) -> Problem:
    """J^T with six slow eigenvalues (0.995, 0.99, 0.985, 0.98 and a complex pair of modulus 0.98) and the rest
    in [-0.5, 0.5], J = Q L Q^{-1} with cond(Q) <= 2: restarted GMRES(10) crawls, deflating the six helps."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(batch):
        L = torch.diag(0.5 * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1))
        L[range(4), range(4)] = torch.tensor([0.995, 0.99, 0.985, 0.98], dtype=torch.float64)
        c, s = 0.98 * torch.cos(torch.tensor(0.05)), 0.98 * torch.sin(torch.tensor(0.05))
        L[4:6, 4:6] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        scale = 1 + torch.rand(n, generator=g, dtype=torch.float64)
        U, V = _orthogonal(n, g), _orthogonal(n, g)
        mats.append(U @ torch.diag(scale) @ V.T @ L @ V @ torch.diag(1 / scale) @ U.T)
    M = torch.stack(mats)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, b.unsqueeze(-1)).squeeze(-1)
    return Problem(M, b, u)


# --- it solves what it should -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(n=st.integers(2, 40), batch=st.integers(1, 4), seed=st.integers(0, 2**16), radius=st.floats(0.1, 0.95),
       k=st.integers(1, 8), extra=st.integers(1, 20), shared=st.sampled_from([None, True, False]))
def test_solves_contractive_nonsymmetric_systems_with_and_without_a_space(dtype, n, batch, seed, radius, k, extra,
                                                                          shared):
    radii = [radius * (0.5 + 0.5 * i / max(batch - 1, 1)) for i in range(batch)]
    p = make_problem(n, radii, seed=seed, dtype=dtype)
    assert_solved(p, gcrodr(dtype, n, k=k, restart=k + extra).solve(p.M, p.b), SOLVE_TOL[dtype])
    space = RecycleSpace(k=k, shared=shared)
    for t, q in enumerate([p, perturbed(p, 1e-3, seed), perturbed(p, 2e-3, seed + 1, new_b=False)]):
        sol = gcrodr(dtype, n, k=k, restart=k + extra, space=space).solve(q.M, q.b)
        assert_solved(q, sol, SOLVE_TOL[dtype])
        assert space.solves == t + 1
        assert bool(torch.isfinite(space.U).all()) and space.U.dtype == dtype


def test_a_first_cycle_is_plain_gmres():
    p = make_problem(30, [0.9, 0.5], seed=1)
    plain = GMRES(tol=1e-10, restart=40).solve(p.M, p.b)
    recycling = GCRODR(tol=1e-10, restart=40, k=10).solve(p.M, p.b)
    assert recycling.iterations.tolist() == plain.iterations.tolist()
    assert recycling.matvecs == plain.matvecs
    torch.testing.assert_close(recycling.u, plain.u, rtol=1e-10, atol=1e-12)


def test_deflation_across_restarts_helps_without_a_space():
    p = slow_outliers(200, 2, seed=0)
    plain = GMRES(tol=1e-8, restart=10, max_iter=5000).solve(p.M, p.b)
    recycling = GCRODR(tol=1e-8, restart=10, k=6, max_iter=5000).solve(p.M, p.b)
    assert_solved(p, recycling, 1e-8)
    assert recycling.matvecs < 0.5 * plain.matvecs, (recycling.matvecs, plain.matvecs)


# --- recycling across solves ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("new_b", [True, False], ids=["new_rhs", "same_rhs"])
def test_a_recycled_space_cuts_the_matvecs_of_later_solves_in_a_slowly_changing_sequence(new_b):
    base = slow_outliers(200, 2, seed=0)
    space = RecycleSpace(k=6)
    for t in range(4):
        p = perturbed(base, 1e-3 * t, seed=t, new_b=new_b)
        M = Counter(p.M)
        cold = GMRES(tol=1e-8, restart=10, max_iter=5000).solve(p.M, p.b)
        fresh = GCRODR(tol=1e-8, restart=10, k=6, max_iter=5000).solve(p.M, p.b)
        sol = GCRODR(tol=1e-8, restart=10, k=6, max_iter=5000, space=space).solve(M, p.b)
        assert_solved(p, sol, 1e-8)
        assert sol.matvecs == M.calls                        # the k products (I - M) U included
        if t == 0:
            assert space.history[0]["recycle_matvecs"] == 0 and sol.matvecs == fresh.matvecs
            continue
        assert space.history[t]["recycle_matvecs"] == 6 and "recycled 6 directions" in sol.message
        assert sol.matvecs < 0.25 * cold.matvecs, (t, sol.matvecs, cold.matvecs)
        assert sol.matvecs < 0.8 * fresh.matvecs, (t, sol.matvecs, fresh.matvecs)
        assert int(sol.iterations.max()) < int(cold.iterations.min())
    assert space.solves == 4 and space.mode == "per-sample" and space.U.shape == (2, 200, 6)


def test_a_shared_space_serves_new_batches_with_new_right_hand_sides():
    base = slow_outliers(200, 1, seed=2)
    space = RecycleSpace(k=6, shared=True)
    g = torch.Generator().manual_seed(0)
    for t, batch in enumerate([3, 2, 4, 1]):
        # every sample's system is a small perturbation of one J; the batch and its right-hand sides change
        M = base.Mmat.expand(batch, -1, -1) + 1e-3 * torch.randn(batch, 200, 200, generator=g,
                                                                 dtype=torch.float64) / 200 ** 0.5
        b = torch.randn(batch, 200, generator=g, dtype=torch.float64)
        u = torch.linalg.solve(torch.eye(200, dtype=torch.float64) - M, b.unsqueeze(-1)).squeeze(-1)
        p = Problem(M, b, u)
        sol = GCRODR(tol=1e-8, restart=10, k=6, max_iter=5000, space=space).solve(p.M, p.b)
        assert_solved(p, sol, 1e-8)
        assert space.mode == "shared" and space.U.shape == (200, 6)
        if t > 0:
            cold = GMRES(tol=1e-8, restart=10, max_iter=5000).solve(p.M, p.b)
            assert sol.matvecs < 0.25 * cold.matvecs, (t, sol.matvecs, cold.matvecs)
    Q, _ = torch.linalg.qr(space.U)
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-10)    # an orthonormal basis


def test_a_change_of_batch_size_merges_a_default_space_and_restarts_a_strictly_per_sample_one():
    p = make_problem(30, [0.9, 0.8, 0.7], seed=3)
    two = Problem(p.Mmat[:2], p.b[:2], p.u[:2])
    merged, strict = RecycleSpace(k=4), RecycleSpace(k=4, shared=False)
    for space in (merged, strict):
        GCRODR(tol=1e-10, restart=12, k=4, space=space).solve(p.M, p.b)
        assert space.mode == "per-sample" and space.U.shape == (3, 30, 4)
    sol = GCRODR(tol=1e-10, restart=12, k=4, space=merged).solve(two.M, two.b)
    assert "merged into one shared" in sol.message and merged.mode == "shared" and merged.U.shape == (30, 4)
    assert merged.history[-1]["recycle_matvecs"] == 4
    sol = GCRODR(tol=1e-10, restart=12, k=4, space=strict).solve(two.M, two.b)
    assert "started without recycling" in sol.message and "shared=True" in sol.message
    assert strict.history[-1]["recycle_matvecs"] == 0 and strict.U.shape == (2, 30, 4)
    assert_solved(two, sol, 1e-10)


def test_the_space_is_the_callers_and_reset_forgets_it():
    p = make_problem(20, [0.9], seed=4)
    space = RecycleSpace(k=3)
    solver = get_solver("gcrodr", space=space, tol=1e-10, restart=8, k=3)
    assert isinstance(solver, GCRODR) and solver.space is space
    assert solver == GCRODR(tol=1e-10, restart=8, k=3) and hash(solver) == hash(GCRODR(tol=1e-10, restart=8, k=3))
    solver.solve(p.M, p.b)
    solver.solve(p.M, p.b)
    assert space.solves == 2 and space.columns == 3 and "solves=2" in repr(space)
    space.reset()
    assert space.U is None and space.solves == 0 and space.mode == "empty"


def test_an_exact_preconditioner_with_a_recycled_space_converges_at_once():
    p = make_problem(20, [0.95, 0.9], seed=9)
    space = RecycleSpace(k=4)
    GCRODR(tol=1e-10, restart=8, k=4, space=space).solve(p.M, p.b)
    sol = GCRODR(tol=1e-10, restart=8, k=4, space=space).solve(p.M, p.b, preconditioner=p.inverse)
    assert_solved(p, sol, 1e-10)
    assert int(sol.iterations.max()) <= 2


def test_with_a_rough_preconditioner_and_a_space_the_reported_residual_is_the_true_one():
    p = make_problem(20, [0.95, 0.9], seed=10)
    rough = torch.eye(20, dtype=p.A.dtype) - 0.9 * p.Mmat
    P = lambda v: torch.linalg.solve(rough, v.unsqueeze(-1)).squeeze(-1)          # noqa: E731
    space = RecycleSpace(k=4)
    for _ in range(2):
        sol = GCRODR(tol=1e-8, restart=8, k=4, space=space).solve(p.M, p.b, preconditioner=P)
        assert_solved(p, sol, 1e-8)
        torch.testing.assert_close(sol.residual, p.residual(sol.u), rtol=1e-6, atol=1e-14)


# --- refusals ---------------------------------------------------------------------------------------------------------
def test_a_space_from_another_system_size_dtype_or_device_is_refused_naming_the_shapes():
    p = make_problem(12, [0.5, 0.5], seed=5)
    space = RecycleSpace(k=3)
    GCRODR(k=3, restart=6, space=space).solve(p.M, p.b)
    q = make_problem(10, [0.5, 0.5], seed=5)
    with pytest.raises(ShapeError, match=r"\(2, 12, 3\).*n = 12.*\(2, 10\).*n = 10.*reset"):
        GCRODR(k=3, restart=6, space=space).solve(q.M, q.b)
    with pytest.raises(DTypeError, match="float64.*float32"):
        GCRODR(k=3, restart=6, space=space).solve(p.M, p.b.float())
    space.U = space.U.to("meta")
    with pytest.raises(DeviceError, match="meta.*cpu"):
        GCRODR(k=3, restart=6, space=space).solve(p.M, p.b)
    assert space.solves == 1


def test_bad_configurations_are_refused_naming_the_fix():
    p = make_problem(8, [0.5], seed=6)
    with pytest.raises(ValueError, match=r"k=4.*k=3.*GCRODR\(k=4"):
        GCRODR(k=3, restart=6, space=RecycleSpace(k=4)).solve(p.M, p.b)
    with pytest.raises(ValueError, match=r"restart \(5\) must exceed k \(5\)"):
        GCRODR(k=5, restart=5).solve(p.M, p.b)
    with pytest.raises(TypeError, match="RecycleSpace"):
        GCRODR(space=object()).solve(p.M, p.b)
    with pytest.raises(ValueError, match="k must be"):
        RecycleSpace(k=0)
    with pytest.raises(TypeError, match="space"):
        get_solver("gcrodr", spaces=None)


# --- failures are flagged ---------------------------------------------------------------------------------------------
def test_running_out_of_iterations_is_a_convergence_error_naming_restart_and_k():
    p = make_problem(30, [0.95], seed=4)
    space = RecycleSpace(k=4)
    with pytest.raises(ConvergenceError, match=r"max_iter.*restart \(now 8\) or k \(now 4\)") as info:
        GCRODR(k=4, restart=8, max_iter=3, space=space).solve(p.M, p.b)
    assert not isinstance(info.value, DivergenceError)
    with pytest.warns(ConvergenceWarning, match=r"recycled 3 directions \(3 of the 6 matvecs"):
        sol = GCRODR(k=4, restart=8, max_iter=3, space=space).solve(p.M, p.b, throw=False)
    assert sol.iterations.tolist() == [3] and not bool(sol.converged.any()) and bool(torch.isfinite(sol.u).all())


def test_a_sample_that_goes_nonfinite_is_diverged_and_leaves_the_space_clean():
    p = make_problem(15, [0.9, 0.9], seed=7)
    space = RecycleSpace(k=3)
    GCRODR(tol=1e-10, k=3, restart=6, space=space).solve(p.M, p.b)
    before = space.U.clone()
    broken = p.Mmat.clone()
    broken[1, 3, 4] = float("nan")
    q = Problem(broken, p.b, p.u)
    with pytest.raises(DivergenceError, match="NaN"):
        GCRODR(tol=1e-10, k=3, restart=6, space=space).solve(q.M, q.b)
    with pytest.warns(ConvergenceWarning, match="1 of 2 samples"):
        sol = GCRODR(tol=1e-10, k=3, restart=6, space=space).solve(q.M, q.b, throw=False)
    assert sol.diverged.tolist() == [False, True] and bool(sol.u[1].isnan().all())
    torch.testing.assert_close(sol.u[0], p.u[0], rtol=1e-8, atol=1e-10)
    assert bool(torch.isfinite(space.U).all())
    assert torch.equal(space.U[1], before[1])            # the diverged sample keeps its earlier subspace


def test_a_singular_system_stagnates_and_is_reported():
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(6, 6, generator=g, dtype=torch.float64)
    singular = Q @ torch.diag(torch.tensor([1.0, 0.5, 0.2, -0.3, 0.1, 0.0], dtype=torch.float64)) @ torch.inverse(Q)
    b = torch.randn(1, 6, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sol = GCRODR(tol=1e-10, k=2, restart=4).solve(lambda v: v @ singular, b, throw=False)
    assert not bool(sol.converged.any()) and "gcrodr" in sol.message
    assert bool(torch.isfinite(sol.residual).all())


# --- bookkeeping ------------------------------------------------------------------------------------------------------
def test_residual_trace_starts_and_ends_with_true_residuals_when_recycling():
    p = make_problem(30, [0.95, 0.3, 0.8], seed=12)
    space = RecycleSpace(k=5)
    GCRODR(tol=1e-10, k=5, restart=12, space=space).solve(p.M, p.b)
    q = perturbed(p, 1e-3, seed=1)
    x0 = 0.5 * q.u.to(q.b.dtype)
    sol = GCRODR(tol=1e-10, k=5, restart=12, space=space).solve(q.M, q.b, x0=x0)
    torch.testing.assert_close(sol.residuals[0], q.residual(x0))
    torch.testing.assert_close(sol.residuals[-1], q.residual(sol.u), rtol=1e-6, atol=1e-14)
    assert sol.residuals.shape[0] - 1 >= int(sol.iterations.max())
    easy = int(sol.iterations[1])
    assert easy < int(sol.iterations[0])
    assert bool((sol.residuals[easy:, 1] == sol.residuals[-1, 1]).all())            # frozen once it stopped
    # the first iteration is the projection onto the recycled space: the residual drops before any Arnoldi step
    assert bool((sol.residuals[1] < sol.residuals[0]).all())


def test_a_converged_guess_spends_no_matvecs_on_the_space():
    p = make_problem(10, [0.9, 0.5], seed=8)
    space = RecycleSpace(k=3)
    GCRODR(tol=1e-10, k=3, restart=6, space=space).solve(p.M, p.b)
    sol = GCRODR(tol=1e-10, k=3, restart=6, space=space).solve(p.M, p.b, x0=p.u.clone())
    assert sol.matvecs == 1 and sol.iterations.tolist() == [0, 0] and space.solves == 1
