"""Bad input gets a named error or an honest flag, never a silent wrong number or torch's raw error."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import (
    ConfigError,
    ConvergenceWarning,
    DeviceError,
    DTypeError,
    NonFiniteError,
    NotAMapError,
    ShapeError,
)
from fpgrad.estimators import Neumann, Unrolled


def test_huge_finite_inputs_are_not_reported_converged():
    """float32 x scaled by 3e19: ||f(z) - z|| overflows to inf, and inf <= tol * inf must not stop the solve."""
    m = fpgrad.maps.linear(0.5 * torch.eye(3), torch.eye(3))
    x = torch.full((2, 3), 3e19)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = fpgrad.solve(m, x, z0=torch.zeros(2, 3), max_iter=5)
    assert not bool(sol.converged.any())


@pytest.mark.parametrize("J", [torch.tensor([[0.0, -1.0], [1.0, 0.0]]), -torch.eye(2)], ids=["rotation", "minus-I"])
def test_neumann_series_no_better_than_zero_warns_for_an_orthogonal_jacobian(J):
    """z = J z + x with J orthogonal (rho = 1): the truncated series leaves a relative residual of exactly 1."""
    m = fpgrad.maps.linear(J.double(), torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - m.params["A"], x[0])
    with pytest.warns(ConvergenceWarning, match="as much as or more than u = 0"):
        g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Neumann(5), z0=z_star.unsqueeze(0))
    assert float(g.series.residual.max()) == pytest.approx(1.0, abs=1e-12)


def test_vmap_over_params_through_fixed_point_with_the_default_check():
    A = 0.5 * torch.eye(3, dtype=torch.float64)
    B = torch.eye(3, dtype=torch.float64)
    m = fpgrad.maps.linear(A, B)
    x = torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 3, dtype=torch.float64)

    def total(Bv):
        return fpgrad.fixed_point(m.step, {"A": A, "B": Bv}, x, z0).sum()

    out = torch.func.vmap(total)(torch.stack([B, 2 * B]))
    torch.testing.assert_close(out, torch.stack([2 * x.sum(), 4 * x.sum()]))     # z* = (I - A)^-1 B x


def _vmapped_tanh_solve(x, z0_dtype=torch.float64, step=None):
    m = fpgrad.maps.tanh_rnn(n=4, spectral_radius=0.5, seed=0)
    step = step or m.step

    def one_call(xi):
        return fpgrad.fixed_point(step, m.params, xi, torch.zeros(2, 4, dtype=z0_dtype))
    return torch.func.vmap(one_call)(x)


def test_nan_input_under_vmap_is_named_by_vmapped_call_and_sample_not_blamed_on_the_map():
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    x[1, 1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"under vmap: x contains NaN/Inf in \(vmapped call, sample\) "
                                             r"\[\(1, 1\)\]; fpgrad needs finite inputs"):
        _vmapped_tanh_solve(x)
    x[1, 1, 0] = 0.0
    assert _vmapped_tanh_solve(x).shape == (3, 2, 4)


def test_nan_made_by_the_map_under_vmap_is_reported_with_unfolded_indices():
    m = fpgrad.maps.tanh_rnn(n=4, spectral_radius=0.5, seed=0)

    def step(p, z, x):          # NaN wherever x's first feature is negative: the map's own doing
        return m.step(p, z, x) + torch.sqrt(x[..., :1]) * 0
    x = torch.rand(3, 2, 4, dtype=torch.float64)
    x[2, 0, 0] = -1.0
    with pytest.raises(NonFiniteError, match=r"iteration 0 in \(vmapped call, sample\) \[\(2, 0\)\]"):
        _vmapped_tanh_solve(x, step=step)


def test_dtype_mismatch_under_vmap_is_a_named_dtype_error():
    with pytest.raises(DTypeError, match=r"fixed_point: x has dtype torch.float32 but z has torch.float64"):
        _vmapped_tanh_solve(torch.randn(3, 2, 4))


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.lin(z) + x)


def test_state_of_the_wrong_feature_size_is_a_named_shape_error():
    m = fpgrad.maps.from_module(Cell())
    with pytest.raises(ShapeError, match=r"forward\(z, x\) failed on z of shape \(2, 5\)"):
        fpgrad.fixed_point(m.step, m.params, torch.zeros(2, 5, dtype=torch.float64),
                           torch.zeros(2, 5, dtype=torch.float64))


def test_meta_tensors_are_a_named_device_error():
    m = fpgrad.maps.linear(0.5 * torch.eye(3), torch.eye(3)).to(device="meta")
    with pytest.raises(DeviceError, match="meta tensor .*no values"):
        fpgrad.solve(m, torch.zeros(2, 3, device="meta"), z0=torch.zeros(2, 3, device="meta"))


def test_integer_params_are_a_named_dtype_error():
    m = fpgrad.maps.linear(torch.eye(3, dtype=torch.long), torch.eye(3))
    with pytest.raises(DTypeError, match=r"params\['A'\] has dtype torch.int64; parameters .* must be floating"):
        fpgrad.solve(m, torch.zeros(2, 3), z0=torch.zeros(2, 3))


def test_params_checked_under_vmap_without_reading_their_values():
    """check_inputs under torch.func.vmap: dtypes and devices are still checked, values are left to the solve."""
    from fpgrad._checks import check_inputs
    z = torch.zeros(2, 3, dtype=torch.float64)

    def checked(w):
        check_inputs({"w": w}, z, z)
        return w

    torch.func.vmap(checked)(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(DTypeError, match=r"params\['w'\] has dtype torch.float32"):
        torch.func.vmap(checked)(torch.zeros(4, 3))


@pytest.mark.parametrize("x,z,error,match", [
    (torch.zeros(2, 4), torch.zeros(2, 3), ShapeError, r"mat1 and mat2.*x \(2, 4\) float32"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), DTypeError, r"x \(2, 3\) int64"),
])
def test_a_step_that_fails_on_its_first_call_names_the_shapes_and_dtypes(x, z, error, match):
    from fpgrad._checks import call_step
    m = fpgrad.maps.linear(0.5 * torch.eye(3), torch.eye(3))
    with pytest.raises(error, match=match):
        call_step(m.step, m.params, z, x, where="test")


def test_call_step_checks_the_output_shape():
    from fpgrad._checks import call_step
    with pytest.raises(ShapeError, match=r"changed the state's shape from \(2, 3\) to \(2, 4\)"):
        call_step(lambda p, z, x: torch.zeros(2, 4), {}, torch.zeros(2, 3), torch.zeros(2, 3))


# --- tolerances (issue 17, item 10) ----------------------------------------------------------------------------

def _tolerance_holders(tol):
    return {"solve": lambda: fpgrad.forward.get_forward("iterate", tol=tol),
            "anderson": lambda: fpgrad.forward.get_forward("anderson", tol=tol),
            "gmres": lambda: fpgrad.linsolve.GMRES(tol=tol),
            "dense": lambda: fpgrad.linsolve.Dense(tol=tol),
            "mixed": lambda: fpgrad.linsolve.MixedPrecision(fpgrad.linsolve.GMRES(), tol=tol),
            "implicit": lambda: fpgrad.estimators.Implicit(tol=tol)}


@pytest.mark.parametrize("holder", list(_tolerance_holders(0.0)))
@pytest.mark.parametrize("tol", [-1.0, float("nan")], ids=["negative", "nan"])
def test_negative_or_nan_tolerance_is_a_named_config_error(holder, tol):
    with pytest.raises(ConfigError, match="tol must be a number >= 0"):
        _tolerance_holders(tol)[holder]()


def test_negative_tolerance_of_fpgrad_solve_raises_before_solving():
    m = fpgrad.maps.linear(0.5 * torch.eye(3), torch.eye(3))
    with pytest.raises(ConfigError, match="tol must be a number >= 0, got tol=-1"):
        fpgrad.solve(m, torch.ones(2, 3), tol=-1)
    with pytest.raises(ConfigError, match="atol must be a number >= 0, got atol=nan"):
        fpgrad.solve(m, torch.ones(2, 3), atol=float("nan"))


def test_relative_tolerance_of_one_or_more_warns_that_it_returns_the_initial_guess():
    m = fpgrad.maps.linear(0.5 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="tol=1e\\+10 >= 1 is met before the first iteration"):
        sol = fpgrad.solve(m, x, tol=1e10)
    assert bool(sol.converged.all()) and float(sol.z.abs().max()) == 0.0     # z0, flagged converged: warned
    with pytest.warns(UserWarning, match="Implicit: relative tol=2 >= 1"):
        est = fpgrad.estimators.Implicit(tol=2.0)
    with pytest.warns(UserWarning, match="zero gradient"):
        g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=est)
    assert float(g.flat().abs().max()) == 0.0


# --- estimator configs (issue 17, item 13) ---------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [(lambda: Unrolled(0), "T .* must be an int >= 1, got T=0"),
                                         (lambda: Unrolled(-3), "got T=-3"),
                                         (lambda: Neumann(-1), "k must be an int >= 0"),
                                         (lambda: fpgrad.estimators.get_estimator("unrolled-0"), "got T=0")],
                         ids=["unrolled-0", "unrolled-negative", "neumann-negative", "unrolled-0-string"])
def test_estimator_of_no_iterations_is_rejected_at_construction(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_unrolled_accepts_its_T_in_the_name_as_neumann_does():
    assert fpgrad.estimators.get_estimator("unrolled-300") == Unrolled(300)
    assert fpgrad.estimators.get_estimator("Unrolled_7") == Unrolled(7)


@pytest.mark.parametrize("call", ["fixed_point", "gradient"])
def test_forward_ignored_by_unrolled_is_said(call):
    m = fpgrad.maps.linear(0.5 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    x = torch.ones(2, 3, dtype=torch.float64)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="forward='broyden' is ignored by Unrolled\\(30\\)"):
        if call == "gradient":
            fpgrad.gradient(m, x, lambda z: z.sum(), estimator="unrolled-30", z0=z0, forward="broyden")
        else:
            fpgrad.fixed_point(m.step, m.params, x, z0, forward="broyden", backward=Unrolled(30))


def test_forward_used_by_the_estimator_is_not_warned_about():
    m = fpgrad.maps.linear(0.5 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    x = torch.ones(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpgrad.fixed_point(m.step, m.params, x, torch.zeros(2, 3, dtype=torch.float64), forward="broyden",
                           backward="one_step")
        fpgrad.gradient(m, x, lambda z: z.sum(), estimator=Unrolled(5))      # no forward= given: nothing to say


# --- an empty batch (issue 17, item 12) ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["iterate", "anderson", "broyden"])
def test_empty_batch_solve_returns_empty_results(method):
    m = fpgrad.maps.slot_attention(dim=8, num_slots=3, seed=0)
    sol = fpgrad.solve(m, torch.randn(0, 5, 8, dtype=m.dtype), method=method)
    assert sol.z.shape == (0, 3, 8) and sol.converged.shape == (0,) and sol.steps.shape == (0,)
    assert "empty batch" in sol.message


@pytest.mark.parametrize("estimator", ["implicit", "implicit-dense", "implicit-bicgstab", "implicit-cg_normal",
                                       "implicit-neumann", "implicit-gcrodr", "neumann-3", "phantom-3", "one_step",
                                       "truncated-2", "unrolled-3"])
def test_empty_batch_gradient_is_zero_and_empty(estimator):
    m = fpgrad.maps.tanh_rnn(n=4, spectral_radius=0.5, seed=0)
    x = torch.randn(0, 4, dtype=m.dtype)
    g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=estimator)
    assert g.z.shape == (0, 4) and g.x.shape == (0, 4) and g.ok
    for k, v in g.params.items():                 # a sum over no samples: exactly zero, the right shape
        assert v.shape == m.params[k].shape and not bool(v.any())


def test_empty_batch_through_fixed_point_backward():
    A = torch.nn.Parameter(0.5 * torch.eye(3, dtype=torch.float64))
    m = fpgrad.maps.linear(A.detach(), torch.eye(3, dtype=torch.float64))
    x = torch.ones(0, 3, dtype=torch.float64)
    z = fpgrad.fixed_point(m.step, {"A": A, "B": m.params["B"]}, x, torch.zeros(0, 3, dtype=torch.float64))
    assert z.shape == (0, 3)
    z.sum().backward()
    assert A.grad is not None and not bool(A.grad.any())


# --- messages (issue 17, item 15) --------------------------------------------------------------------------------

@pytest.mark.parametrize("method, advised, not_advised", [("anderson", "method='broyden'", "'anderson'"),
                                                           ("broyden", "method='anderson'", "'broyden'"),
                                                           ("iterate", "method='anderson' / 'broyden'", None)])
def test_forward_at_its_cap_never_advises_the_method_that_failed(method, advised, not_advised):
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    J = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    m = fpgrad.maps.linear(0.99 * J, torch.eye(8, dtype=torch.float64))     # slow for every method at 3 steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = fpgrad.solve(m, x, method=method, max_iter=3)
    assert not bool(sol.converged.all())
    cause = sol.message.split(";", 1)[1]
    assert advised in cause
    if not_advised is not None:
        assert not_advised not in cause


def test_a_map_and_input_tuple_passed_as_the_map_is_named():
    m = fpgrad.maps.linear(0.5 * torch.eye(3), torch.eye(3))
    x = torch.ones(2, 3)
    with pytest.raises(NotAMapError, match=r"pass the map, not a tuple \(Map, Tensor\)"):
        fpgrad.solve((m, x), x)
    with pytest.raises(NotAMapError, match="pass the map, not a tuple"):
        fpgrad.gradient((m, x), x, lambda z: z.sum())
    with pytest.raises(NotAMapError, match="expected an fpgrad.maps.Map, got Linear.*from_module"):
        fpgrad.solve(nn.Linear(3, 3), x)


def test_cost_record_repr_is_short_and_names_counts():
    m = fpgrad.maps.tanh_rnn(n=64, spectral_radius=0.5, seed=0)
    record = fpgrad.estimators.CostRecord()
    x = torch.randn(32, 64, dtype=m.dtype)
    z = fpgrad.fixed_point(m.step, m.params, x, torch.zeros_like(x), record=record)
    assert z.shape == x.shape
    text = repr(record)
    assert len(text) < 400 and "tensor(" not in text
    assert "forward=[1 kept]" in text and f"forward_steps={record.forward_steps}" in text


def test_cost_record_seconds_is_the_wall_time_of_fixed_point_and_its_backward():
    import time

    m = fpgrad.maps.tanh_rnn(n=64, spectral_radius=0.5, seed=0)
    record = fpgrad.estimators.CostRecord()
    W = m.params["W"].clone().requires_grad_()
    x = torch.randn(32, 64, dtype=m.dtype)
    start = time.perf_counter()
    z = fpgrad.fixed_point(m.step, {**m.params, "W": W}, x, torch.zeros_like(x), record=record)
    after_forward = record.seconds
    z.pow(2).sum().backward()
    wall = time.perf_counter() - start
    assert 0 < after_forward < record.seconds <= wall


# --- raw torch errors (issue 17, item 14) ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_gradient_works_under_no_grad_and_inference_mode(mode):
    m = fpgrad.maps.linear(0.5 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    with mode():
        x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)       # (an inference tensor under inference_mode)
        g = fpgrad.gradient(m, x, lambda z: z.sum())
        assert not torch.is_grad_enabled()                 # the caller's mode is restored
    # z* = (I - A)^-1 B x = 2x; d sum(z*) / dx = (I - A)^-T B^T 1 = 2; d / dB = (I - A)^-T 1 x^T = 2 x^T
    torch.testing.assert_close(g.x, torch.full((1, 3), 2.0, dtype=torch.float64))
    torch.testing.assert_close(g.params["B"], 2.0 * torch.ones(3, 1, dtype=torch.float64) * x)


def test_nan_made_by_the_operator_is_not_blamed_on_the_spectral_radius():
    """#17 item 15: a NaN that only the VJP (the operator) produces is named as such, not as rho(J) >= 1."""
    import warnings as _warnings

    from fpgrad.linsolve import GMRES

    def M(v):                       # finite input, NaN output in sample 1: a derivative that is not finite
        out = 0.5 * v
        return torch.where(torch.arange(v.shape[0])[:, None] == 1, out * float("nan"), out)

    b = torch.ones(3, 4, dtype=torch.float64)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        sol = GMRES(tol=1e-10).solve(M, b, throw=False)
    assert bool(sol.converged[0]) and not bool(sol.converged[1])
    assert "operator itself returned NaN/Inf" in sol.message and "not a spectral-radius problem" in sol.message

    def growing(v):                               # finite everywhere: no such claim
        return 0.5 * v
    assert "operator itself" not in GMRES(tol=1e-10).solve(growing, b).message


