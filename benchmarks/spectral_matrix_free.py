"""Matrix-free spectral measurements on slot attention at >= 100,000 state entries per batch.

    python -m benchmarks.spectral_matrix_free            # ~5-10 minutes on 2 cores
    python -m benchmarks.spectral_matrix_free --quick    # ~30 seconds

What it measures, on the block-diagonal J of a whole batch at its fixed point (full: batch 64,
7 slots, dim 256, so 64 blocks of n = 1792 and 114,688 state entries):
- the spectral radius by Arnoldi (defaults) and by the batched power method (default tol and fixed
  budgets of JVPs), against Arnoldi at tol 1e-10 (k=10, ncv=40), cross-checked by the dense
  eigendecomposition of two samples;
- the top singular value of J (Lanczos on J^T J) against Lanczos at tol 1e-12, and sigma_min(I - J);
- Hutchinson's Frobenius norm with its 95% interval against the exact norm (n batched VJPs);
- the speed of dense (materialise J + eigvals) against Arnoldi on one sample block at several n.
Every figure, the machine and the seeds go to reports/benchmarks/spectral_matrix_free.json (written
atomically); a table is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import torch

import fpgrad
import fpgrad.spectral as spectral
from fpgrad._io import write_json
from fpgrad.errors import ConvergenceWarning

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks" / "spectral_matrix_free.json"
OUT_QUICK = ROOT / "reports" / "benchmarks" / "spectral_matrix_free_quick.json"

CONFIGS = {
    "full": {"batch": 64, "num_slots": 7, "dim": 256, "inputs": 64, "speed_dims": [32, 64, 128, 256, 512],
             "power_budgets": [50, 100, 200, 300], "hutchinson_samples": 64, "dense_check_samples": 2,
             "sigma_min_samples": 8},
    "quick": {"batch": 4, "num_slots": 7, "dim": 64, "inputs": 16, "speed_dims": [16, 32, 64],
              "power_budgets": [50, 100, 300], "hutchinson_samples": 32, "dense_check_samples": 1,
              "sigma_min_samples": 4},
}
SEED = 0
REFERENCE = {"tol": 1e-10, "k": 10, "ncv": 40, "max_iter": 1000}


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs() / b.double().abs()


def _stats(t: torch.Tensor) -> dict:
    t = t.double().reshape(-1)
    return {"max": float(t.max()), "median": float(t.median()), "mean": float(t.mean())}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _problem(dim: int, num_slots: int, batch: int, inputs: int, seed: int):
    """Slot attention (random init, float64) solved by Anderson; samples that do not converge are kept
    (J is still a fine operator there) and counted in the JSON."""
    m = fpgrad.maps.slot_attention(dim=dim, num_slots=num_slots, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inputs, dim, generator=g, dtype=torch.float64)
    (sol, _), seconds = _timed(lambda: _quiet(fpgrad.solve, m, x, method="anderson", tol=1e-10, max_iter=600,
                                              generator=g))
    return m, x, sol, seconds


def _quiet(fn, *args, **kwargs):
    """Run fn, collecting ConvergenceWarnings as strings (they are results here, not noise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def _exact_frobenius(J: spectral.JacobianOperator, chunk: int = 64) -> torch.Tensor:
    """||J||_F per sample from all n rows (batched VJPs with e_j), without storing J."""
    total = torch.zeros(J.batch, dtype=torch.float64)
    eye = torch.eye(J.n, dtype=J.dtype)
    for j0 in range(0, J.n, chunk):
        E = eye[j0:j0 + chunk, None, :].expand(-1, J.batch, J.n)
        total += J._apply(E.contiguous(), transpose=True).double().pow(2).sum(dim=(0, 2))
    return total.sqrt()


def run(mode: str, threads: int) -> dict:
    cfg = CONFIGS[mode]
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    out: dict = {"mode": mode, "config": cfg, "seed": SEED, "reference": REFERENCE, "machine": _machine(threads)}

    # ---- the problem: slot attention at its fixed point --------------------------------------------
    m, x, sol, fwd_seconds = _problem(cfg["dim"], cfg["num_slots"], cfg["batch"], cfg["inputs"], SEED)
    z = sol.z
    slot_spread = ((z - z.mean(1, keepdim=True)).norm(dim=(1, 2)) / z.norm(dim=(1, 2)))
    out["problem"] = {
        "map": m.name, "batch": cfg["batch"], "n_per_sample": int(z[0].numel()), "n_total": int(z.numel()),
        "inputs": cfg["inputs"], "dtype": "float64", "forward": {
            "method": "anderson", "tol": 1e-10, "seconds": fwd_seconds, "steps_max": int(sol.steps.max()),
            "converged": int(sol.converged.sum()), "residual_max": float(sol.residuals[-1].max())},
        "slot_spread_max": float(slot_spread.max()),
    }
    J = spectral.jacobian_operator(m, x, z, check_fixed_point=False)
    out["problem"]["fixed_point_relative_residual_max"] = float(J.relative_residual.max())
    n, B = J.n, J.batch
    v = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    J.matvec(v)
    J.rmatvec(v)
    _, t_jvp = _timed(lambda: [J.matvec(v) for _ in range(5)])
    _, t_vjp = _timed(lambda: [J.rmatvec(v) for _ in range(5)])
    blk = J.block(0)
    blk.matvec(v[:1])
    _, t_blk = _timed(lambda: [blk.matvec(v[:1]) for _ in range(20)])
    out["products"] = {"jvp_mode": J.jvp_mode, "batched_jvp_seconds": t_jvp / 5, "batched_vjp_seconds": t_vjp / 5,
                       "one_sample_jvp_seconds": t_blk / 20}
    print(f"[{mode}] slot attention batch {B}, n = {n} per sample, {B * n} in all; forward "
          f"{fwd_seconds:.1f}s ({int(sol.steps.max())} steps); slots identical at z* to {float(slot_spread.max()):.1e}",
          flush=True)

    # ---- spectral radius: reference, Arnoldi, power ---------------------------------------------------
    t_section = time.perf_counter()
    ref_eig, warn_ref = _quiet(spectral.eigenvalues, J, k=REFERENCE["k"], method="arnoldi", tol=REFERENCE["tol"],
                               ncv=REFERENCE["ncv"], max_iter=REFERENCE["max_iter"], seed=SEED)
    rho_ref = ref_eig.spectral_radius.double()
    top = ref_eig.values.abs().double()
    out["reference"].update({
        "rho": rho_ref.tolist(), "converged": int(ref_eig.converged.sum()), "jvps": ref_eig.jvps,
        "seconds": ref_eig.seconds, "warnings": warn_ref,
        # how clustered the top of the spectrum is: |lambda| of the first value below rho (by 1e-9)
        "next_modulus_ratio": [float(next((v for v in row.tolist() if v < row[0] * (1 - 1e-9)), float("nan"))
                                     / float(row[0])) for row in top],
        "top_moduli_sample0": top[0].tolist()})
    print(f"reference Arnoldi (tol 1e-10): {ref_eig.jvps} JVPs, {ref_eig.seconds:.1f}s, "
          f"{int(ref_eig.converged.sum())}/{B} converged", flush=True)

    rows = []
    arn, warn = _quiet(spectral.spectral_radius_estimate, J, method="arnoldi", seed=SEED)
    rows.append(_row("spectral radius", "arnoldi (defaults: tol 1e-8, k=6)", arn.jvps, arn.vjps, arn.seconds,
                     _rel(arn.value, rho_ref), int(arn.converged.sum()), B, warn,
                     extra={"per_sample_jvps": arn.products.tolist(),
                            "per_sample_jvps_median": float(arn.products.double().median()),
                            "per_sample_jvps_max": int(arn.products.max())}))
    pw, warn = _quiet(spectral.spectral_radius_estimate, J, method="power", seed=SEED)
    rows.append(_row("spectral radius", "power (defaults: tol 1e-7, window 8)", pw.jvps, pw.vjps, pw.seconds,
                     _rel(pw.value, rho_ref), int(pw.converged.sum()), B, warn,
                     extra={"complex_pair": int(pw.complex_pair.sum()),
                            "ratio_spread_max": float(pw.ratio_spread.max()),
                            "uncertainty_max": float(pw.uncertainty.max()),
                            "per_sample_jvps": pw.products.tolist()}))
    budget = max(cfg["power_budgets"])
    curves = {}
    for window in (1, 4, 8, 16):              # window 1: a plain power iteration with a real Rayleigh quotient
        gen = torch.Generator().manual_seed(SEED)
        (res, seconds) = _timed(lambda window=window, gen=gen: spectral.power_iteration(
            J, tol=0.0, max_iter=budget, window=window, generator=gen, history=True))
        err = _rel(res.history[:, 0, :], rho_ref[None, :])                    # [iterations, B]
        curves[window] = {"max_rel_err": err.amax(1).tolist(), "median_rel_err": err.median(1).values.tolist()}
        for b in cfg["power_budgets"]:
            label = f"power, {b} JVPs, window {window}" if window > 1 else f"plain power (window 1), {b} JVPs"
            if window > 1 or b == budget:
                rows.append(_row("spectral radius", label, b, 0, seconds * b / budget, err[b - 1], None, B, [],
                                 extra={"uncertainty_max": float(res.history[b - 1, 1].max())}))
    out["power_curves"] = curves
    err300 = torch.tensor(_per_sample(rows, "power, 300 JVPs, window 8"), dtype=torch.float64)
    out["targets"] = [{
        "target": "spectral radius within 1e-3 relative of the reference in every sample at <= 300 JVPs",
        "method": "power (window 8), 300 batched JVPs",
        "met": bool(float(err300.max()) <= 1e-3), "value": float(err300.max()),
        "samples_within": int((err300 <= 1e-3).sum()), "samples": B,
        "note": "slot attention at z* has identical slots, so its top eigenvalues come in clusters of near-equal "
                "modulus (next distinct modulus / rho up to 0.9996): not the well-separated case the target is for"}]
    out["sections"] = {"spectral_radius_seconds": time.perf_counter() - t_section}
    print(f"spectral radius done ({out['sections']['spectral_radius_seconds']:.0f}s)", flush=True)

    # ---- singular values -------------------------------------------------------------------------------
    t_section = time.perf_counter()
    s_ref, warn_s = _quiet(spectral.singular_values, J, k=1, method="lanczos", tol=1e-12, seed=SEED)
    s_def, warn = _quiet(spectral.singular_values, J, k=1, method="lanczos", seed=SEED)
    rows.append(_row("sigma_max(J)", "lanczos (tol 1e-8) vs tol 1e-12", s_def.jvps, s_def.vjps, s_def.seconds,
                     _rel(s_def.values[:, 0], s_ref.values[:, 0]), int(s_def.converged.sum()), B, warn,
                     extra={"reference_jvps": s_ref.jvps, "reference_seconds": s_ref.seconds,
                            "reference_warnings": warn_s,
                            "values": s_ref.values[:, 0].tolist()}))
    ns = cfg["sigma_min_samples"]                 # the slowest measurement: on the first few samples only
    Jsub = spectral.jacobian_operator(m, x[:ns], z[:ns], check_fixed_point=False)
    s_min, warn = _quiet(spectral.singular_values, Jsub, k=1, of="I-J", which="smallest", method="lanczos",
                         seed=SEED)
    rows.append(_row("sigma_min(I - J)", f"lanczos (tol 1e-8), first {ns} samples", s_min.jvps, s_min.vjps,
                     s_min.seconds, None, int(s_min.converged.sum()), ns, warn,
                     extra={"values": s_min.values[:, 0].tolist()}))
    out["sections"]["singular_values_seconds"] = time.perf_counter() - t_section
    print(f"singular values done ({out['sections']['singular_values_seconds']:.0f}s)", flush=True)

    # ---- Frobenius ---------------------------------------------------------------------------------------
    t_section = time.perf_counter()
    (fro_exact, t_exact) = _timed(lambda: _exact_frobenius(J))
    fro, _ = _quiet(spectral.frobenius_norm, J, method="hutchinson", samples=cfg["hutchinson_samples"], seed=SEED)
    covered = ((fro.interval[:, 0] <= fro_exact) & (fro_exact <= fro.interval[:, 1])).double().mean()
    rows.append(_row("||J||_F", f"hutchinson ({cfg['hutchinson_samples']} probes) vs exact", fro.jvps, fro.vjps,
                     fro.seconds, _rel(fro.value, fro_exact), None, B, [],
                     extra={"coverage_95": float(covered), "exact_seconds": t_exact, "exact_vjps": n,
                            "half_width_rel_median": float(((fro.interval[:, 1] - fro.interval[:, 0]) / 2
                                                            / fro_exact).median()),
                            "exact": fro_exact.tolist()}))
    out["sections"]["frobenius_seconds"] = time.perf_counter() - t_section
    print(f"frobenius done ({out['sections']['frobenius_seconds']:.0f}s)", flush=True)

    # ---- dense cross-check of the reference on a few samples ------------------------------------------
    t_section = time.perf_counter()
    checks = []
    for b in range(cfg["dense_check_samples"]):
        D, t_d = _timed(lambda b=b: J.dense(sample=b))
        ev, t_e = _timed(lambda D=D: torch.linalg.eigvals(D))
        sv = torch.linalg.svdvals(D)
        smin = torch.linalg.svdvals(torch.eye(n, dtype=D.dtype) - D)
        checks.append({"sample": b, "rho_dense": float(ev.abs().max()),
                       "rel_to_reference": float(_rel(ev.abs().max(), rho_ref[b])),
                       "sigma_max_dense": float(sv[0]),
                       "sigma_max_rel_to_lanczos": float(_rel(sv[0], s_ref.values[b, 0])),
                       "frobenius_rel_to_exact": float(_rel(torch.linalg.matrix_norm(D), fro_exact[b])),
                       "sigma_min_I_minus_J_dense": float(smin[-1]),
                       "sigma_min_rel_to_lanczos": (float(_rel(smin[-1], s_min.values[b, 0]))
                                                    if b < s_min.values.shape[0] else None),
                       "materialise_seconds": t_d, "eigvals_seconds": t_e,
                       "top_moduli": ev.abs().sort(descending=True).values[:16].tolist()})
    out["dense_check"] = checks
    out["sections"]["dense_check_seconds"] = time.perf_counter() - t_section
    print(f"dense check done ({out['sections']['dense_check_seconds']:.0f}s)", flush=True)

    # ---- speed: dense vs Arnoldi on one sample block ---------------------------------------------------
    speed = []
    for dim in cfg["speed_dims"]:
        ms, xs, ss, _ = _problem(dim, cfg["num_slots"], 1, cfg["inputs"], SEED)
        Js = spectral.jacobian_operator(ms, xs, ss.z, check_fixed_point=False)
        Js.matvec(torch.zeros(1, Js.n, dtype=torch.float64))                    # warm up both products
        Js.rmatvec(torch.zeros(1, Js.n, dtype=torch.float64))
        repeats = 3 if Js.n <= 1000 else 1           # the minimum over repeats: robust to a busy machine
        t_mat = t_eig = t_arn = t_pow = math.inf
        for _ in range(repeats):
            Jd = spectral.jacobian_operator(ms, xs, ss.z, check_fixed_point=False)
            D, t = _timed(lambda Jd=Jd: Jd.dense())
            t_mat = min(t_mat, t)
            ev, t = _timed(lambda D=D: torch.linalg.eigvals(D))
            t_eig = min(t_eig, t)
            a, _ = _quiet(spectral.spectral_radius_estimate, Js, method="arnoldi", seed=SEED)
            p, _ = _quiet(spectral.spectral_radius_estimate, Js, method="power", seed=SEED)
            t_arn, t_pow = min(t_arn, a.seconds), min(t_pow, p.seconds)
        rho_dense = ev.abs().max()
        speed.append({"dim": dim, "n": Js.n, "repeats": repeats, "dense_seconds": t_mat + t_eig,
                      "dense_materialise_seconds": t_mat, "dense_eigvals_seconds": t_eig,
                      "arnoldi_seconds": t_arn, "arnoldi_jvps": a.jvps,
                      "arnoldi_rel_err": float(_rel(a.value, rho_dense).max()),
                      "power_seconds": t_pow, "power_jvps": p.jvps, "power_converged": bool(p.converged.all()),
                      "power_rel_err": float(_rel(p.value, rho_dense).max()),
                      "dense_over_arnoldi": (t_mat + t_eig) / t_arn})
        print(f"speed n={Js.n}: dense {t_mat + t_eig:.2f}s, arnoldi {t_arn:.2f}s", flush=True)
    out["speed"] = speed
    out["rows"] = rows
    out["seconds"] = time.perf_counter() - t_start
    out["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def _per_sample(rows: list, method: str) -> list:
    return next(r["rel_err_per_sample"] for r in rows if r["method"] == method)


def _row(quantity, method, jvps, vjps, seconds, rel_err, converged, batch, warns, extra=None) -> dict:
    row = {"quantity": quantity, "method": method, "jvps": int(jvps), "vjps": int(vjps), "seconds": float(seconds),
           "rel_err": None if rel_err is None else _stats(rel_err),
           "rel_err_per_sample": None if rel_err is None else rel_err.double().tolist(),
           "converged": converged, "batch": batch, "warnings": warns}
    row.update(extra or {})
    return row


def _machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "machine": platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "scipy": scipy.__version__,
            "numpy": np.__version__, "fpgrad": getattr(fpgrad, "__version__", "?"), "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _fmt(x, spec=".1e"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(out: dict) -> str:
    p = out["problem"]
    lines = [f"slot attention, batch {p['batch']} x n {p['n_per_sample']} = {p['n_total']} state entries "
             f"(float64, {out['machine']['torch_threads']} threads, load {out['machine']['loadavg_start']})",
             f"reference: Arnoldi tol {out['reference']['tol']:g}, k {out['reference']['k']}, ncv "
             f"{out['reference']['ncv']}: {out['reference']['jvps']} JVPs, {out['reference']['seconds']:.1f}s, "
             f"{out['reference']['converged']}/{p['batch']} converged",
             "",
             f"{'quantity':<18}{'method':<38}{'JVPs':>7}{'VJPs':>7}{'seconds':>9}{'max rel err':>13}"
             f"{'median':>10}{'conv':>7}"]
    for r in out["rows"]:
        err = r["rel_err"] or {}
        conv = "-" if r["converged"] is None else f"{r['converged']}/{r['batch']}"
        lines.append(f"{r['quantity']:<18}{r['method']:<38}{r['jvps']:>7}{r['vjps']:>7}{r['seconds']:>9.2f}"
                     f"{_fmt(err.get('max')):>13}{_fmt(err.get('median')):>10}{conv:>7}")
        if "coverage_95" in r:
            lines.append(f"{'':<18}  95% interval coverage {r['coverage_95']:.2f}, median half-width "
                         f"{r['half_width_rel_median']:.1e} (exact: {r['exact_vjps']} batched VJPs, "
                         f"{r['exact_seconds']:.1f}s)")
    lines += ["", f"{'one sample block':<18}{'n':>6}{'dense s':>10}{'arnoldi s':>11}{'JVPs':>7}{'dense/arnoldi':>15}"
              f"{'arnoldi err':>13}{'power s':>9}{'power err':>11}"]
    for s in out["speed"]:
        lines.append(f"{'':<18}{s['n']:>6}{s['dense_seconds']:>10.2f}{s['arnoldi_seconds']:>11.2f}"
                     f"{s['arnoldi_jvps']:>7}{s['dense_over_arnoldi']:>15.1f}{_fmt(s['arnoldi_rel_err']):>13}"
                     f"{s['power_seconds']:>9.2f}{_fmt(s['power_rel_err']):>11}")
    for c in out["dense_check"]:
        lines.append(f"dense check, sample {c['sample']}: rho rel to reference {c['rel_to_reference']:.1e}, "
                     f"sigma_max rel {c['sigma_max_rel_to_lanczos']:.1e}, "
                     f"sigma_min(I - J) rel {_fmt(c['sigma_min_rel_to_lanczos'])}, "
                     f"||J||_F rel {c['frobenius_rel_to_exact']:.1e}")
    for t in out.get("targets", []):
        lines.append(f"target: {t['target']} ({t['method']}): {'met' if t['met'] else 'NOT met'}, max error "
                     f"{t['value']:.1e}, {t['samples_within']}/{t['samples']} samples within")
    lines.append(f"total {out['seconds']:.0f}s")
    return "\n".join(lines)


def save(out: dict, path: Path) -> None:
    """Write JSON atomically (NaN / Inf as strings, as in SpectralSummary)."""
    write_json(path, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 second version (batch 4, dim 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.relative_to(ROOT)}, "
                                                           f"or {OUT_QUICK.relative_to(ROOT)} with --quick)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = run(mode, args.threads)
    print()
    print(table(out))
    path = args.out or (OUT_QUICK if args.quick else OUT)
    save(out, path)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
