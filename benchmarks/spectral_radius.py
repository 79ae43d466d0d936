"""Spectral radius: accuracy against the dense eigendecomposition and cost (products with J, seconds) of
fpgrad's methods (dense, arnoldi, power) and TorchDEQ's power_method, on a real dominant eigenvalue, a complex
dominant pair, a strongly non-normal matrix and slot attention at random init.

The three matrices are linear maps z = A z + B x (J = A) with planted eigenvalues, so the true rho is known as
well as the dense one. TorchDEQ's power_method (a Rayleigh quotient of VJPs) is run with its default
n_iters=100 (as its DEQ sradius_mode does) and with 300. Seconds: median of interleaved repeats. float64, one
thread.

    python -m benchmarks.spectral_radius [--quick]      (or: fpgrad bench spectral-radius)
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch
from torch import Tensor

from benchmarks import _common as C
from fpgrad.jacobian import Jacobian

TOLERANCE = 1e-3
BUDGET = 300


def _planted(n: int, block: Tensor, rest_radius: float, gen: torch.Generator, mixing: float) -> Tensor:
    """P D P^{-1}: D = diag(block, eigenvalues spread in a disc of radius rest_radius, in conjugate pairs)."""
    k = block.shape[0]
    m = n - k
    pairs = m // 2
    r = rest_radius * torch.rand(pairs, generator=gen, dtype=C.DTYPE).sqrt()
    th = math.pi * torch.rand(pairs, generator=gen, dtype=C.DTYPE)
    D = torch.zeros(n, n, dtype=C.DTYPE)
    D[:k, :k] = block
    for i in range(pairs):
        a, b = r[i] * torch.cos(th[i]), r[i] * torch.sin(th[i])
        j = k + 2 * i
        D[j:j + 2, j:j + 2] = torch.tensor([[a, -b], [b, a]], dtype=C.DTYPE)
    if m % 2:
        D[-1, -1] = rest_radius * (2 * torch.rand((), generator=gen, dtype=C.DTYPE) - 1)
    P = torch.eye(n, dtype=C.DTYPE) + mixing * torch.randn(n, n, generator=gen, dtype=C.DTYPE) / math.sqrt(n)
    return P @ D @ torch.linalg.inv(P)


def cases(n: int, seed: int, quick: bool) -> list[dict]:
    """name, map, x, z, planted rho (None for slot attention)."""
    import fpgrad
    gen = torch.Generator().manual_seed(seed)
    out = []
    theta = 0.6
    mats = {
        "real dominant eigenvalue (0.95; rest in |lambda| <= 0.85)":
            (_planted(n, torch.tensor([[0.95]], dtype=C.DTYPE), 0.85, gen, 0.3), 0.95),
        "complex dominant pair (0.95 e^{+-0.6i}; rest <= 0.85)":
            (_planted(n, 0.95 * torch.tensor([[math.cos(theta), -math.sin(theta)],
                                               [math.sin(theta), math.cos(theta)]], dtype=C.DTYPE), 0.85, gen, 0.3),
             0.95),
    }
    # strongly non-normal: Q (T) Q^T, T upper triangular, diag = eigenvalues (0.9 and the rest in [-0.8, 0.8]),
    # strictly upper part Gaussian of norm ~ 6 x the spectral radius
    diag = 1.6 * torch.rand(n, generator=gen, dtype=C.DTYPE) - 0.8
    diag[0] = 0.9
    T = torch.diag(diag) + torch.triu(torch.randn(n, n, generator=gen, dtype=C.DTYPE), 1) * (3.0 / math.sqrt(n))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=C.DTYPE))
    mats["strongly non-normal (rho 0.9, ||A|| >> rho)"] = (Q @ T @ Q.T, 0.9)
    for name, (A, rho) in mats.items():
        B = torch.randn(n, 4, generator=gen, dtype=C.DTYPE)
        m = fpgrad.maps.linear(A, B)
        x = torch.randn(1, 4, generator=gen, dtype=C.DTYPE)
        z = torch.linalg.solve(torch.eye(n, dtype=C.DTYPE) - A, (B @ x[0]))[None]
        out.append({"case": name, "map": m, "x": x, "z": z, "planted": rho,
                    "norm_over_rho": float(torch.linalg.matrix_norm(A, 2) / rho)})
    dim, K, N = (32, 4, 32) if quick else (64, 5, 64)
    sa = C.slot_attention_map(dim=dim, num_slots=K, inputs=N, seed=seed + 1, max_rho=None)
    m = fpgrad.maps.slot_attention(dim=dim, num_slots=K, seed=sa.info["seed"], dtype=C.DTYPE)
    out.append({"case": f"slot attention at init (d={dim}, K={K}, N={N}, seed {sa.info['seed']})", "map": m,
                "x": sa.x, "z": sa.z, "planted": None, "norm_over_rho": None})
    return out


def fpgrad_method(method: str, **options) -> Callable:
    import fpgrad

    def run(case: dict) -> dict:
        with C.quiet():
            r = fpgrad.spectral.spectral_radius_estimate(case["map"], case["x"], case["z"], method=method,
                                                         check_fixed_point=False, **options)
        return {"value": float(r.value.reshape(-1)[0]), "products": r.jvps + r.vjps, "jvps": r.jvps, "vjps": r.vjps,
                "converged": bool(r.converged.all()), "uncertainty": float(r.uncertainty.reshape(-1)[0])}
    return run


def torchdeq_power(n_iters: int) -> Callable:
    def run(case: dict) -> dict:
        from torchdeq.loss import power_method
        m = case["map"]
        torch.manual_seed(0)
        z0 = case["z"].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            f0 = m.step(m.params, z0, case["x"])
            _, value = power_method(f0, z0, n_iters=n_iters)
        return {"value": float(value.reshape(-1)[0]), "products": n_iters, "jvps": 0, "vjps": n_iters,
                "converged": None, "uncertainty": None}
    return run


def methods(quick: bool) -> dict[str, tuple[str, Callable]]:
    out = {
        "dense": ("fpgrad", fpgrad_method("dense")),
        "arnoldi (default)": ("fpgrad", fpgrad_method("arnoldi")),
        "power (default, max_iter 1000)": ("fpgrad", fpgrad_method("power")),
        f"power (max_iter {BUDGET})": ("fpgrad", fpgrad_method("power", max_iter=BUDGET)),
    }
    if C.have("torchdeq"):
        out["power_method (n_iters 100, default)"] = ("torchdeq", torchdeq_power(100))
        out[f"power_method (n_iters {BUDGET})"] = ("torchdeq", torchdeq_power(BUDGET))
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser("spectral_radius", __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="size of the planted matrices (default 500; 200 with --quick)")
    args = p.parse_args(argv)
    run = C.Run("spectral_radius", args)
    n = args.n or (200 if args.quick else 500)
    reps = C.repeats(args, full=3, quick=3)
    results = {"n": n, "tolerance": TOLERANCE, "budget": BUDGET, "cases": []}
    targets = []
    for case in cases(n, args.seed, args.quick):
        dense_rho = float(torch.linalg.eigvals(_dense_J(case)).abs().max())
        rows = []
        ms = methods(args.quick)
        for name, (library, fn) in ms.items():
            res = fn(case)
            res.update({"method": name, "library": library,
                        "rel_error_vs_dense": abs(res["value"] - dense_rho) / dense_rho})
            if case["planted"] is not None:
                res["rel_error_vs_planted"] = abs(res["value"] - case["planted"]) / case["planted"]
            rows.append(res)
        timed = C.interleaved_medians({name: (lambda fn=fn, case=case: fn(case)) for name, (_, fn) in ms.items()}, reps)
        for r in rows:
            r["seconds_median"] = timed[r["method"]]["median"]
        entry = {"case": case["case"], "n": int(case["z"][0].numel()), "dense_rho": dense_rho,
                 "planted_rho": case["planted"], "norm_over_rho": case["norm_over_rho"], "rows": rows}
        results["cases"].append(entry)
        C.table([{**r, "value": C.fmt(r["value"], 6), "rel error": C.fmt(r["rel_error_vs_dense"]),
                  "seconds": C.fmt(r["seconds_median"])} for r in rows],
                ["library", "method", "value", "rel error", "products", "seconds"],
                f"{case['case']}: n={entry['n']}, dense rho = {dense_rho:.6f}")
        free = [r for r in rows if r["library"] == "fpgrad" and r["method"] != "dense"
                and r["rel_error_vs_dense"] <= TOLERANCE and r["products"] <= BUDGET]
        deq = [r for r in rows if r["library"] == "torchdeq"]
        deq_text = "; TorchDEQ power_method: " + ", ".join(
            f"{r['method']} err {C.fmt(r['rel_error_vs_dense'])}" for r in deq) if deq else ""
        if free:
            best = min(free, key=lambda r: (r["products"], r["seconds_median"]))
            targets.append(C.target(f"spectral radius within {TOLERANCE:g} at <= {BUDGET} products, {case['case']}",
                                    True, C.fmt(best["rel_error_vs_dense"]), f"<= {TOLERANCE:g}, <= {BUDGET}",
                                    f"fpgrad {best['method']}: {best['products']} products{deq_text}"))
        else:
            near = min((r for r in rows if r["library"] == "fpgrad" and r["method"] != "dense"),
                       key=lambda r: r["rel_error_vs_dense"])
            targets.append(C.target(f"spectral radius within {TOLERANCE:g} at <= {BUDGET} products, {case['case']}",
                                    False, C.fmt(near["rel_error_vs_dense"]), f"<= {TOLERANCE:g}, <= {BUDGET}",
                                    f"closest: fpgrad {near['method']} err {C.fmt(near['rel_error_vs_dense'])} at "
                                    f"{near['products']} products{deq_text}"))
    C.table(targets, ["target", "met", "value", "threshold", "detail"], "Targets")
    run.save(results, targets)
    return 0


def _dense_J(case: dict) -> Tensor:
    m = case["map"]
    return Jacobian(m.step, m.params, case["x"], case["z"]).dense()[0]


if __name__ == "__main__":
    sys.exit(main())
