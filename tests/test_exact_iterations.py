"""Exactly T iterations as a hand-written loop runs them: T step evaluations before the taped steps, no host sync per
iteration, one finiteness check per call; the recipe through ImplicitSlotAttention applies the step `iters` times."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fpgrad
from benchmarks._sync import syncs_per_iteration
from fpgrad.errors import NonFiniteError
from fpgrad.estimators import OneStep, Truncated
from fpgrad.forward import Iterate
from fpgrad.nn import ImplicitSlotAttention


def tanh_map(n=5, B=3, scale=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(n, n, generator=g, dtype=dtype) / math.sqrt(n)
    x = torch.randn(B, n, generator=g, dtype=dtype)

    def step(params, z, x):
        return torch.tanh(z @ params["W"].T + x)
    return step, {"W": W}, x


def counted(step):
    calls = []

    def f(params, z, x):
        calls.append(1)
        return step(params, z, x)
    return f, calls


def hand_loop(step, params, x, z, T, damping=0.0):
    for _ in range(T):
        f = step(params, z, x)
        z = f if damping == 0 else z + (1 - damping) * (f - z)
    return z


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 8), damping=st.sampled_from([0.0, 0.3]), measure=st.booleans(), seed=st.integers(0, 99))
def test_exactly_T_equals_the_hand_loop_in_T_or_T_plus_one_evaluations(T, damping, measure, seed):
    step, params, x = tanh_map(seed=seed)
    z0 = torch.zeros_like(x)
    f, calls = counted(step)
    fp = Iterate.exactly(T, damping, measure_last=measure).solve(f, params, x, z0)
    torch.testing.assert_close(fp.z, hand_loop(step, params, x, z0, T, damping), rtol=0, atol=0)
    assert len(calls) == fp.evaluations == T + int(measure)
    assert fp.residuals.shape == (T + 1, 3) and fp.relative_residuals.shape == (T + 1, 3)
    if measure:       # the returned iterate's own residual ||f(z_T) - z_T||
        torch.testing.assert_close(fp.residuals[-1], (step(params, fp.z, x) - fp.z).norm(dim=1))
    else:
        assert torch.isnan(fp.residuals[-1]).all() and "not measured" in fp.message
    if T >= 1:        # the rows before are the residuals of z_0 .. z_{T-1}
        z1 = hand_loop(step, params, x, z0, 1, damping)
        torch.testing.assert_close(fp.residuals[0], (step(params, z0, x) - z0).norm(dim=1))
        assert z1.shape == z0.shape


def test_exactly_T_makes_no_host_sync_per_iteration():
    step, params, x = tanh_map()

    def run(T):
        Iterate.exactly(T).solve(step, params, x, torch.zeros_like(x), check=False)
    r = syncs_per_iteration(run, "cpu", low=3, high=13)
    assert r["per_iteration"] == 0, r
    assert r["per_call"] <= 2, r           # the finiteness check at the end (and nothing else of note)


def test_a_stopping_solver_still_syncs_per_iteration_so_the_counter_can_see_one():
    step, params, x = tanh_map()

    def run(T):
        Iterate(tol=0.0, max_iter=T, warn=False).solve(step, params, x, torch.zeros_like(x), check=False)
    assert syncs_per_iteration(run, "cpu", low=3, high=13)["per_iteration"] >= 1


def test_exactly_T_still_names_the_samples_that_overflowed():
    step, params, x = tanh_map()

    def bad(params, z, x):
        out = step(params, z, x)
        return torch.where(torch.arange(out.shape[0]).unsqueeze(1) == 1, out / 0.0 * 0.0, out)
    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[1\]"):
        Iterate.exactly(4).solve(bad, params, x, torch.zeros_like(x))


def test_measure_last_false_is_refused_with_a_stopping_test():
    step, params, x = tanh_map()
    with pytest.raises(ValueError, match="measure_last=False needs exactly T steps"):
        Iterate(tol=1e-6, measure_last=False).solve(step, params, x, torch.zeros_like(x))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(0, 8), damping=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 99))
def test_exactly_T_without_measuring_is_the_hand_loop_in_T_evaluations_and_reports_no_residual(T, damping, seed):
    step, params, x = tanh_map(seed=seed)
    z0 = torch.zeros_like(x)
    f, calls = counted(step)
    fp = Iterate.exactly(T, damping, measure_last=False, measure=False).solve(f, params, x, z0)
    torch.testing.assert_close(fp.z, hand_loop(step, params, x, z0, T, damping), rtol=0, atol=0)
    assert len(calls) == fp.evaluations == T
    assert fp.residuals.shape == (1, 3) and torch.isnan(fp.residuals).all() and torch.isnan(fp.relative_residual).all()
    assert not fp.converged.any() and "no residual measured" in fp.message


def test_exactly_T_without_measuring_makes_no_host_sync_at_all():
    step, params, x = tanh_map()

    def run(T):
        Iterate.exactly(T, measure_last=False, measure=False).solve(step, params, x, torch.zeros_like(x), check=False)
    r = syncs_per_iteration(run, "cpu", low=3, high=13)
    assert r["per_iteration"] == 0 and r["per_call"] == 0, r


def test_measure_false_is_refused_where_it_would_contradict_measure_last_or_a_stopping_test():
    step, params, x = tanh_map()
    with pytest.raises(ValueError, match="pass measure_last=False with it"):
        Iterate.exactly(3, measure=False)
    with pytest.raises(ValueError, match="as does measure=False"):
        Iterate(tol=1e-6, measure_last=False, measure=False).solve(step, params, x, torch.zeros_like(x))


@pytest.mark.parametrize("backward", ["one_step", "truncated-2"])
def test_slot_attention_keeps_no_record_unless_asked_and_its_slots_and_gradients_do_not_change(backward):
    m = ImplicitSlotAttention(16, 3, iters=4, backward=backward, seed=0).double()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    params = list(m.parameters())
    lean = m(inputs, noise=noise)
    recorded, record = m(inputs, noise=noise, return_info=True)
    torch.testing.assert_close(lean, recorded, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad((lean * weights).sum(), params, allow_unused=True),
                    torch.autograd.grad((recorded * weights).sum(), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # asked for, the record measures the untaped steps' residuals (all but z_T's, which the taped steps evaluate)
    fp = record.forward[-1]
    assert torch.isfinite(fp.residuals[:-1]).all() and fp.residuals.shape[0] == fp.evaluations + 1


@pytest.mark.parametrize("estimator, forward_evals, taped", [
    (OneStep(), 4, 1),                 # Iterate.exactly(4) as its forward: 4 evaluations + the taped step
    (Truncated(2, T=6), 4, 2),         # T - k = 4 untaped steps, no extra evaluation to measure z_4
])
def test_one_step_and_truncated_count_every_application_of_the_step(estimator, forward_evals, taped):
    step, params, x = tanh_map()
    params = {"W": params["W"].requires_grad_(True)}
    f, calls = counted(step)
    record = fpgrad.results.CostRecord()
    forward = Iterate.exactly(4, measure_last=False)
    z = fpgrad.fixed_point(f, params, x, torch.zeros_like(x), forward=forward, backward=estimator, record=record)
    assert record.forward_steps == forward_evals and record.backward_steps == taped
    assert len(calls) == forward_evals + taped
    torch.testing.assert_close(z, hand_loop(step, params, x, torch.zeros_like(x), forward_evals + taped))


@pytest.mark.parametrize("backward, taped", [("one_step", 1), ("unrolled", 3), ("truncated-2", 2)])
def test_slot_attention_applies_its_step_exactly_iters_times_like_the_plain_loop(backward, taped):
    torch.manual_seed(0)
    m = ImplicitSlotAttention(16, 3, iters=3, backward=backward, seed=0)
    inputs = torch.randn(2, 10, 16)
    slots, record = m(inputs, noise=torch.randn(2, 3, 16), return_info=True)
    assert record.forward_steps + record.backward_steps == 3
    assert record.backward_steps == taped
    slots.sum().backward()
    assert m.slots_mu.grad is not None or backward != "unrolled"


def test_finite_check_over_all_inputs_catches_opposite_infinities_in_two_tensors():
    step, params, x = tanh_map()
    params = {"W": params["W"].clone(), "V": torch.zeros(2, dtype=torch.float64)}
    params["W"][0, 0] = float("inf")
    params["V"][0] = -float("inf")      # their sums cancel to NaN, never to a finite number
    with pytest.raises(NonFiniteError, match=r"params\['W'\] contains 0 NaN and 1 Inf"):
        fpgrad.solve(fpgrad.maps.Map(step, params, event_ndim=1), x, z0=torch.zeros_like(x))


def test_finite_inputs_whose_sums_overflow_are_not_called_non_finite():
    step, params, x = tanh_map(dtype=torch.float16)
    big = torch.full((3, 5), 6e4, dtype=torch.float16)       # finite in float16, the sum overflows
    assert not torch.isfinite(big.sum())
    z = fpgrad.fixed_point(step, params, big, torch.zeros_like(big), forward=Iterate.exactly(2), backward=OneStep())
    torch.testing.assert_close(z, hand_loop(step, params, big, torch.zeros_like(big), 3))


@pytest.mark.parametrize("T", [7, 8, 9, 17])
def test_residuals_measured_in_chunks_are_each_steps_own(T):
    """The exact loop measures residuals a chunk of steps at a time; each row is still ||f(z_t) - z_t|| of its step."""
    step, params, x = tanh_map(scale=0.9)
    z = torch.zeros_like(x)
    expected = []
    for _ in range(T + 1):
        f = step(params, z, x)
        expected.append((f - z).norm(dim=1))
        z = f
    fp = Iterate.exactly(T).solve(step, params, x, torch.zeros_like(x))
    torch.testing.assert_close(fp.residuals, torch.stack(expected))
    torch.testing.assert_close(fp.relative_residuals[-1], expected[-1] / step(params, fp.z, x).norm(dim=1))
