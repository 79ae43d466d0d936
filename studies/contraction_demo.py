"""Contraction demo: a tanh DEQ trained on a task that drives rho(J) up, with and without the spectral penalty.

The task asks z* = tanh(W z* + U x + b) to amplify small inputs (targets 4x the inputs, clipped to +-0.9): the
cheapest way for the map is a gain near or past 1, i.e. rho(J) at z* growing. Adam through fpgrad.fixed_point
(Anderson forward, implicit GMRES backward), float64, seeded. Per step the dense rho(J) at z* (max over the
batch) is recorded. With the penalty (weight, target 0.9, 2 warm power steps a step) rho should stay under
about its target; without it, it crosses 1.

    python -m studies.contraction_demo [--steps 60] [--weight 20] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch


def run(penalty: bool, steps: int = 60, weight: float = 20.0, target: float = 0.9, n: int = 16, batch: int = 32,
        lr: float = 2e-2, seed: int = 0, kind: str = "radius") -> list[dict]:
    """Train once; rows of (step, task loss, max dense rho(J) at z*, penalty value)."""
    import fpgrad
    from fpgrad.contraction import SpectralState, dense_radius, spectral_penalty
    from fpgrad.estimators import Implicit
    m = fpgrad.maps.tanh_rnn(n, 0.7, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = 0.1 * torch.randn(batch, n, generator=g, dtype=torch.float64)
    t = (4.0 * x).clamp(-0.9, 0.9)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    state = SpectralState(generator=torch.Generator().manual_seed(seed))
    z0 = torch.zeros(batch, n, dtype=torch.float64)
    rows = []
    for i in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z = fpgrad.fixed_point(m.step, params, x, z0, backward=Implicit())
        task = (z - t).pow(2).mean()
        pen = spectral_penalty(m.step, params, z, x, state=state, target=target, kind=kind) if penalty \
            else torch.zeros((), dtype=torch.float64)
        opt.zero_grad()
        (task + weight * pen).backward()
        rho = dense_radius(m.step, {k: v.detach() for k, v in params.items()}, z, x)
        rows.append({"step": i, "task": float(task), "rho_max": float(rho.max()), "penalty": float(pen)})
        opt.step()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--weight", type=float, default=20.0)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from tqdm import tqdm
    results = {}
    for name, pen in tqdm([("without penalty", False), ("with spectral penalty", True)], desc="runs"):
        results[name] = run(pen, steps=args.steps, weight=args.weight, target=args.target, seed=args.seed)
    print(f"{'run':<24} {'rho step 0':>10} {'max rho':>8} {'final rho':>9} {'final task':>10}")
    for name, rows in results.items():
        print(f"{name:<24} {rows[0]['rho_max']:>10.3f} {max(r['rho_max'] for r in rows):>8.3f} "
              f"{rows[-1]['rho_max']:>9.3f} {rows[-1]['task']:>10.4f}")
    if args.out:
        from fpgrad.report import atomic_write_text
        atomic_write_text(args.out, json.dumps({"args": vars(args), "runs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
