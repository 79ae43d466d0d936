"""Linear solvers as objects (#16 item 2): Implicit takes an object or its name, capabilities are class attributes,
mixed precision is a solver that wraps another, and caller-owned state is passed at the solve, never stored."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import contractive_tanh

import fpgrad
from fpgrad.estimators import CostRecord, Implicit
from fpgrad.linsolve import (
    CG,
    GCRODR,
    GMRES,
    SOLVERS,
    BiCGSTAB,
    Dense,
    MixedPrecision,
    NeumannSeries,
    NormalCG,
    RecycleSpace,
)


def case(n=20, lipschitz=0.9, batch=2, seed=0):
    m = contractive_tanh(n, lipschitz, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return m, x


def grads(m, x, backward, record=None):
    params = {k: v.detach().clone().requires_grad_() for k, v in m.params.items()}
    fw = fpgrad.forward.Anderson(tol=1e-12, max_iter=300)
    z = fpgrad.fixed_point(m.step, params, x, m.init_state(x, None), forward=fw, backward=backward, record=record)
    (z ** 2).sum().backward()
    return torch.cat([params[k].grad.reshape(-1) for k in sorted(params)])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_capability_flags_are_class_attributes_callers_read():
    table = {name: (cls.preconditionable, cls.needs_transpose, cls.symmetric_only, cls.recycles, cls.iterative)
             for name, cls in SOLVERS.items()}
    assert table == {
        "neumann": (True, False, False, False, True),
        "cg": (False, False, True, False, True),
        "cg_normal": (True, True, False, False, True),
        "gmres": (True, False, False, False, True),
        "bicgstab": (True, False, False, False, True),
        "dense": (False, False, False, False, False),
        "gcrodr": (True, False, False, True, True),
    }
    wrapped = MixedPrecision(NormalCG())
    assert wrapped.lowers_precision and wrapped.needs_transpose and wrapped.preconditionable


@pytest.mark.parametrize("solver", [GMRES(restart=5), BiCGSTAB(), NormalCG(), NeumannSeries(), GCRODR(restart=8, k=3)],
                         ids=lambda s: s.name)
def test_implicit_with_a_solver_object_matches_the_dense_gradient(solver):
    m, x = case()
    exact = grads(m, x, Implicit(solver=Dense(), tol=1e-12))
    assert rel(grads(m, x, Implicit(solver=solver, tol=1e-11)), exact) < 1e-8


def test_a_name_with_options_and_the_object_build_the_same_solver():
    by_name = Implicit(solver="gmres", options={"restart": 50}, tol=1e-9)
    by_object = Implicit(solver=GMRES(restart=50), tol=1e-9)
    assert by_name.linear_solver(torch.float64) == by_object.linear_solver(torch.float64) == GMRES(tol=1e-9,
                                                                                                    restart=50)
    m, x = case()
    r1, r2 = CostRecord(), CostRecord()
    assert torch.equal(grads(m, x, by_name, r1), grads(m, x, by_object, r2))
    assert r1.vjps == r2.vjps


def test_tolerance_comes_from_implicit_then_the_object_then_the_dtype():
    assert Implicit(solver=GMRES(), tol=1e-7).linear_solver(torch.float64).tol == 1e-7
    assert Implicit(solver=GMRES(tol=1e-12)).linear_solver(torch.float64).tol == 1e-12
    assert Implicit(solver=GMRES()).linear_solver(torch.float64).tol == 1e-8
    assert Implicit(solver=GMRES()).linear_solver(torch.float32).tol == 1e-4      # what float32 reaches (issue 17)
    assert Implicit(solver=GMRES()).linear_solver(torch.bfloat16).tol == 5e-2
    assert Implicit(solver=Dense(), max_iter=7).linear_solver().max_iter == Dense().max_iter   # not iterative


def test_capabilities_decide_what_implicit_accepts():
    with pytest.raises(ValueError, match="cannot use precondition"):
        Implicit(solver=CG(), precondition="forward")
    with pytest.raises(ValueError, match="iterative"):
        Implicit(solver=Dense(), mixed_precision=torch.float32)
    with pytest.raises(ValueError, match="iterative"):
        MixedPrecision(Dense())
    with pytest.raises(ValueError, match="gcrodr"):
        Implicit(solver=BiCGSTAB(), recycle=RecycleSpace(k=3))
    with pytest.raises(TypeError, match="linear solver object"):
        Implicit(solver=42)


def test_mixed_precision_object_equals_the_shorthand_in_gradient_and_products():
    m, x = case(n=30, lipschitz=0.95)
    shorthand, wrapped = CostRecord(), CostRecord()
    g1 = grads(m, x, Implicit(tol=1e-11, mixed_precision=torch.float32, max_refinements=10), shorthand)
    g2 = grads(m, x, Implicit(solver=MixedPrecision(GMRES(), dtype=torch.float32, max_refinements=10), tol=1e-11),
               wrapped)
    assert torch.equal(g1, g2)
    assert (shorthand.vjps, shorthand.low_precision_vjps) == (wrapped.vjps, wrapped.low_precision_vjps)
    assert wrapped.low_precision_vjps > 0 and bool(wrapped.solves[-1].converged.all())
    assert rel(g2, grads(m, x, Implicit(solver="dense", tol=1e-12))) < 1e-8


def test_mixed_precision_standalone_reaches_full_precision_on_a_matrix():
    g = torch.Generator().manual_seed(3)
    A = fpgrad.maps.random_matrix_with_radius(12, 0.8, g, dtype=torch.float64)
    b = torch.randn(2, 12, generator=g, dtype=torch.float64)
    sol = MixedPrecision(GMRES(tol=1e-12)).solve(lambda v: v @ A, b)      # M = A^T per row
    exact = torch.linalg.solve(torch.eye(12, dtype=torch.float64) - A.T, b.T).T
    assert sol.low_precision_matvecs > 0 and sol.solver == "gmres+refine"
    torch.testing.assert_close(sol.u, exact, rtol=1e-10, atol=1e-12)


def test_the_config_never_changes_and_the_recycle_space_is_passed_at_the_solve():
    space = RecycleSpace(k=3)
    est = Implicit(tol=1e-10, recycle=space, options={"restart": 8})
    assert est.solver == "gmres" and est.solver_name == "gcrodr"
    before = est.__dict__.copy()
    m, x = case()
    for seed in range(2):
        grads(m, x + 0.01 * seed, est)
    assert est.__dict__ == before                       # nothing stored in the config
    assert space.solves == 2 and space.columns > 0      # the caller's state was used and updated
    # handles are left out of equality and hash: two configs that differ only in their state are equal
    other = Implicit(tol=1e-10, recycle=RecycleSpace(k=3), options={"restart": 8})
    assert est == other and hash(Implicit(solver=GCRODR(k=3), recycle=space)) == hash(
        Implicit(solver=GCRODR(k=3), recycle=RecycleSpace(k=3)))


def test_gcrodr_takes_its_space_per_solve_and_other_solvers_refuse_state():
    g = torch.Generator().manual_seed(5)
    A = fpgrad.maps.random_matrix_with_radius(15, 0.95, g, dtype=torch.float64)
    b = torch.randn(1, 15, generator=g, dtype=torch.float64)
    space = RecycleSpace(k=3)
    solver = GCRODR(restart=6, k=3, tol=1e-10)
    first = solver.solve(lambda v: v @ A, b, state=space)
    second = solver.solve(lambda v: v @ A, b + 0.01, state=space)
    assert space.solves == 2 and bool(first.converged.all() and second.converged.all())
    assert int(second.iterations.max()) < int(first.iterations.max())
    with pytest.raises(TypeError, match="gcrodr"):
        GMRES().solve(lambda v: v @ A, b, state=space)
    with pytest.raises(ValueError, match="k=3"):
        GCRODR(k=4, restart=8).solve(lambda v: v @ A, b, state=space)


def test_the_old_solver_name_neumann_still_imports_with_a_deprecation_warning():
    import fpgrad.linsolve as linsolve
    with pytest.warns(DeprecationWarning, match="NeumannSeries"):
        old = linsolve.Neumann
    assert old is NeumannSeries
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SOLVERS["neumann"] is NeumannSeries and NeumannSeries.name == "neumann"
