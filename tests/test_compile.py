"""torch.compile: ImplicitSlotAttention compiled (the whole module, or its step on its own) gives the eager slots
and gradients for the unrolled, one-step and implicit backward; the graph breaks are the documented ones."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.func import functional_call

import fpgrad

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")]

BACKWARDS = ["unrolled", "one_step", "implicit"]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-8}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (and does not fill the recompile limit of the next one)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _layer(backward: str, dtype: torch.dtype, compile_step: bool = False, tol: float | None = None):
    """A small contractive slot attention (recurrent weights shrunk): its fixed point exists and plain iteration
    reaches it, so the implicit gradient is taken at a fixed point."""
    if backward == "implicit":
        kw = dict(iters=60, tol=tol, forward="anderson") if tol else dict(iters=25)
    else:
        kw = dict(iters=3)
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3, backward=backward, seed=0, compile_step=compile_step, **kw)
    layer = layer.to(dtype)
    with torch.no_grad():
        for p in (layer.gru.weight_hh, layer.to_q.weight, layer.mlp[2].weight):
            p.mul_(0.3)
    return layer


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 10, 8, generator=g, dtype=dtype), torch.randn(3, 3, 8, generator=g, dtype=dtype)


def _slots_and_grads(layer, call, x, z0):
    layer.zero_grad(set_to_none=True)
    z = call(x, slots=z0)
    (z.pow(2).sum() + z[:, 0].sum()).backward()
    return z.detach(), {k: p.grad for k, p in layer.named_parameters() if p.grad is not None}


def _assert_same(got, want, dtype):
    (z, grads), (z_ref, grads_ref) = got, want
    rtol = RTOL[dtype]
    torch.testing.assert_close(z, z_ref, rtol=rtol, atol=rtol * float(z_ref.abs().max()))
    assert grads.keys() == grads_ref.keys()
    scale = max(float(g.abs().max()) for g in grads_ref.values())
    for k in grads_ref:        # atol relative to the largest gradient: some are zero analytically (norm_slots.bias)
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=rtol, atol=rtol * scale, msg=k)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_compiled_module_matches_eager(backward):
    dtype = torch.float32
    layer = _layer(backward, dtype)
    x, z0 = _inputs(dtype)
    eager = _slots_and_grads(layer, layer, x, z0)
    compiled = torch.compile(layer)
    _assert_same(_slots_and_grads(layer, compiled, x, z0), eager, dtype)
    _assert_same(_slots_and_grads(layer, compiled, x, z0), eager, dtype)      # and from the cache
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("backward", BACKWARDS)
def test_compiled_step_matches_eager(backward):
    # implicit: solved to tol by Anderson, so the step also runs on the subsets of samples still iterating
    dtype = torch.float64
    x, z0 = _inputs(dtype)
    eager_layer = _layer(backward, dtype, tol=1e-10)
    eager = _slots_and_grads(eager_layer, eager_layer, x, z0)
    layer = _layer(backward, dtype, compile_step=True, tol=1e-10)
    _assert_same(_slots_and_grads(layer, layer, x, z0), eager, dtype)
    assert counters["frames"]["ok"] >= 1                     # the step was compiled


def test_compiled_module_with_compiled_step_matches_eager():
    dtype = torch.float64
    x, z0 = _inputs(dtype)
    layer = _layer("implicit", dtype)
    eager = _slots_and_grads(layer, layer, x, z0)
    layer.compile_step = True
    _assert_same(_slots_and_grads(layer, torch.compile(layer), x, z0), eager, dtype)


def test_compiled_step_is_kept_out_of_torch_func_transforms():
    # called inside a torch.func transform, a compiled function falls back to eager and is never compiled
    # again: the module calls its compiled step only outside them
    dtype = torch.float64
    layer = _layer("unrolled", dtype, compile_step=True)
    x, z0 = _inputs(dtype)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = torch.func.grad(lambda p: functional_call(layer, p, (x,), {"slots": z0}).pow(2).sum())(params)
    assert counters["frames"]["ok"] == 0
    layer(x, slots=z0).pow(2).sum().backward()
    assert counters["frames"]["ok"] >= 1
    torch.testing.assert_close(grads["to_q.weight"], layer.to_q.weight.grad, rtol=1e-8, atol=1e-12)


def _graph_breaks() -> set[str]:
    """The kinds of graph break dynamo met (it may log one break twice, with different reasons)."""
    kinds = set()
    for reason in counters["graph_break"]:
        if "item()" in reason:
            kinds.add("host sync")               # bool() of a tensor: the finiteness check of the slots
        elif "skipped" in reason:
            kinds.add("eager solver")            # the fixed_point call, run outside the graph
        elif "Generator" in reason:
            kinds.add("generator")               # torch.randn(generator=...)
        else:
            kinds.add(reason.splitlines()[0])
    return kinds


@pytest.mark.parametrize("backward", BACKWARDS)
def test_graph_breaks_are_the_documented_ones(backward):
    layer = _layer(backward, torch.float32)
    x, z0 = _inputs(torch.float32)
    torch.compile(layer, backend="eager")(x, slots=z0).sum().backward()
    if backward == "unrolled":                   # the T steps are traced whole; then the slots' finiteness check
        assert _graph_breaks() == {"host sync"}
    else:                                        # the solver loop stops on data: it runs eagerly, and the slots'
        assert _graph_breaks() == {"eager solver"}   # finiteness check with it


def test_sampling_from_a_generator_adds_one_graph_break():
    layer = _layer("unrolled", torch.float32)
    x, _ = _inputs(torch.float32)
    eager = layer(x, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(layer, backend="eager")(x, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(compiled, eager)
    assert _graph_breaks() == {"host sync", "generator"}


@pytest.mark.parametrize("backward", ["one_step", "implicit"])
def test_bare_fixed_point_under_compile_breaks_once_and_matches_eager(backward):
    m = fpgrad.maps.tanh_rnn(n=12, spectral_radius=0.5, seed=0)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {k: v.clone().requires_grad_() for k, v in m.params.items()}

    def loss(params, x):
        z = fpgrad.fixed_point(m.step, params, x, torch.zeros_like(x), backward=backward)
        return (z ** 2).sum()

    eager = torch.autograd.grad(loss(params, x), list(params.values()))
    compiled = torch.autograd.grad(torch.compile(loss, backend="eager")(params, x), list(params.values()))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert _graph_breaks() == {"eager solver"}
