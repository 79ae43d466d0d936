"""Half precision (bfloat16, float16): the map runs in its own dtype, the solvers' small dense algebra in float32 or
wider, and the results come back in the map's dtype with their true residual (issue 17, item 5)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fpgrad
from fpgrad.estimators import Implicit
from fpgrad.forward import get_forward
from fpgrad.linsolve import GMRES, BiCGSTAB, Dense

HALF = [torch.bfloat16, torch.float16]
SOLVERS = ["gmres", "dense", "bicgstab", "cg_normal", "gcrodr", "neumann"]


def _problem():
    m = fpgrad.maps.tanh_rnn(n=16, spectral_radius=0.7, seed=0)
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return m, x


def _loss(z):
    return z.float().pow(2).sum()


def _relative_error(g, ref) -> float:
    return float((g.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_implicit_gradient_in_half_precision_matches_float64(dtype, solver):
    m, x = _problem()
    ref = fpgrad.gradient(m, x, _loss, estimator=Implicit(solver="dense"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # (the dtype's own tolerances are item 6's business)
        g = fpgrad.gradient(m.to(dtype=dtype), x.to(dtype), _loss, estimator=Implicit(solver=solver, tol=1e-6),
                            forward=get_forward("anderson", tol=1e-2))
    assert g.params["W"].dtype == dtype and g.x.dtype == dtype
    assert _relative_error(g.flat(), ref.flat()) < 5e-2          # measured 1.6e-2 to 1.9e-2 (forward tol 1e-2)
    assert _relative_error(g.x, ref.x) < 5e-2
    assert float(g.solve.residual.max()) < 1e-2                  # it solved the adjoint system, to what the dtype can


@pytest.mark.parametrize("backward", ["implicit", "implicit-dense", Implicit(solver="gmres", tol=1e-6)],
                         ids=["default", "dense", "gmres"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fixed_point_backward_in_half_precision(dtype, backward):
    m, x = _problem()
    ref = fpgrad.gradient(m, x, _loss, estimator=Implicit(solver="dense"))
    W = m.params["W"].to(dtype).requires_grad_()
    params = {k: v.to(dtype) for k, v in m.params.items()} | {"W": W}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = fpgrad.fixed_point(m.step, params, x.to(dtype), torch.zeros(4, 16, dtype=dtype),
                               forward=get_forward("anderson", tol=1e-2), backward=backward)
        _loss(z).backward()
    assert z.dtype == dtype and W.grad.dtype == dtype
    # the default adjoint tolerance in bfloat16 is 5e-2 (what slot attention can reach): a gradient within ~1e-1
    bound = 1e-1 if backward == "implicit" and dtype == torch.bfloat16 else 5e-2
    assert _relative_error(W.grad, ref.params["W"]) < bound


@pytest.mark.parametrize("solver", [GMRES(tol=1e-6, max_iter=40), Dense(tol=1e-6), BiCGSTAB(tol=1e-6, max_iter=40)],
                         ids=["gmres", "dense", "bicgstab"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_linear_solve_in_half_precision_returns_its_dtype_and_true_residual(dtype, solver):
    """(I - M) u = b with M a half-precision matrix: u in M's dtype; the reported residual is that of the returned u
    (measured here in float64 from u), never the wider recursive estimate of the Hessenberg problem."""
    gen = torch.Generator().manual_seed(1)
    M64 = 0.6 * torch.linalg.qr(torch.randn(3, 12, 12, dtype=torch.float64, generator=gen))[0]
    M = M64.to(dtype)
    b = torch.randn(3, 12, dtype=torch.float64, generator=gen).to(dtype)
    sol = solver.compute(                         # (compute: no report; 1e-6 is below the dtype)
lambda v: torch.bmm(M, v.unsqueeze(2)).squeeze(2), b)
    assert sol.u.dtype == dtype
    u, Md, bd = sol.u.double(), M.double(), b.double()
    true = (bd - (u - torch.bmm(Md, u.unsqueeze(2)).squeeze(2))).norm(dim=1) / bd.norm(dim=1)
    eps = torch.finfo(dtype).eps
    assert bool((true < 4 * eps).all())                               # as good as the dtype allows
    assert bool(((sol.residual.double() - true).abs() <= 2 * eps).all())   # and it says so


# --- default tolerances follow the dtype (issue 17, item 6) ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_loop_with_default_tolerances_prints_no_warning(dtype):
    """20 SGD steps of fixed_point on a contractive tanh map with every default: nothing is wrong, nothing warns
    (before: bfloat16's forward chased tol 1e-5 until Anderson overflowed; half-precision adjoints warned)."""
    from helpers import contractive_tanh

    m = contractive_tanh(64, 0.9, seed=0).to(dtype=dtype)
    params = {k: v.clone().requires_grad_() for k, v in m.params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            x = torch.randn(16, 64, generator=gen).to(dtype)
            z = fpgrad.fixed_point(m.step, params, x, torch.zeros_like(x))
            loss = (z.float() - 0.1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert [str(w.message) for w in caught] == []
    assert all(bool(torch.isfinite(p).all()) for p in params.values())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                        (torch.float16, 1e-2)], ids=str)
def test_solve_default_tolerance_follows_the_dtype(dtype, tol):
    m, x = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = fpgrad.solve(m.to(dtype=dtype), x.to(dtype))
    assert fpgrad.forward.default_tolerance(dtype) == tol
    assert bool(sol.converged.all()) and float(sol.relative_residual.max()) <= tol
    assert fpgrad.forward.get_forward("anderson").tol is None         # resolved per call, from the state's dtype


@pytest.mark.parametrize("method, seed, n, rho, memory", [("anderson", 2, 8, 0.5, 5), ("anderson", 2, 8, 0.5, 10),
                                                          ("anderson", 4, 64, 0.99, 5), ("broyden", 5, 64, 0.99, 5)])
def test_quasi_newton_at_the_half_precision_floor_stagnates_instead_of_a_nan_blamed_on_the_map(method, seed, n,
                                                                                                rho, memory):
    """float16, tol 0 (unreachable): the mixing of a degenerate history overflowed (NaN at iterations 19-86,
    reported as 'the map overflowed' for a tanh map that cannot overflow); now that sample takes the plain step
    and restarts, and the solve ends at its round-off floor."""
    import warnings
    m = fpgrad.maps.tanh_rnn(n=n, spectral_radius=rho, seed=seed, dtype=torch.float16)
    x = (3 * torch.randn(8, n, generator=torch.Generator().manual_seed(seed))).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fpgrad.solve(m, x, z0=torch.zeros(8, n, dtype=torch.float16), method=method, tol=0.0, max_iter=200,
                         memory=memory)
    assert bool(torch.isfinite(r.z).all())
    assert float(r.relative_residual.max()) < 0.05             # at the fp16 floor, not lost
