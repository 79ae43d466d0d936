"""ImplicitSlotAttention checks values once, on its output slots: a NaN/Inf in the inputs, the initial slots or a
parameter is still named (it reaches the slots), and finite inputs whose step overflows are told apart."""

from __future__ import annotations

import pytest
import torch

from fpgrad.errors import NonFiniteError
from fpgrad.nn import ImplicitSlotAttention

BACKWARDS = ["one_step", "unrolled", "implicit", "neumann-3"]


def _module(backward):
    return ImplicitSlotAttention(8, 3, iters=3, backward=backward, seed=0).double()


@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_nan_parameter_is_named(backward):
    module = _module(backward)
    with torch.no_grad():
        module.to_q.weight[0, 0] = float("nan")
    inputs = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"params\['to_q.weight'\]"):
        module(inputs, noise=torch.randn(2, 3, 8, dtype=torch.float64))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_inf_inputs_and_nan_noise_are_named(backward):
    module = _module(backward)
    inputs = torch.randn(2, 5, 8, dtype=torch.float64)
    bad = inputs.clone()
    bad[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="inputs"):
        module(bad, noise=torch.randn(2, 3, 8, dtype=torch.float64))
    noise = torch.randn(2, 3, 8, dtype=torch.float64)
    noise[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="initial slots"):
        module(inputs, noise=noise)


def test_finite_inputs_whose_step_overflows_are_told_apart():
    module = _module("unrolled")
    with torch.no_grad():
        # finite, but the MLP's output overflows float64 whatever the kernels' summation order: its terms are a
        # ReLU's (>= 0, their sum well above 1) times 1e308, plus a bias of 1e308, so the slots become +Inf and
        # the next step's layer norm makes them NaN (the GRU's weights once did this, but whether their mixed-sign
        # products overflow to Inf or cancel to NaN depends on the CPU's kernels)
        module.mlp[2].weight.fill_(1e308)
        module.mlp[2].bias.fill_(1e308)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NonFiniteError, match="the step overflowed"):
        module(torch.randn(2, 5, 8, dtype=torch.float64, generator=g),
               noise=torch.randn(2, 3, 8, dtype=torch.float64, generator=g))


def test_healthy_forward_checks_values_once_not_per_parameter():
    module = _module("one_step").float()
    inputs, noise = torch.randn(4, 16, 8), torch.randn(4, 3, 8)
    module(inputs, noise=noise)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(inputs, noise=noise)
    sums = sum(e.count for e in prof.key_averages() if e.key == "aten::sum")
    assert sums < len(list(module.parameters()))         # was one per parameter, input and initial slots
