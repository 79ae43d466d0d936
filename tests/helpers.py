"""Shared test problems with known answers, and per-dtype tolerances."""

from __future__ import annotations

import torch

import fpgrad

TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def linear_problem(n: int = 6, p: int = 3, batch: int = 2, spectral_radius: float = 0.5, seed: int = 0,
                   dtype=torch.float64):
    """A contractive linear map with its closed-form fixed point z* = (I - A)^{-1} B x."""
    g = torch.Generator().manual_seed(seed)
    A = fpgrad.maps.random_matrix_with_radius(n, spectral_radius, g, dtype=torch.float64)
    B = torch.randn(n, p, generator=g, dtype=torch.float64)
    x = torch.randn(batch, p, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, B @ x.T).T
    A, B, x, z_star = (t.to(dtype) for t in (A, B, x, z_star))
    return fpgrad.maps.linear(A, B), x, z_star


def contractive_slot_attention(dim: int = 8, num_slots: int = 3, seed: int = 0, dtype=torch.float64,
                               scale: float = 0.3):
    """Slot attention with the recurrent weights shrunk so that the map is clearly contractive."""
    m = fpgrad.maps.slot_attention(dim=dim, num_slots=num_slots, seed=seed, dtype=dtype)
    p = dict(m.params)
    for k in ("gru.weight_hh", "to_q.weight", "mlp.2.weight"):
        p[k] = p[k] * scale
    return m.with_params(p)


cuda = __import__("pytest").mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def contractive_tanh(n: int, lipschitz: float, seed: int = 0, input_dim=None, dtype=torch.float64):
    """tanh map with ||W||_2 = lipschitz < 1: a contraction everywhere, so its fixed point is unique
    (a tanh_rnn scaled only by spectral radius can have several fixed points, some unstable)."""
    m = fpgrad.maps.tanh_rnn(n=n, spectral_radius=0.5, seed=seed, input_dim=input_dim, dtype=dtype)
    W = m.params["W"]
    return m.with_params({**m.params, "W": W * (lipschitz / torch.linalg.matrix_norm(W, 2))})


def run_ranks(target, out, world: int, timeout: float) -> None:
    """Spawn `world` processes target(rank, store_path, out) and wait up to `timeout` s; a hung, failed or erroring
    rank (each writes out/error.rank<r>.txt on an exception) fails the calling test with the ranks' tracebacks."""
    import multiprocessing as mp
    import time

    import pytest
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, str(out / "store"), str(out)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    errors = "\n".join(f.read_text() for f in sorted(out.glob("error.rank*.txt")))
    if hung or errors or any(p.exitcode != 0 for p in procs):
        pytest.fail(f"DDP ranks failed (hung: {hung}, exit codes {[p.exitcode for p in procs]}):\n{errors}")
