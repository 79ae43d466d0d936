"""Gradient checks on the device named by FPGRAD_TEST_DEVICE (default "cpu"; "cuda" on a GPU machine, as
`python -m benchmarks.gpu` runs it) against float64 references computed on the CPU: closed forms for linear maps,
dense linear algebra, unrolled backprop to convergence."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fpgrad
from fpgrad.estimators import Implicit, OneStep, Unrolled

DEVICE = torch.device(os.environ.get("FPGRAD_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(reason=f"FPGRAD_TEST_DEVICE={DEVICE} but no CUDA device is present", allow_module_level=True)

# relative error of the device's gradient to the float64 CPU reference, per dtype of the device run
TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-3}
DTYPES = (torch.float64, torch.float32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


def _linear_problem(n: int, p: int, batch: int, rho: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = fpgrad.maps.random_matrix_with_radius(n, rho, g)
    # symmetrised (and rescaled to radius rho): I - A stays well conditioned for the float32 runs
    A = 0.5 * (A + A.T)
    A = A * (rho / torch.linalg.eigvalsh(A).abs().max())
    B = torch.randn(n, p, generator=g, dtype=torch.float64) / p ** 0.5
    x = torch.randn(batch, p, generator=g, dtype=torch.float64)
    w = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return A, B, x, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(seed=st.integers(0, 10_000), rho=st.sampled_from([0.3, 0.7, 0.9]), batch=st.integers(1, 4))
def test_implicit_gradient_of_linear_map_on_device_matches_closed_form(dtype, seed, rho, batch):
    # z* = (I - A)^{-1} B x, L = <w, z*>:  dL/dx = B^T (I - A)^{-T} w,  dL/dB = (I - A)^{-T} w x^T summed
    n, p = 12, 5
    A, B, x, w = _linear_problem(n, p, batch, rho, seed)
    u = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - A).T, w.T).T          # [batch, n]
    ref_x, ref_B = u @ B, u.T @ x
    m = fpgrad.maps.linear(A.to(DEVICE, dtype), B.to(DEVICE, dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    wd = w.to(DEVICE, dtype)
    g = fpgrad.gradient(m, x.to(DEVICE, dtype), lambda z: (wd * z).sum(),
                        estimator=Implicit(solver="gmres", tol=tol), forward=fpgrad.forward.get_forward(
                            "anderson", tol=tol, max_iter=500))
    assert g.x.device.type == DEVICE.type and g.params["B"].dtype == dtype
    assert _rel(g.x, ref_x) <= TOLERANCE[dtype]
    assert _rel(g.params["B"], ref_B) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_implicit_gradient_of_tanh_map_on_device_matches_unrolled_to_convergence_on_cpu(dtype):
    m64 = fpgrad.maps.tanh_rnn(n=16, spectral_radius=0.6, seed=3)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = torch.randn(3, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z0 = torch.zeros(3, 16, dtype=torch.float64)
    ref = fpgrad.gradient(m64, x, lambda z: ((z - target) ** 2).sum(), estimator=Unrolled(200), z0=z0,
                          forward=fpgrad.forward.Iterate.exactly(200))
    md = m64.with_params({k: v.to(DEVICE, dtype) for k, v in m64.params.items()})
    td = target.to(DEVICE, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    g = fpgrad.gradient(md, x.to(DEVICE, dtype), lambda z: ((z - td) ** 2).sum(),
                        estimator=Implicit(solver="gmres", tol=tol), z0=z0.to(DEVICE, dtype),
                        forward=fpgrad.forward.get_forward("anderson", tol=tol, max_iter=500))
    for k in ("W", "U", "b"):
        assert _rel(g.params[k], ref.params[k]) <= TOLERANCE[dtype], k
    assert _rel(g.x, ref.x) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backward", ["one_step", "unrolled"])
def test_slot_attention_module_gradients_on_device_in_float32_match_float64_cpu(backward):
    from fpgrad.nn import ImplicitSlotAttention
    ref = ImplicitSlotAttention(8, 3, iters=3, backward=backward, seed=0).double()
    dev = ImplicitSlotAttention(8, 3, iters=3, backward=backward, seed=0).to(DEVICE, torch.float32)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, 10, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    (ref(inputs, noise=noise) * weights).sum().backward()
    (dev(inputs.to(DEVICE, torch.float32), noise=noise.to(DEVICE, torch.float32))
     * weights.to(DEVICE, torch.float32)).sum().backward()
    pairs = [(name, p_ref.grad, p_dev.grad) for (name, p_ref), p_dev in zip(ref.named_parameters(), dev.parameters())]
    for name, g_ref, g_dev in pairs:
        assert (g_ref is None) == (g_dev is None), name
    used = [(name, g_ref, g_dev) for name, g_ref, g_dev in pairs if g_ref is not None]
    scale = float(torch.cat([g.reshape(-1) for _, g, _ in used]).norm())
    for name, g_ref, g_dev in used:
        # per parameter, relative to the whole gradient's norm (some are exactly zero: norm_slots.bias)
        err = float((g_dev.detach().cpu().double() - g_ref).norm())
        assert err <= 1e-5 * scale + 1e-4 * float(g_ref.norm()), name


def test_one_step_gradient_on_device_equals_one_taped_step_from_the_cpu_fixed_point():
    # OneStep's gradient is (df/dparams)^T g at z*: a float64 VJP on the CPU at the CPU's z*
    m64 = fpgrad.maps.tanh_rnn(n=10, spectral_radius=0.5, seed=7)
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    z_star = fpgrad.solve(m64, x, z0=torch.zeros(2, 10, dtype=torch.float64), tol=1e-13, max_iter=500).z
    _, pull = torch.func.vjp(lambda p: m64.step(p, z_star, x), m64.params)
    ref = pull(torch.ones(2, 10, dtype=torch.float64))[0]
    md = m64.with_params({k: v.to(DEVICE) for k, v in m64.params.items()})
    g = fpgrad.gradient(md, x.to(DEVICE), lambda z: z.sum(), estimator=OneStep(),
                        z0=torch.zeros(2, 10, dtype=torch.float64, device=DEVICE),
                        forward=fpgrad.forward.get_forward("anderson", tol=1e-13, max_iter=500))
    for k in ("W", "U", "b"):
        assert _rel(g.params[k], ref[k]) <= 1e-9, k
