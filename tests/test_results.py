"""One result shape with a per-sample status (#16 item 3), and warnings that point at the user's line and are
summarised when repeated, never dropped (#17 item 7)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers import contractive_tanh
from linsolve_helpers import make_problem

import fpgrad
from fpgrad.errors import ConvergenceError, ConvergenceWarning
from fpgrad.estimators import Implicit, Neumann
from fpgrad.forward import LowRankInverse
from fpgrad.linsolve import CG, GMRES, Dense, NeumannSeries
from fpgrad.results import FixedPoint, LinearSolution, SeriesResidual, Status, report, reset_warnings


def case(n=20, lipschitz=0.9, batch=2, seed=0):
    m = contractive_tanh(n, lipschitz, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return m, x


def loss(z):
    return (z ** 2).sum()


# --- one result shape ---------------------------------------------------------------------------------------------
def test_the_result_types_live_in_one_module_and_are_re_exported():
    assert fpgrad.forward.FixedPoint is FixedPoint and fpgrad.FixedPoint is FixedPoint
    assert fpgrad.linsolve.LinearSolution is LinearSolution
    assert fpgrad.estimators.SeriesResidual is SeriesResidual
    assert fpgrad.estimators.Gradient is fpgrad.results.Gradient
    assert fpgrad.estimators.CostRecord is fpgrad.results.CostRecord


def test_status_names_read_as_messages():
    assert Status.CONVERGED.ok and Status.TRUNCATED.ok and not Status.MAX_ITER.ok
    assert Status.SINGULAR.diverged and not Status.STAGNATED.diverged
    assert "max_iter" in Status.MAX_ITER.message and "singular" in Status.SINGULAR.message


def test_compute_never_warns_and_each_sample_carries_its_status():
    p = make_problem(12, [1.3, 0.4], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neumann = NeumannSeries(tol=1e-10).compute(p.M, p.b)
        short = GMRES(max_iter=2).compute(make_problem(30, [0.95], seed=4).M, make_problem(30, [0.95], seed=4).b)
        sym = make_problem(8, [0.3], seed=2, symmetric=True)
        indefinite = CG().compute(lambda v: 2.0 * v + sym.M(v), sym.b)
    assert neumann.statuses == [Status.DIVERGED, Status.CONVERGED]
    assert short.statuses == [Status.MAX_ITER] and not short.ok
    assert indefinite.statuses == [Status.INDEFINITE]
    assert torch.equal(neumann.relative_residual, neumann.residuals[-1])


def test_dense_singular_sample_has_status_singular():
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(6, 6, generator=g, dtype=torch.float64)
    p = make_problem(6, [0.5, 0.5], seed=5)
    p.Mmat[0] = Q @ torch.diag(torch.tensor([1.0, 0.5, 0.2, -0.3, 0.1, 0.0], dtype=torch.float64)) @ torch.inverse(Q)
    assert Dense().compute(p.M, p.b).statuses == [Status.SINGULAR, Status.CONVERGED]


def test_report_raises_with_the_result_attached_or_warns_once():
    p = make_problem(30, [0.95], seed=4)
    sol = GMRES(max_iter=2).compute(p.M, p.b)
    with pytest.raises(ConvergenceError, match="max_iter") as info:
        report(sol, throw=True)
    assert info.value.solution is sol
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        assert report(sol) is sol


def test_fixed_point_status_and_typed_inverse():
    m, x = case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        short = fpgrad.solve(m, x, method="iterate", max_iter=3)
    assert short.statuses == [Status.MAX_ITER] * 2 and not short.ok
    assert torch.equal(short.iterations, short.steps)
    assert torch.equal(short.relative_residual, short.relative_residuals[-1])
    broyden = fpgrad.solve(m, x, method="broyden", tol=1e-10)
    assert broyden.ok and isinstance(broyden.inverse, LowRankInverse) and short.inverse is None
    one = fpgrad.solve(m, x[0], method="anderson", tol=1e-10)         # one unbatched sample: a 0-dim status
    assert one.status.dim() == 0 and one.statuses == [Status.CONVERGED]


def test_a_gradient_carries_the_status_of_its_solves():
    m, x = case()
    g = fpgrad.gradient(m, x, loss, estimator=Implicit(tol=1e-10))
    assert g.ok and g.statuses == [Status.CONVERGED] * 2
    series = fpgrad.gradient(m, x, loss, estimator=Neumann(2))
    assert series.series.statuses == [Status.TRUNCATED] * 2 and series.ok
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        short = fpgrad.gradient(m, x, loss, estimator=Implicit(tol=1e-12, max_iter=1))
    assert short.statuses == [Status.MAX_ITER] * 2 and not short.ok and "did not converge" in short.message
    with pytest.raises(ConvergenceError, match="did not converge"):      # a boundary with throw=True
        report(short, throw=True)
    assert report(g, throw=True) is g


# --- warnings point at the user's line (#17 item 7) ---------------------------------------------------------------


@pytest.fixture
def log():
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def test_a_forward_warning_points_at_the_callers_line(log):
    m, x = case()
    line = inspect.currentframe().f_lineno + 1
    fpgrad.solve(m, x, method="iterate", max_iter=2)
    (w,) = [w for w in log if issubclass(w.category, ConvergenceWarning)]
    assert (w.filename, w.lineno) == (__file__, line)


def test_an_adjoint_warning_from_gradient_points_at_the_callers_line(log):
    m, x = case()
    line = inspect.currentframe().f_lineno + 1
    fpgrad.gradient(m, x, loss, estimator=Implicit(tol=1e-12, max_iter=1))
    ws = [w for w in log if issubclass(w.category, ConvergenceWarning)]
    assert ws and all((w.filename, w.lineno) == (__file__, line) for w in ws)


def test_an_adjoint_warning_inside_loss_backward_points_at_the_backward_call(log):
    m, x = case()
    params = {k: v.detach().clone().requires_grad_() for k, v in m.params.items()}
    z = fpgrad.fixed_point(m.step, params, x, m.init_state(x, None), backward=Implicit(tol=1e-12, max_iter=1))
    line = inspect.currentframe().f_lineno + 1
    loss(z).backward()
    ws = [w for w in log if issubclass(w.category, ConvergenceWarning)]
    assert len(ws) == 1 and "adjoint solve did not converge" in str(ws[0].message)
    assert (ws[0].filename, ws[0].lineno) == (__file__, line)       # not torch/autograd/function.py


def test_a_warning_repeated_every_training_step_is_summarised_and_every_result_keeps_its_flag():
    m, x = case()
    reset_warnings()
    results = []
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")          # Python's default action: where fpgrad summarises repeats
        for _ in range(20):
            results.append(fpgrad.gradient(m, x, loss, estimator=Implicit(tol=1e-12, max_iter=1)))
    ws = [w for w in log if issubclass(w.category, ConvergenceWarning)]
    assert len(ws) == 2
    assert "repeated" not in str(ws[0].message) and "did not converge" in str(ws[0].message)
    assert "(repeated 10 times since" in str(ws[1].message)
    assert all(w.filename == __file__ for w in ws)
    assert all(r.statuses == [Status.MAX_ITER] * 2 and not r.ok for r in results)


def test_a_user_filter_of_always_shows_every_repeat():
    m, x = case()
    reset_warnings()
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        for _ in range(3):
            fpgrad.gradient(m, x, loss, estimator=Implicit(tol=1e-12, max_iter=1))
    assert len([w for w in log if issubclass(w.category, ConvergenceWarning)]) == 3


def test_a_user_filter_of_error_raises_the_warning():
    m, x = case()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match="did not converge"):
            fpgrad.solve(m, x, method="iterate", max_iter=2)


def test_gradient_throw_raises_on_an_unconverged_adjoint_and_carries_the_result():
    import fpgrad
    from fpgrad.errors import ConvergenceError
    from fpgrad.estimators import Implicit

    m = fpgrad.maps.tanh_rnn(n=16, spectral_radius=0.99, seed=0, dtype=torch.float64)
    x = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    est = Implicit(solver="gmres", tol=1e-14, max_iter=2)
    with pytest.raises(ConvergenceError) as info:
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=est, throw=True)
    assert info.value.solution.solve is not None and not bool(info.value.solution.solve.converged.all())
    g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Implicit(solver="dense"), throw=True)
    assert g.ok
