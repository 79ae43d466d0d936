"""GMRES ends its last cycle with the residual formed from its basis, r = V (beta e1 - Hbar y), instead of a fresh
product b - A u, wherever no later cycle needs a true residual and rounding cannot change a sample's verdict
(_Run.close, gmres.recurrence_bound). References: the same solve with the product forced, and residuals computed
in float64 from the operator's own matrix."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from linsolve_helpers import Problem

from fpgrad.linsolve import GCRODR, GMRES, _common
from fpgrad.linsolve._common import CONVERGED, MAX_ITER


def contraction(B: int, n: int, rho: float, seed: int, dtype=torch.float64, normal: bool = True) -> Problem:
    """M = W: [B, n, n] with ||W||_2 = rho (normal=False: rho I plus a strictly upper triangular part of norm
    about 1, far from normal), b: [B, n]; Problem.residual recomputes a residual in float64 from the operator's
    own (cast) matrix."""
    g = torch.Generator().manual_seed(seed)
    if normal:
        W = torch.randn(B, n, n, generator=g, dtype=torch.float64)
        W = W / torch.linalg.matrix_norm(W, 2).view(B, 1, 1) * rho
    else:
        W = torch.triu(torch.randn(B, n, n, generator=g, dtype=torch.float64), 1) / math.sqrt(n)
        W = W + rho * torch.eye(n, dtype=torch.float64)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - W, b.unsqueeze(2)).squeeze(2)
    return Problem(W.to(dtype), b.to(dtype), u)


SOLVERS = {
    "rotated (check_every 1)": (GMRES(tol=1e-10, restart=80, check_every=1), 3),
    "deferred (check_every 4)": (GMRES(tol=1e-10, restart=80, check_every=4), 3),
    "batch of one": (GMRES(tol=1e-10, restart=80), 1),
    "gcrodr, first solve": (GCRODR(tol=1e-10, restart=80, k=4), 3),
}


def forced(monkeypatch):
    """Make every cycle end with the true residual's product (the behaviour before the recurrence)."""
    monkeypatch.setattr(_common._Run, "close", lambda run, mask: (setattr(run, "recurrence", None),
                                                                  run.refresh(mask)))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_converged_solve_spends_no_product_on_its_last_residual(name, monkeypatch):
    solver, B = SOLVERS[name]
    p = contraction(B, 60, 0.9, seed=1)
    saved = solver.solve(p.M, p.b)
    forced(monkeypatch)
    reference = solver.solve(p.M, p.b)
    assert saved.converged.all() and reference.converged.all()
    assert saved.iterations.tolist() == reference.iterations.tolist()
    assert saved.matvecs == reference.matvecs - 1, (saved.matvecs, reference.matvecs)
    torch.testing.assert_close(saved.u, reference.u, rtol=0, atol=1e-12)
    # the reported last residual is the returned u's: against the float64 residual of the same matrix
    exact = p.residual(saved.u)
    assert (exact <= 1e-10).all(), exact
    torch.testing.assert_close(saved.residuals[-1], exact, rtol=1e-3, atol=1e-15)


def test_restarted_cycles_start_from_true_residuals():
    """Only the last cycle is spared its product: each restart still needs b - A u."""
    p = contraction(1, 60, 0.95, seed=2)
    restart = 6
    sol = GMRES(tol=1e-10, restart=restart, max_iter=400).solve(p.M, p.b)
    iterations = int(sol.iterations.max())
    cycles = math.ceil(iterations / restart)
    assert cycles > 3
    assert sol.matvecs == iterations + cycles - 1
    assert (p.residual(sol.u) <= 1e-10).all()


def test_a_preconditioned_solve_keeps_its_product():
    """The bound does not cover a preconditioner's rounding (||A|| ||P|| may be far above ||A P||)."""
    p = contraction(3, 60, 0.9, seed=3)
    sol = GMRES(tol=1e-10, restart=80, check_every=1).solve(p.M, p.b, preconditioner=lambda v: 1.5 * v)
    assert sol.converged.all()
    assert sol.matvecs == int(sol.iterations.max()) + 1


