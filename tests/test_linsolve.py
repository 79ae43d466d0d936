"""fpgrad.linsolve: batched matrix-free solvers of (I - M) u = b."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import given
from hypothesis import strategies as st
from linsolve_helpers import SOLVE_TOL, Counter, Problem, assert_solved, make_problem, nonsymmetric_matrix

from fpgrad.errors import (
    ConvergenceError,
    ConvergenceWarning,
    DivergenceError,
    NonFiniteError,
    NonSymmetricError,
    ShapeError,
)
from fpgrad.linsolve import (
    CG,
    GMRES,
    SOLVERS,
    BiCGSTAB,
    Dense,
    LinearSolution,
    NeumannSeries,
    NormalCG,
    SingularSystemError,
    get_solver,
)

ALL = ["neumann", "cg", "cg_normal", "gmres", "bicgstab", "dense", "gcrodr"]
NONSYMMETRIC = ["neumann", "cg_normal", "gmres", "bicgstab", "dense", "gcrodr"]   # every solver but CG
ITERATIVE = ["neumann", "cg", "cg_normal", "gmres", "bicgstab", "gcrodr"]
DTYPES = [torch.float64, torch.float32]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test systems are tiny: one thread avoids BLAS threads spinning against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def solver(name: str, n: int, dtype=torch.float64, **options):
    """A solver with the test tolerance of `dtype` and an iteration budget ample for the test problems."""
    budget = {"neumann": 3000, "dense": 3}.get(name, 20 * n + 50)
    options = {"tol": SOLVE_TOL[dtype], "max_iter": budget, **options}
    return get_solver(name, **options)


def solve(name: str, p: Problem, **options) -> LinearSolution:
    kwargs = {k: options.pop(k) for k in ("x0", "preconditioner", "throw") if k in options}
    return solver(name, p.b.shape[1], p.b.dtype, **options).solve(p.M, p.b, MT=p.MT, **kwargs)


def problem_for(name: str, n: int, radii, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    return make_problem(n, radii, seed=seed, symmetric=name == "cg", dtype=dtype, device=device)


# --- every solver solves what it should ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", NONSYMMETRIC)
@given(n=st.integers(2, 40), batch=st.integers(1, 4), seed=st.integers(0, 2**16),
       radius=st.floats(0.1, 0.95))
def test_solves_contractive_nonsymmetric_systems(name, dtype, n, batch, seed, radius):
    radii = [radius * (0.5 + 0.5 * i / max(batch - 1, 1)) for i in range(batch)]
    p = make_problem(n, radii, seed=seed, dtype=dtype)
    assert_solved(p, solve(name, p), SOLVE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(n=st.integers(2, 40), batch=st.integers(1, 4), seed=st.integers(0, 2**16),
       radius=st.floats(0.1, 0.95))
def test_cg_solves_symmetric_positive_definite_systems(dtype, n, batch, seed, radius):
    p = make_problem(n, [radius] * batch, seed=seed, symmetric=True, dtype=dtype)
    assert_solved(p, solve("cg", p), SOLVE_TOL[dtype])


def test_cg_rejects_a_nonsymmetric_system_naming_the_alternatives():
    p = make_problem(10, [0.5, 0.5], seed=1)
    with pytest.raises(NonSymmetricError, match="cg_normal") as info:
        CG().solve(p.M, p.b)
    assert "gmres" in str(info.value)


def test_cg_symmetry_probe_costs_two_matvecs_and_leaves_the_global_rng_alone():
    p = make_problem(10, [0.5], seed=1, symmetric=True)
    state = torch.random.get_rng_state()
    with_probe = CG(tol=1e-10).solve(p.M, p.b)
    assert torch.equal(state, torch.random.get_rng_state())
    without = CG(tol=1e-10, check_symmetry=False).solve(p.M, p.b)
    assert with_probe.matvecs == without.matvecs + 2
    torch.testing.assert_close(with_probe.u, without.u)


def test_cg_flags_an_indefinite_system_as_diverged():
    p = make_problem(8, [0.3], seed=2, symmetric=True)
    M = lambda v: 2.0 * v + p.M(v)                 # noqa: E731  I - M = -(I + S): negative definite
    with pytest.raises(DivergenceError, match="positive definite"):
        CG().solve(M, p.b)
    with pytest.warns(ConvergenceWarning, match="positive definite"):
        sol = CG().solve(M, p.b, throw=False)
    assert bool(sol.diverged.all()) and bool(sol.u.isnan().all())


# --- divergence ------------------------------------------------------------------------------------------------------
def test_neumann_raises_divergence_when_the_spectral_radius_exceeds_one():
    p = make_problem(12, [1.3, 0.4], seed=3)
    with pytest.raises(DivergenceError, match="spectral radius") as info:
        NeumannSeries().solve(p.M, p.b)
    assert "gmres" in str(info.value)
    assert bool(info.value.solution.diverged[0]) and bool(info.value.solution.converged[1])


def test_neumann_divergence_with_throw_false_is_flagged_and_never_a_plausible_number():
    p = make_problem(12, [1.3, 0.4], seed=3)
    with pytest.warns(ConvergenceWarning, match="neumann"):
        sol = NeumannSeries(tol=1e-10).solve(p.M, p.b, throw=False)
    assert sol.diverged.tolist() == [True, False]
    assert sol.converged.tolist() == [False, True]
    assert bool(sol.u[0].isnan().all())
    torch.testing.assert_close(sol.u[1], p.u[1], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["cg_normal", "gmres", "bicgstab", "dense", "gcrodr"])
def test_krylov_solvers_solve_what_neumann_cannot(name):
    p = make_problem(12, [1.3, 1.6], seed=3)
    assert_solved(p, solve(name, p), SOLVE_TOL[torch.float64])


@pytest.mark.parametrize("name", ITERATIVE)
def test_running_out_of_iterations_is_a_convergence_error_not_a_divergence(name):
    p = problem_for(name, 30, [0.95], seed=4)
    with pytest.raises(ConvergenceError, match="max_iter") as info:
        solve(name, p, max_iter=2)
    assert not isinstance(info.value, DivergenceError)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        sol = solve(name, p, max_iter=2, throw=False)
    assert not bool(sol.converged.any()) and not bool(sol.diverged.any())
    assert bool(torch.isfinite(sol.u).all()) and sol.iterations.tolist() == [2]


def test_bicgstab_breakdown_is_reported_not_nan():
    # I - M = [[0, -1], [1, 0]]: <r, (I - M) r> = 0 for every r, so BiCGSTAB breaks down at once
    A = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]], dtype=torch.float64)
    p = Problem(torch.eye(2, dtype=torch.float64) - A, torch.tensor([[1.0, 2.0]], dtype=torch.float64),
                torch.linalg.solve(A, torch.tensor([[1.0, 2.0]], dtype=torch.float64).unsqueeze(-1)).squeeze(-1))
    with pytest.raises(ConvergenceError, match="broke down") as info:
        BiCGSTAB().solve(p.M, p.b)
    assert "gmres" in str(info.value)
    assert bool(torch.isfinite(info.value.solution.u).all())
    assert_solved(p, GMRES(tol=1e-12).solve(p.M, p.b), 1e-12)


def test_dense_reports_a_singular_system():
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(6, 6, generator=g, dtype=torch.float64)
    singular = Q @ torch.diag(torch.tensor([1.0, 0.5, 0.2, -0.3, 0.1, 0.0], dtype=torch.float64)) @ torch.inverse(Q)
    p = make_problem(6, [0.5, 0.5], seed=5)
    p.Mmat[0] = singular                              # J has eigenvalue 1 in sample 0
    with pytest.raises(SingularSystemError, match="singular"):
        Dense().solve(p.M, p.b)
    with pytest.warns(ConvergenceWarning, match="eigenvalue 1"):
        sol = Dense().solve(p.M, p.b, throw=False)
    assert sol.diverged.tolist() == [True, False] and bool(sol.u[0].isnan().all())


# --- per-sample stopping ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ITERATIVE)
def test_easy_sample_stops_early_unaffected_by_the_hard_one(name):
    p = problem_for(name, 30, [0.1, 0.95], seed=6)
    sol = solve(name, p)
    assert_solved(p, sol, SOLVE_TOL[torch.float64])
    easy, hard = sol.iterations.tolist()
    assert easy < hard
    assert bool((sol.residuals[easy:, 0] == sol.residuals[-1, 0]).all())     # frozen once stopped
    alone = solve(name, Problem(p.Mmat[:1], p.b[:1], p.u[:1]))
    assert alone.iterations.tolist() == [easy]
    torch.testing.assert_close(sol.u[0], alone.u[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_zero_right_hand_side_rows_give_zero_and_count_as_converged(name):
    p = problem_for(name, 8, [0.5, 0.5], seed=7)
    p.b[1] = 0.0
    sol = solve(name, p, x0=torch.ones_like(p.b))
    assert sol.converged.all() and sol.iterations[1] == 0
    assert bool((sol.u[1] == 0).all()) and float(sol.residual[1]) == 0.0


# --- warm start and preconditioning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_exact_initial_guess_converges_in_zero_iterations(name):
    p = problem_for(name, 10, [0.9, 0.5], seed=8)
    sol = solve(name, p, x0=p.u.clone())
    assert sol.converged.all() and sol.iterations.tolist() == [0, 0]
    assert sol.residuals.shape == (1, 2) and sol.matvecs == 1
    torch.testing.assert_close(sol.u, p.u)


@pytest.mark.parametrize("name", ITERATIVE)
def test_warm_start_near_the_solution_takes_fewer_iterations(name):
    p = problem_for(name, 20, [0.9], seed=8)
    cold = solve(name, p)
    warm = solve(name, p, x0=(p.u + 1e-5 * torch.randn(p.u.shape, generator=torch.Generator().manual_seed(0),
                                                        dtype=p.u.dtype)))
    assert_solved(p, warm, SOLVE_TOL[torch.float64])
    assert int(warm.iterations.max()) < int(cold.iterations.max())


@pytest.mark.parametrize("name", ITERATIVE)
def test_exact_preconditioner_converges_in_one_or_two_iterations(name):
    p = problem_for(name, 20, [0.95, 0.9], seed=9)
    sol = solve(name, p, preconditioner=p.inverse)
    assert_solved(p, sol, SOLVE_TOL[torch.float64])
    assert int(sol.iterations.max()) <= 2


@pytest.mark.parametrize("name", ["neumann", "cg_normal", "gmres", "bicgstab", "gcrodr"])
def test_reported_residual_is_the_true_unpreconditioned_one(name):
    p = make_problem(20, [0.95, 0.9], seed=10)
    rough = torch.eye(20, dtype=p.A.dtype) - 0.9 * p.Mmat          # P = (I - 0.9 M)^{-1} ~ A^{-1}, not exact
    P = lambda v: torch.linalg.solve(rough, v.unsqueeze(-1)).squeeze(-1)          # noqa: E731
    sol = solve(name, p, preconditioner=P, tol=1e-6)
    assert_solved(p, sol, 1e-6)
    torch.testing.assert_close(sol.residual, p.residual(sol.u), rtol=1e-6, atol=1e-14)


# --- bookkeeping -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["neumann", "cg", "cg_normal", "gmres", "bicgstab", "gcrodr"])
def test_matvec_counts_equal_the_calls_of_M_and_MT(name):
    p = problem_for(name, 15, [0.8, 0.6, 0.3], seed=11)
    M, MT = Counter(p.M), Counter(p.MT)
    sol = solver(name, 15).solve(M, p.b, MT=MT, x0=torch.zeros_like(p.b))
    assert sol.converged.all()
    assert sol.matvecs == M.calls and sol.rmatvecs == MT.calls
    assert sol.rmatvecs == (int(sol.iterations.max()) if name == "cg_normal" else 0)


def test_dense_counts_n_matvecs_for_the_matrix_whether_or_not_vmap_works():
    p = make_problem(12, [0.8, 0.6], seed=11)
    vmappable = Counter(p.M)
    sol = Dense().solve(vmappable, p.b)
    assert sol.matvecs == 12 + vmappable.calls - 1          # one vmap call makes the 12 columns

    def not_vmappable(v):
        assert v.abs().max().item() >= 0                    # .item() is not allowed under vmap
        return p.M(v)

    looped = Counter(not_vmappable)
    sol = Dense().solve(looped, p.b)
    assert sol.matvecs == 12 + 1 and looped.calls == sol.matvecs + 1     # + the vmap attempt that failed
    torch.testing.assert_close(sol.u, p.u)


@pytest.mark.parametrize("name", ALL)
def test_residual_trace_has_a_row_per_iteration_starting_from_the_initial_guess(name):
    p = problem_for(name, 12, [0.9, 0.2, 0.5], seed=12)
    x0 = torch.randn(p.b.shape, generator=torch.Generator().manual_seed(0), dtype=p.b.dtype)
    sol = solve(name, p, x0=x0)
    assert sol.residuals.shape[1] == 3
    assert sol.residuals.shape[0] - 1 >= int(sol.iterations.max())     # equal unless a sample sat out a cycle
    # row 0 is the residual of the guess actually used: x0, or zero where x0 was worse than zero
    guess = p.residual(x0)
    worse = guess > 1
    torch.testing.assert_close(sol.residuals[0], torch.where(worse, torch.ones_like(guess), guess))
    assert torch.equal(sol.rejected_guess, worse)
    torch.testing.assert_close(sol.residual, p.residual(sol.u), rtol=1e-6, atol=1e-14)
    assert "converged" in sol.message


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "neumann", "cg_normal", "gcrodr"])
def test_a_good_initial_guess_is_used_and_a_bad_one_is_dropped(name):
    p = problem_for(name, 40, [0.9, 0.2, 0.5], seed=3)
    cold = solve(name, p)
    exact = cold.u
    g = torch.Generator().manual_seed(1)
    good = exact + 1e-4 * torch.randn(exact.shape, generator=g, dtype=exact.dtype)
    bad = exact + 1e3 * torch.randn(exact.shape, generator=g, dtype=exact.dtype)
    x0 = torch.stack([good[0], bad[1], good[2]])
    sol = solve(name, p, x0=x0)
    assert sol.rejected_guess.tolist() == [False, True, False]
    torch.testing.assert_close(sol.residuals[0], torch.stack([p.residual(x0)[0], torch.tensor(1.0, dtype=x0.dtype),
                                                              p.residual(x0)[2]]))
    assert sol.converged.all()
    assert int(sol.iterations[0]) < int(cold.iterations[0])
    assert int(sol.iterations[2]) < int(cold.iterations[2])


def test_gmres_needs_as_many_matvecs_as_scipy():
    n = 120
    g = torch.Generator().manual_seed(13)
    W = 0.9 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5    # eigenvalues fill a disk
    b = torch.randn(1, n, generator=g, dtype=torch.float64)
    A = np.eye(n) - W.numpy()
    calls = []
    op = spla.LinearOperator((n, n), matvec=lambda x: calls.append(1) or A @ x, dtype=np.float64)
    _, info = spla.gmres(op, b[0].numpy(), rtol=1e-8, atol=0.0, restart=n, maxiter=5)
    assert info == 0
    sol = GMRES(tol=1e-8, restart=n).solve(lambda v: v @ W.T, b)
    assert sol.converged.all()
    assert abs(sol.matvecs - len(calls)) <= max(2, 0.1 * len(calls)), (sol.matvecs, len(calls))


@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), radius=st.sampled_from([0.3, 0.9, 0.99]),
       restart=st.integers(1, 45), tol=st.sampled_from([1e-4, 1e-8]),
       preconditioned=st.booleans(), guess=st.booleans())
def test_gmres_single_sample_path_matches_the_batched_one(seed, n, radius, restart, tol, preconditioned, guess):
    # a batch of one runs its Hessenberg problem on the host; a batch of two copies runs the batched cycle:
    # the same iterates, residual trace, iteration count and matvecs, up to round-off (tolerances well above
    # round-off, where the two arithmetics could stop one step apart)
    g = torch.Generator().manual_seed(seed)
    W = nonsymmetric_matrix(n, radius, g)
    b = torch.randn(1, n, generator=g, dtype=torch.float64)
    x0 = torch.randn(1, n, generator=g, dtype=torch.float64) if guess else None
    P = None
    if preconditioned:
        D = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        P = lambda v: v @ D.T                                                             # noqa: E731
    solver = GMRES(tol=tol, restart=restart, max_iter=3 * n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = solver.solve(lambda v: v @ W.T, b, x0=x0, preconditioner=P, throw=False)
        two = solver.solve(lambda v: v @ W.T, b.repeat(2, 1), x0=None if x0 is None else x0.repeat(2, 1),
                           preconditioner=P, throw=False)
    assert one.matvecs == two.matvecs
    assert int(one.iterations[0]) == int(two.iterations[0])
    assert bool(one.converged[0]) == bool(two.converged[0])
    assert one.residuals.shape[0] == two.residuals.shape[0]
    scale = float(one.u.norm()) + 1.0
    assert float((one.u[0] - two.u[0]).norm()) <= 1e-8 * scale
    floor = 1e-12
    assert torch.allclose(one.residuals[:, 0], two.residuals[:, 0], rtol=1e-5, atol=floor)


# --- inputs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_nan_in_b_or_x0_raises_nonfinite_naming_the_tensor(name):
    p = problem_for(name, 5, [0.5], seed=14)
    b = p.b.clone()
    b[0, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\bb\b"):
        solver(name, 5).solve(p.M, b, MT=p.MT)
    x0 = torch.zeros_like(p.b)
    x0[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="x0"):
        solver(name, 5).solve(p.M, p.b, MT=p.MT, x0=x0)


@pytest.mark.parametrize("name", ALL)
def test_shape_mismatches_raise_shape_error(name):
    p = problem_for(name, 5, [0.5, 0.5], seed=15)
    with pytest.raises(ShapeError, match="x0"):
        solver(name, 5).solve(p.M, p.b, MT=p.MT, x0=torch.zeros(2, 4, dtype=p.b.dtype))
    with pytest.raises(ShapeError, match=r"\[B, n\]"):
        solver(name, 5).solve(p.M, p.b[0], MT=p.MT)
    with pytest.raises(ShapeError, match="M returned"):
        solver(name, 5).solve(lambda v: p.M(v)[:, :4], p.b, MT=p.MT)


def test_unknown_solver_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="neumann, cg, cg_normal, gmres, bicgstab, dense"):
        get_solver("lsqr")


def test_get_solver_builds_the_named_config():
    assert set(SOLVERS) == set(ALL)
    assert get_solver("gmres", tol=1e-3, restart=5) == GMRES(tol=1e-3, restart=5)
    assert isinstance(get_solver("cg_normal"), NormalCG)
    with pytest.raises(TypeError, match="restart"):
        get_solver("gmres", restrat=5)


def test_normal_cg_needs_a_differentiable_preconditioner_for_its_transpose():
    p = make_problem(5, [0.5], seed=16)
    P = lambda v: torch.from_numpy(v.detach().numpy().copy())   # noqa: E731  linear, but opaque to autograd
    with pytest.raises(ValueError, match="gmres"):
        NormalCG().solve(p.M, p.b, MT=p.MT, preconditioner=P)
    with pytest.raises(ValueError, match="gmres"):
        NormalCG().solve(p.M, p.b, MT=p.MT, preconditioner=lambda v: torch.from_numpy(v.numpy()))


def test_normal_cg_without_MT_names_itself():
    p = make_problem(5, [0.5], seed=16)
    with pytest.raises(ValueError, match="cg_normal.*MT"):
        NormalCG().solve(p.M, p.b)


# --- devices ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL)
def test_solvers_run_on_the_device_of_b(name, device):
    p = problem_for(name, 10, [0.8, 0.4], seed=17, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve(name, p)
    assert sol.u.device.type == device and sol.residuals.device.type == device
    torch.testing.assert_close(sol.u.cpu(), p.u.cpu(), rtol=1e-7, atol=1e-9)
