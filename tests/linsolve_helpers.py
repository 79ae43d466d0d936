"""Test problems for fpgrad.linsolve: batched (I - M) u = b with known answers, and per-dtype tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fpgrad.linsolve import LinearSolution

# tolerance asked of the solvers, and how close the answer must be to the float64 reference
SOLVE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
CHECK_TOL = {torch.float64: 1e-7, torch.float32: 2e-2}


def _eigen_block(n: int, radius: float, g: torch.Generator) -> Tensor:
    """Real block-diagonal matrix with eigenvalues of modulus <= radius (one of modulus exactly radius)."""
    L = torch.zeros(n, n, dtype=torch.float64)
    pairs = n // 4
    r = radius * torch.rand(n, generator=g, dtype=torch.float64)
    r[0] = radius
    for i in range(pairs):
        theta = torch.pi * torch.rand((), generator=g, dtype=torch.float64)
        c, s = r[2 * i] * torch.cos(theta), r[2 * i] * torch.sin(theta)
        L[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    for i in range(2 * pairs, n):
        L[i, i] = r[i] * signs[i]
    return L


def _orthogonal(n: int, g: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def nonsymmetric_matrix(n: int, radius: float, g: torch.Generator) -> Tensor:
    """M = Q L Q^{-1}, Q = U diag(s) V^T with s in [1, 2] (cond(Q) <= 2): non-normal, spectral radius `radius`."""
    s = 1.0 + torch.rand(n, generator=g, dtype=torch.float64)
    U, V = _orthogonal(n, g), _orthogonal(n, g)
    Q = U @ torch.diag(s) @ V.T
    Qinv = V @ torch.diag(1.0 / s) @ U.T
    return Q @ _eigen_block(n, radius, g) @ Qinv


def symmetric_matrix(n: int, radius: float, g: torch.Generator) -> Tensor:
    """M = Q diag(lambda) Q^T, lambda in [-radius, radius]: I - M is SPD for radius < 1."""
    lam = radius * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    lam[0] = radius
    Q = _orthogonal(n, g)
    return Q @ torch.diag(lam) @ Q.T


class Counter:
    """Wraps an operator and counts its (batched) calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(v)


@dataclass
class Problem:
    """A batch of systems (I - M_i) u_i = b_i; Mmat: [B, n, n], b and u: [B, n] (u in float64)."""

    Mmat: Tensor
    b: Tensor
    u: Tensor

    def M(self, v: Tensor) -> Tensor:
        return torch.einsum("bij,bj->bi", self.Mmat, v)

    def MT(self, v: Tensor) -> Tensor:
        return torch.einsum("bji,bj->bi", self.Mmat, v)

    @property
    def A(self) -> Tensor:
        n = self.Mmat.shape[-1]
        return torch.eye(n, dtype=self.Mmat.dtype, device=self.Mmat.device) - self.Mmat

    def inverse(self, v: Tensor) -> Tensor:
        """(I - M)^{-1} v: the exact preconditioner."""
        return torch.linalg.solve(self.A, v.unsqueeze(-1)).squeeze(-1)

    def residual(self, u: Tensor) -> Tensor:
        """[B] relative residual of u, in float64."""
        A = self.A.double()
        b = self.b.double()
        r = b - torch.einsum("bij,bj->bi", A, u.double())
        return r.norm(dim=1) / b.norm(dim=1)

    def error(self, u: Tensor) -> Tensor:
        """[B] relative error of u against the float64 reference."""
        return (u.double() - self.u).norm(dim=1) / self.u.norm(dim=1)


def make_problem(n: int, radii, seed: int = 0, symmetric: bool = False, dtype=torch.float64,
                 device="cpu") -> Problem:
    """One system per entry of `radii` (spectral radius of M), built in float64 and cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    build = symmetric_matrix if symmetric else nonsymmetric_matrix
    Mmat = torch.stack([build(n, float(r), g) for r in radii])
    b = torch.randn(len(radii), n, generator=g, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    u = torch.linalg.solve(eye - Mmat, b.unsqueeze(-1)).squeeze(-1)
    return Problem(Mmat.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device), u.to(device))


def assert_solved(p: Problem, sol: LinearSolution, tol: float) -> None:
    """Converged to tol (reported and recomputed in float64), and the error is within cond(A) x residual."""
    assert bool(sol.converged.all()) and not bool(sol.diverged.any()), sol.message
    assert sol.u.dtype == p.b.dtype and sol.residuals.dtype == p.b.dtype
    true = p.residual(sol.u)
    slack = 2.0 if p.b.dtype == torch.float64 else 5.0
    assert bool((sol.residual <= tol).all()), sol.residual
    assert bool((true <= slack * tol).all()), true
    cond = torch.linalg.cond(p.A.double())
    rounding = 10 * torch.finfo(p.b.dtype).eps          # casting A and storing u in the solver's dtype
    assert bool((p.error(sol.u) <= cond * (1.01 * true + rounding)).all())
