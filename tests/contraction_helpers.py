"""Small maps with known spectral structure for the contraction-control tests."""

from __future__ import annotations

import math

import torch

import fpgrad


def tanh_with_spectrum(eigs, n: int, seed: int = 0, batch: int = 3, input_scale: float = 0.3, rotation=None):
    """tanh(W z + U x + b) with W = P diag(...) P^{-1} (non-symmetric), eigenvalues `eigs` (real) padded with
    uniform values in [-0.3, 0.3]; rotation=(r, angle) puts a complex pair r e^{+-i angle} first instead.
    Returns (map, x [batch, n], z* [batch, n]) with z* solved to 1e-12."""
    g = torch.Generator().manual_seed(seed)
    D = torch.zeros(n, n, dtype=torch.float64)
    k = 0
    if rotation is not None:
        r, a = rotation
        D[:2, :2] = r * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
        k = 2
    for e in eigs:
        D[k, k] = e
        k += 1
    while k < n:
        D[k, k] = 0.6 * torch.rand((), generator=g, dtype=torch.float64) - 0.3
        k += 1
    P = torch.randn(n, n, generator=g, dtype=torch.float64) + 2.0 * torch.eye(n, dtype=torch.float64)
    W = P @ D @ torch.linalg.inv(P)
    U = input_scale * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    b = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    m = fpgrad.maps.tanh_rnn(n, 0.5, seed=seed).with_params({"W": W, "U": U, "b": b})
    x = torch.randn(batch, n, generator=g, dtype=torch.float64)
    z = fpgrad.solve(m, x, tol=1e-13, max_iter=2000).z
    return m, x, z


def dense_jacobians(m, x, z, params=None) -> torch.Tensor:
    """[B, n, n] Jacobians of the step at z per sample (jacrev)."""
    params = m.params if params is None else params
    return torch.stack([torch.func.jacrev(lambda zz, i=i: m.step(params, zz[None], x[i:i + 1])[0])(z[i])
                        for i in range(z.shape[0])])