@pytest.mark.parametrize("check_every", [1, 4])
def test_the_end_of_the_budget_reports_the_formed_residual(check_every, monkeypatch):
    """tol = 0, max_iter = 12: no sample can converge; the last residual needs no product to be reported."""
    p = contraction(3, 60, 0.9, seed=4)
    solver = GMRES(tol=0.0, restart=80, max_iter=12, check_every=check_every)
    sol = solver.compute(p.M, p.b)
    assert (sol.status == MAX_ITER).all()
    assert sol.matvecs == 12
    exact = p.residual(sol.u)
    torch.testing.assert_close(sol.residuals[-1], exact, rtol=1e-6, atol=0)
    forced(monkeypatch)
    assert solver.compute(p.M, p.b).matvecs == 13


def test_a_bfloat16_solve_checks_with_a_product():
    """At bfloat16's eps the bound is of the tolerance's size: the verdict is decided by the product."""
    p = contraction(3, 40, 0.8, seed=5, dtype=torch.bfloat16)
    sol = GMRES(tol=5e-2, restart=40, check_every=1).compute(p.M, p.b)
    assert sol.matvecs == int(sol.iterations.max()) + 1
    converged = sol.status == CONVERGED
    assert converged.any()
    assert (p.residual(sol.u)[converged] <= 5e-2 * 1.1).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(8, 120), B=st.integers(1, 4),
       rho=st.sampled_from([0.5, 0.9, 0.99, 0.999]), normal=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), check_every=st.sampled_from([1, 4]),
       restart=st.sampled_from([10, 200]))
def test_a_sample_called_converged_is_converged(seed, n, B, rho, normal, dtype, check_every, restart):
    """Whatever the conditioning (a far-from-normal I - W has ||u|| orders above ||b||, where the formed and the
    product residual differ most) and the dtype: a converged sample's residual, recomputed in float64 from the
    operator's own matrix, meets the tolerance, and every reported final residual is that residual up to the
    rounding of a product."""
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    p = contraction(B, n, rho, seed, dtype=dtype, normal=normal)
    sol = GMRES(tol=tol, restart=restart, max_iter=300, check_every=check_every).compute(p.M, p.b)
    exact = p.residual(sol.u)
    converged = sol.status == CONVERGED
    assert (exact[converged] <= 1.1 * tol).all(), (exact, sol.status)
    eps = torch.finfo(dtype).eps
    # a product's rounding: eps ||I - W|| ||u|| (relative to ||b||), far above eps where ||u|| >> ||b||
    scale = (1 + torch.linalg.matrix_norm(p.Mmat.double(), 2)) * sol.u.double().norm(dim=1) / p.b.double().norm(dim=1)
    finite = torch.isfinite(sol.residuals[-1])
    gap = (sol.residuals[-1].double() - exact).abs()
    assert (gap[finite] <= 100 * eps * math.sqrt(n) * scale[finite] + 1e-3 * exact[finite]).all(), (gap, scale)


def test_the_bound_holds_the_measured_gaps_with_room(monkeypatch):
    """The gap between the formed residual and a fresh product, over normal and far-from-normal maps (whose
    restarted cycles start from an iterate orders above ||b||), n 50-1500, float64 and float32, both GMRES
    loops: at most a quarter of recurrence_bound."""
    ratios: dict = {}
    close = _common._Run.close
    case: list = []

    def spy(run, mask):
        if run.recurrence is not None and bool(mask.any()):
            r, bound = run.recurrence
            fresh = run.b - run.A(run.u)
            run.matvecs -= 1
            ratio = float(((fresh - r).norm(dim=1) / bound)[mask].max())
            ratios[case[-1]] = max(ratios.get(case[-1], 0.0), ratio)
        return close(run, mask)

    monkeypatch.setattr(_common._Run, "close", spy)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for normal in (True, False):
            for n in (50, 300, 1500):
                for seed in range(2):
                    case.append((str(dtype), normal, n, seed))
                    p = contraction(3, n, 0.99 if normal else 0.9, seed, dtype=dtype, normal=normal)
                    for check_every in (1, 4):
                        GMRES(tol=tol, restart=60, max_iter=300, check_every=check_every).compute(p.M, p.b)
    assert len(ratios) == len(case)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 0.25, (worst, ratios[worst])