class CellWithSpares(nn.Module):
    """`unused` never reaches the output; `zeroed` does, times zero (a gradient of exactly zero, not None)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.zeroed = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.lin(z) + x + 0.0 * self.zeroed)


@pytest.mark.parametrize("estimator", ["implicit", "neumann", "one_step", "unrolled"])
def test_a_parameter_the_step_never_uses_gets_none_from_every_estimator(estimator):
    """As autograd does: an optimiser then leaves it alone (Implicit's torch.func pullback gave zeros)."""
    est = {"implicit": fpgrad.estimators.Implicit(), "neumann": Neumann(8), "one_step": fpgrad.estimators.OneStep(),
           "unrolled": Unrolled(5)}[estimator]
    cell = CellWithSpares()
    m = fpgrad.maps.from_module(cell)
    x = torch.randn(2, 4, dtype=torch.float64)
    z = fpgrad.fixed_point(m.step, m.params, x, torch.zeros(2, 4, dtype=torch.float64), backward=est)
    z.square().sum().backward()
    assert cell.unused.grad is None
    assert cell.zeroed.grad is not None and bool((cell.zeroed.grad == 0).all())
    assert cell.lin.weight.grad is not None and float(cell.lin.weight.grad.abs().max()) > 0


def _shape_changing_step(after: int):
    calls = {"n": 0}

    def step(p, z, x):
        calls["n"] += 1
        out = 0.5 * torch.tanh(z @ p["W"] + x)
        return out if calls["n"] <= after else out[..., :-1]
    return step


@pytest.mark.parametrize("estimator", ["implicit", "one_step", "unrolled"])
@pytest.mark.parametrize("after", [0, 2])
def test_a_step_that_changes_the_state_shape_is_named_on_whichever_call_it_does(estimator, after):
    """On its first call, or a later one (torch's 'shape [2, 4] is invalid for input of size 6' before), in the
    forward loop and on the tape (Unrolled: 'mat1 and mat2 shapes cannot be multiplied' before)."""
    est = {"implicit": fpgrad.estimators.Implicit(), "one_step": fpgrad.estimators.OneStep(),
           "unrolled": Unrolled(5)}[estimator]
    p = {"W": torch.eye(4, dtype=torch.float64, requires_grad=True)}
    x = torch.randn(2, 4, dtype=torch.float64)
    match = r"step changed the state's shape from \(2, 4\) to \(2, 3\)" + (" on its call 3" if after else "")
    with pytest.raises(ShapeError, match=match):
        fpgrad.fixed_point(_shape_changing_step(after), p, x, torch.zeros(2, 4, dtype=torch.float64), backward=est)
