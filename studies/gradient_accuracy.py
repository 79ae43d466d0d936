"""Study `gradient-accuracy`: how close each gradient estimator comes to the exact implicit gradient, and at
what cost, as the map's spectral radius and the forward / backward budgets vary.

Maps: tanh toy maps z = tanh(W z + U x + b) with rho(W) from 0.3 to 0.99 (rho(J) at z* measured, dense),
slot attention at its random init and with its recurrent weights shrunk (more contractive).
Budgets: forward iterations T (a few, or converged) and the backward budget of each estimator (Truncated k,
Neumann k, Phantom k, Implicit tolerance). Every estimator is scored against the exact gradient at the true
fixed point: Implicit(dense) on a z* converged to 1e-12 (checked against GMRES at 1e-12), itself checked
against float64 central finite differences on small maps (rows of kind "fd_check").
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fpgrad
from fpgrad.compare import compare_estimators, cosine, describe, flat_gradient, relative_error
from fpgrad.estimators import FiniteDifference, Implicit, Neumann, OneStep, Phantom, Truncated, Unrolled
from fpgrad.forward import Iterate, get_forward
from fpgrad.report import atomic_write_text, figure_style, markdown_table, new_figure, save_figure
from fpgrad.spectral import spectral_radius
from fpgrad.study import Study
from fpgrad.study_tools import (
    provenance_markdown,
    scale_recurrent_weights,
    torch_threads,
    write_csv,
)

NAME = "gradient-accuracy"
CONVERGED = "converged"
REFERENCE_TOL = 1e-12          # forward tolerance of z* and GMRES tolerance of the reference check
MAX_PICARD = 20000             # plain iterations allowed to reach REFERENCE_TOL
SEED_STRIDE = 7919             # instance i of a map draws everything from seed + SEED_STRIDE * i
THREADS = 1

FULL = {
    "tanh": {"n": 64, "batch": 4, "input_scale": 0.05, "bias_scale": 0.02,
             "rho_W": [0.3, 0.5, 0.7, 0.9, 0.95, 0.99]},
    "slot_attention": {"dim": 16, "num_slots": 4, "inputs": 32, "batch": 4, "recurrent_scales": [1.0, 0.3]},
    "T": [5, 10, 30, CONVERGED],
    "budgets": {"truncated": [1, 3, 10, 30, 100], "neumann": [1, 3, 10, 30, 100, 300],
                "phantom": [3, 10, 30, 100], "phantom_tau": 0.5,
                "implicit_tol": [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]},
    "sweep": {"instances": 10, "rho_W": [0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.995, 0.999]},
    "fd": [{"map": "tanh", "n": 6, "batch": 2, "input_scale": 0.05, "bias_scale": 0.02, "rho_W": 0.9},
           {"map": "slot_attention", "dim": 4, "hidden_dim": 6, "num_slots": 2, "inputs": 5, "batch": 1,
            "recurrent_scale": 1.0}],
}

QUICK = {
    "tanh": {"n": 16, "batch": 2, "input_scale": 0.05, "bias_scale": 0.02, "rho_W": [0.5, 0.95]},
    "slot_attention": {"dim": 8, "num_slots": 3, "inputs": 8, "batch": 2, "recurrent_scales": [0.3]},
    "T": [5, CONVERGED],
    "budgets": {"truncated": [3], "neumann": [3, 30], "phantom": [10], "phantom_tau": 0.5,
                "implicit_tol": [1e-4, 1e-10]},
    "sweep": {"instances": 2, "rho_W": [0.5, 0.95]},
    "fd": [{"map": "tanh", "n": 4, "batch": 2, "input_scale": 0.05, "bias_scale": 0.02, "rho_W": 0.9},
           {"map": "slot_attention", "dim": 4, "hidden_dim": 6, "num_slots": 2, "inputs": 4, "batch": 1,
            "recurrent_scale": 1.0}],
}

FAMILIES = ["Unrolled", "Truncated", "OneStep", "Neumann", "Phantom", "Implicit"]


# ---- the grid ---------------------------------------------------------------------------------------

def grid(quick: bool) -> list[dict]:
    s = QUICK if quick else FULL
    t, sa = s["tanh"], s["slot_attention"]
    maps = [{"map": "tanh", "n": t["n"], "batch": t["batch"], "input_scale": t["input_scale"],
             "bias_scale": t["bias_scale"], "rho_W": r} for r in t["rho_W"]]
    maps += [{"map": "slot_attention", "dim": sa["dim"], "num_slots": sa["num_slots"], "inputs": sa["inputs"],
              "batch": sa["batch"], "recurrent_scale": scale} for scale in sa["recurrent_scales"]]
    configs = [{"kind": "accuracy", **mp, "T": T, "budgets": s["budgets"]} for mp in maps for T in s["T"]]
    configs += [{"kind": "fd_check", **mp} for mp in s["fd"]]
    # OneStep alone on many instances (seeds) of each map: where does it stop being a descent direction?
    sw = s["sweep"]
    sweep_maps = [{**maps[0], "rho_W": r} for r in sw["rho_W"]] + [mp for mp in maps if mp["map"] != "tanh"]
    configs += [{"kind": "one_step_sweep", **mp, "instance": i, "T": s["T"]}
                for mp in sweep_maps for i in range(sw["instances"])]
    return configs


def map_label(c: dict) -> str:
    if c["map"] == "tanh":
        return f"tanh ρ(W)={c['rho_W']:g}"
    scale = c.get("recurrent_scale", 1.0)
    return "slot attention, init" if scale == 1.0 else f"slot attention, recurrent ×{scale:g}"


# ---- one configuration ------------------------------------------------------------------------------

def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * int(seed) + stream)


def build_problem(c: dict):
    """(map, x, z0, target) of a configuration, float64, all randomness from c["seed"]."""
    f64 = torch.float64
    seed = int(c["seed"]) + SEED_STRIDE * int(c.get("instance", 0))
    if c["map"] == "tanh":
        m = fpgrad.maps.tanh_rnn(n=c["n"], spectral_radius=c["rho_W"], seed=seed, bias_scale=c["bias_scale"],
                                 dtype=f64)
        x = c["input_scale"] * torch.randn(c["batch"], c["n"], generator=_generator(seed, 1), dtype=f64)
    else:
        m = fpgrad.maps.slot_attention(dim=c["dim"], num_slots=c["num_slots"], seed=seed,
                                       hidden_dim=c.get("hidden_dim"), dtype=f64)
        if c.get("recurrent_scale", 1.0) != 1.0:
            m = scale_recurrent_weights(m, c["recurrent_scale"])
        x = torch.randn(c["batch"], c["inputs"], c["dim"], generator=_generator(seed, 1), dtype=f64)
    with torch.no_grad():
        z0 = m.init_state(x, _generator(seed, 3))
    target = torch.randn(z0.shape, generator=_generator(seed, 2), dtype=f64)
    return m, x, z0, target


def squared_error(target: torch.Tensor):
    """loss_fn(z) = mean((z - target)^2)."""
    def loss_fn(z):
        return ((z - target) ** 2).mean()
    return loss_fn


def estimators_at(T: Any, T_converged: int, budgets: dict) -> list:
    """Every estimator of the grid at forward budget T (an int, or CONVERGED)."""
    converged = T == CONVERGED
    out: list = [Unrolled(T_converged if converged else int(T))]
    for k in budgets["truncated"]:
        if converged:
            out.append(Truncated(k))
        elif k < int(T):
            out.append(Truncated(k, T=int(T)))
    out.append(OneStep())
    out += [Neumann(k) for k in budgets["neumann"]]
    out += [Phantom(k, budgets["phantom_tau"]) for k in budgets["phantom"]]
    out += [Implicit(solver="gmres", tol=tol, max_iter=2000) for tol in budgets["implicit_tol"]]
    return out


def estimator_label(est) -> str:
    """compare.describe, with the tolerance for Implicit (describe drops it)."""
    if isinstance(est, Implicit):
        return f"Implicit({est.solver}, {est.tol:g})"
    return describe(est)


def family_and_budget(est) -> tuple[str, Any]:
    if isinstance(est, Unrolled):
        return "Unrolled", est.T
    if isinstance(est, Truncated):
        return "Truncated", est.k
    if isinstance(est, OneStep):
        return "OneStep", None
    if isinstance(est, Neumann):
        return "Neumann", est.k
    if isinstance(est, Phantom):
        return "Phantom", est.k
    if isinstance(est, Implicit):
        return "Implicit", est.tol
    return type(est).__name__, None


def _float(v) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def reference_forward():
    """Plain iteration to a relative residual of REFERENCE_TOL: the true z* (and what 'converged' means for T)."""
    return get_forward("iterate", tol=REFERENCE_TOL, max_iter=MAX_PICARD, warn=False)


def converged_problem(c: dict):
    """The configuration's problem restricted to the samples on which plain iteration converges.

    Returns (map, x, z0, target, picard FixedPoint on the kept samples, dropped: list of (sample, residual)).
    A sample on which it does not converge within MAX_PICARD steps has no attracting fixed point to score
    against (rho(J) >= 1 there, or no fixed point): it is dropped, and the row says so.
    """
    m, x, z0, target = build_problem(c)
    picard = fpgrad.solve(m, x, z0=z0, method=reference_forward())
    keep = picard.converged
    if not bool(keep.any()):
        raise RuntimeError(f"{m.name}: plain iteration converges on no sample ({picard.message})")
    dropped = [(int(i), float(picard.relative_residuals[-1, i])) for i in (~keep).nonzero().reshape(-1)]
    if dropped:
        x, z0, target = x[keep], z0[keep], target[keep]
        picard = fpgrad.solve(m, x, z0=z0, method=reference_forward())
    return m, x, z0, target, picard, dropped


def exact_gradient(m, x, z0, loss_fn, check: bool = True):
    """The exact gradient at the true fixed point, Implicit(dense) on z* from reference_forward(), and (check)
    its relative difference to Implicit(gmres, tol=REFERENCE_TOL) on the same z*."""
    forward = reference_forward()
    ref = fpgrad.gradient(m, x, loss_fn, estimator=Implicit(solver="dense"), z0=z0, forward=forward)
    if not bool(torch.as_tensor(ref.forward.converged).all()):
        raise RuntimeError(f"{m.name}: the reference forward solve did not converge ({ref.forward.message})")
    if not check:
        return ref, None, None
    check = fpgrad.gradient(m, x, loss_fn, estimator=Implicit(solver="gmres", tol=REFERENCE_TOL, max_iter=5000),
                            z0=z0, forward=forward)
    return ref, check, relative_error(flat_gradient(check), flat_gradient(ref))


def _relative_distance(z: torch.Tensor, z_star: torch.Tensor) -> float:
    """max over samples of ||z - z*|| / ||z*||."""
    B = z.shape[0]
    d = (z - z_star).reshape(B, -1).norm(dim=1) / z_star.reshape(B, -1).norm(dim=1)
    return float(d.max())


def run_accuracy(c: dict) -> dict:
    t0 = time.perf_counter()
    m, x, z0, target, picard, dropped = converged_problem(c)
    loss_fn = squared_error(target)
    ref, _, gmres_vs_dense = exact_gradient(m, x, z0, loss_fn)
    rho = spectral_radius(m, x, ref.z, method="dense")
    T_converged = int(picard.steps.max()) - 1          # steps counts f(z0) too; z_T has residual <= tol
    T = c["T"]
    if T == CONVERGED:
        forward, z_T = reference_forward(), ref.z
        forward_residual = float(ref.forward.relative_residuals[-1].max())
    else:
        forward = Iterate.exactly(int(T))
        fp = fpgrad.solve(m, x, z0=z0, method=forward)
        z_T, forward_residual = fp.z, float(fp.relative_residuals[-1].max())
    rho_T = spectral_radius(m, x, z_T, method="dense", check_fixed_point=False)
    ests = estimators_at(T, T_converged, c["budgets"])
    compared = compare_estimators(m, x, loss_fn, ests, reference=ref, z0=z0, forward=forward,
                                  labels=[estimator_label(e) for e in ests])
    results = []
    for est, r in zip(ests, compared, strict=True):
        family, budget = family_and_budget(est)
        entry = {"estimator": r["estimator"], "family": family, "budget": budget,
                 "relative_error": _float(r["relative_error"]), "cosine": _float(r["cosine"]),
                 "relative_error_x": _float(r["relative_error_x"]), "vjps": int(r["vjps"]), "jvps": int(r["jvps"]),
                 "forward_steps": int(r["forward_steps"]), "backward_steps": int(r["backward_steps"]),
                 "seconds": float(r["seconds"]), "warnings": [str(w) for w in r.get("warnings", [])]}
        if "error" in r:
            entry["error"] = r["error"]
        results.append(entry)
    return {
        "kind": "accuracy", "map_label": map_label(c), "map_name": m.name, "num_params": m.num_params(),
        "state_size": int(z0[0].numel()), "samples": int(x.shape[0]),
        "dropped_samples": [i for i, _ in dropped], "dropped_residuals": [r for _, r in dropped],
        "rho_J": float(rho.max()), "rho_J_min": float(rho.min()), "rho_J_samples": [float(v) for v in rho],
        "T_label": str(T), "T_iterations": T_converged if T == CONVERGED else int(T),
        "T_converged": T_converged, "forward_relative_residual": forward_residual,
        "forward_distance": _relative_distance(z_T, ref.z), "rho_J_at_z_T": float(rho_T.max()),
        "reference": "Implicit(dense)", "reference_forward_steps": int(ref.forward.evaluations),
        "reference_gmres_vs_dense": gmres_vs_dense,
        "estimators": results, "seconds": time.perf_counter() - t0,
    }


def run_fd_check(c: dict) -> dict:
    t0 = time.perf_counter()
    m, x, z0, target, _, dropped = converged_problem(c)
    loss_fn = squared_error(target)
    ref, gmres, gmres_vs_dense = exact_gradient(m, x, z0, loss_fn)
    t1 = time.perf_counter()
    fd = fpgrad.gradient(m, x, loss_fn, estimator=FiniteDifference(wrt_x=False), z0=z0)
    fd_seconds = time.perf_counter() - t1
    rho = spectral_radius(m, x, ref.z, method="dense")
    fd_flat, ref_flat = flat_gradient(fd), flat_gradient(ref)
    return {
        "kind": "fd_check", "map_label": map_label(c) + f" (small: {m.num_params()} params)", "map_name": m.name,
        "num_params": m.num_params(), "state_size": int(z0[0].numel()), "samples": int(x.shape[0]),
        "dropped_samples": [i for i, _ in dropped],
        "rho_J": float(rho.max()), "rho_J_min": float(rho.min()),
        "implicit_dense_vs_fd": relative_error(ref_flat, fd_flat),
        "implicit_gmres_vs_fd": relative_error(flat_gradient(gmres), fd_flat),
        "cosine_dense_fd": cosine(ref_flat, fd_flat), "reference_gmres_vs_dense": gmres_vs_dense,
        "fd_solves": 2 * m.num_params(), "fd_seconds": fd_seconds, "seconds": time.perf_counter() - t0,
    }


def run_one_step_sweep(c: dict) -> dict:
    t0 = time.perf_counter()
    m, x, z0, target, _, dropped = converged_problem(c)
    loss_fn = squared_error(target)
    ref, _, _ = exact_gradient(m, x, z0, loss_fn, check=False)
    rho = spectral_radius(m, x, ref.z, method="dense")
    ref_flat = flat_gradient(ref)
    one_step = []
    for T in c["T"]:
        forward = reference_forward() if T == CONVERGED else Iterate.exactly(int(T))
        g = fpgrad.gradient(m, x, loss_fn, estimator=OneStep(), z0=z0, forward=forward)
        flat = flat_gradient(g)
        one_step.append({"T": str(T), "relative_error": relative_error(flat, ref_flat),
                         "cosine": _float(cosine(flat, ref_flat)),
                         "norm_ratio": float(flat.norm() / ref_flat.norm())})
    return {"kind": "one_step_sweep", "map_label": map_label(c), "instance": int(c["instance"]),
            "samples": int(x.shape[0]), "dropped_samples": [i for i, _ in dropped],
            "rho_J": float(rho.max()), "rho_J_min": float(rho.min()), "one_step": one_step,
            "seconds": time.perf_counter() - t0}


RUNS = {"accuracy": run_accuracy, "fd_check": run_fd_check, "one_step_sweep": run_one_step_sweep}


def run(c: dict) -> dict:
    # one thread: these problems are tiny, and a second thread only waits (badly so on a busy machine)
    with torch_threads(THREADS):
        return RUNS[c["kind"]](c)


# ---- tables -----------------------------------------------------------------------------------------

def estimator_table(rows: list[dict]) -> list[dict]:
    """One flat record per (configuration, estimator)."""
    out = []
    for r in rows:
        if r.get("kind") != "accuracy":
            continue
        for e in r["estimators"]:
            out.append({"map": r["map_label"], "rho_W": r["config"].get("rho_W"), "rho_J": r["rho_J"],
                        "rho_J_min": r["rho_J_min"], "T": r["T_label"], "T_iterations": r["T_iterations"],
                        "forward_relative_residual": r["forward_relative_residual"],
                        "forward_distance": r["forward_distance"], "rho_J_at_z_T": r["rho_J_at_z_T"],
                        "estimator": e["estimator"], "family": e["family"], "budget": e["budget"],
                        "relative_error": e["relative_error"], "cosine": e["cosine"],
                        "relative_error_x": e["relative_error_x"], "vjps": e["vjps"], "jvps": e["jvps"],
                        "forward_steps": e["forward_steps"], "backward_steps": e["backward_steps"],
                        "seconds": e["seconds"], "warnings": len(e["warnings"]), "error": e.get("error")})
    return out


ESTIMATOR_COLUMNS = ["map", "rho_W", "rho_J", "rho_J_min", "T", "T_iterations", "forward_relative_residual",
                     "forward_distance", "rho_J_at_z_T", "estimator", "family", "budget", "relative_error", "cosine",
                     "relative_error_x", "vjps", "jvps", "forward_steps", "backward_steps", "seconds", "warnings",
                     "error"]


def _maps_in_order(rows: list[dict]) -> list[str]:
    """Map labels, tanh maps by rho(W) first, then slot attention, as the grid lists them."""
    return list(dict.fromkeys(r["map_label"] for r in rows if r.get("kind") == "accuracy"))


def _T_order(rows: list[dict]) -> list[str]:
    labels = list(dict.fromkeys(r["T_label"] for r in rows if r.get("kind") == "accuracy"))
    return sorted(labels, key=lambda t: math.inf if t == CONVERGED else int(t))


def _find(table: list[dict], **match) -> list[dict]:
    return [r for r in table if all(r.get(k) == v for k, v in match.items())]


def map_summary(rows: list[dict]) -> list[dict]:
    out = []
    for label in _maps_in_order(rows):
        mine = [r for r in rows if r.get("kind") == "accuracy" and r["map_label"] == label]
        rec = {"map": label, "rho_W": mine[0]["config"].get("rho_W"), "rho_J": mine[0]["rho_J"],
               "rho_J_min": mine[0]["rho_J_min"], "T_converged": mine[0]["T_converged"],
               "reference_gmres_vs_dense": max(r["reference_gmres_vs_dense"] for r in mine),
               "num_params": mine[0]["num_params"], "state_size": mine[0]["state_size"],
               "samples": mine[0].get("samples"), "dropped": len(mine[0].get("dropped_samples", []))}
        for r in mine:
            if r["T_label"] != CONVERGED:
                rec[f"distance_T{r['T_label']}"] = r["forward_distance"]
                rec[f"rho_T{r['T_label']}"] = r["rho_J_at_z_T"]
        out.append(rec)
    return out


def one_step_summary(table: list[dict], rows: list[dict]) -> list[dict]:
    out = []
    for label in _maps_in_order(rows):
        rec: dict[str, Any] = {"map": label}
        for e in _find(table, map=label, family="OneStep"):
            rec["rho_J"] = e["rho_J"]
            rec[f"error_T{e['T']}"] = e["relative_error"]
            rec[f"cosine_T{e['T']}"] = e["cosine"]
        out.append(rec)
    return out


def cheapest_budgets(table: list[dict], rows: list[dict], thresholds=(1e-1, 1e-2, 1e-6)) -> list[dict]:
    """Per map and estimator family: the fewest VJPs + JVPs reaching each relative-error threshold.
    Unrolled over every T (its budget is T); the other families on the converged forward pass."""
    out = []
    for label in _maps_in_order(rows):
        for family in FAMILIES:
            pool = [e for e in _find(table, map=label, family=family)
                    if family == "Unrolled" or e["T"] == CONVERGED]
            if not pool:
                continue
            rec: dict[str, Any] = {"map": label, "rho_J": pool[0]["rho_J"], "family": family}
            for thr in thresholds:
                ok = [e["vjps"] + e["jvps"] for e in pool if e["relative_error"] is not None
                      and e["relative_error"] <= thr]
                rec[f"cost_{thr:g}"] = min(ok) if ok else None
            out.append(rec)
    return out


def converged_pivot(table: list[dict], rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Relative error of every estimator (rows) on every map (columns), converged forward pass."""
    maps = _maps_in_order(rows)
    conv = _find(table, T=CONVERGED)
    names = list(dict.fromkeys(e["estimator"] for e in conv if e["family"] != "Unrolled"))
    out = [{"estimator": "Unrolled(T_conv)",
            **{mp: next((e["relative_error"] for e in _find(conv, map=mp, family="Unrolled")), None) for mp in maps}}]
    for name in names:
        rec = {"estimator": name}
        for mp in maps:
            hit = _find(conv, map=mp, estimator=name)
            rec[mp] = hit[0]["relative_error"] if hit else None
        out.append(rec)
    return out, maps


def _sci(v) -> str:
    return "-" if v is None else (f"{v:.1e}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v))


def _fix3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


# ---- figures ----------------------------------------------------------------------------------------

FLOOR = 1e-16


def _family_colors() -> dict:
    import seaborn as sns
    cb = sns.color_palette("colorblind")
    # blue, orange, green, lilac, brown, near-black: distinct hues (the palette's orange and vermillion are not)
    return dict(zip(FAMILIES, [cb[0], cb[1], cb[2], cb[4], cb[5], (0.15, 0.15, 0.15)], strict=True))


_MARKERS = {"Unrolled": "o", "Truncated": "s", "OneStep": "*", "Neumann": "D", "Phantom": "^", "Implicit": "v"}


def _draw_cost_panel(ax, entries: list[dict], colors: dict, legend: bool) -> None:
    bad_x, bad_y = [], []
    for family in FAMILIES:
        group = [e for e in entries if e["family"] == family and e["relative_error"] is not None]
        if not group:
            continue
        group.sort(key=lambda e: e["vjps"] + e["jvps"])
        xs = np.array([e["vjps"] + e["jvps"] for e in group], dtype=float)
        ys = np.maximum(np.array([e["relative_error"] for e in group], dtype=float), FLOOR)
        ax.plot(xs, ys, color=colors[family], lw=1.0, alpha=0.7)
        ax.scatter(xs, ys, color=colors[family], marker=_MARKERS[family], s=60 if family == "OneStep" else 28,
                   zorder=3, label=family if legend else None, edgecolors="white", linewidths=0.4)
        for e, xv, yv in zip(group, xs, ys, strict=True):
            if e["cosine"] is not None and not e["cosine"] > 0:
                bad_x.append(xv)
                bad_y.append(yv)
    if bad_x:
        ax.scatter(bad_x, bad_y, s=150, facecolors="none", edgecolors="crimson", linewidths=1.4, zorder=4,
                   label="cosine ≤ 0" if legend else None)
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")


def _panel_title(label: str, entries: list[dict]) -> str:
    rho = entries[0]["rho_J"] if entries else math.nan
    return f"{label}\nρ(J) = {rho:.3f}"


def error_vs_cost_figure(table: list[dict], rows: list[dict]):
    """One panel per map: relative error vs VJPs + JVPs per estimator family on the converged forward pass
    (Unrolled over every T, since T is its budget)."""
    maps = _maps_in_order(rows)
    colors = _family_colors()
    cols = min(4, len(maps))
    nrows = math.ceil(len(maps) / cols)
    with figure_style():
        fig, axes = new_figure(3.3 * cols + 1.6, 3.0 * nrows, nrows=nrows, ncols=cols, sharex=True, sharey=True)
        for i, label in enumerate(maps):
            ax = axes[i // cols, i % cols]
            entries = [e for e in _find(table, map=label) if e["family"] == "Unrolled" or e["T"] == CONVERGED]
            _draw_cost_panel(ax, entries, colors, legend=i == 0)
            ax.set_title(_panel_title(label, entries), fontsize=9)
        for j in range(len(maps), nrows * cols):
            axes[j // cols, j % cols].set_visible(False)
        for ax in axes[-1, :]:
            ax.set_xlabel("backward cost: VJPs + JVPs")
        for ax in axes[:, 0]:
            ax.set_ylabel("relative error of ∇θ")
        fig.legend(loc="outside right center", fontsize=8)
        fig.suptitle("Gradient error vs backward cost (forward pass converged; Unrolled over T)", fontsize=11)
    return fig


def error_vs_cost_by_T_figure(table: list[dict], rows: list[dict]):
    """Rows: forward iterations T; columns: maps; every estimator run after exactly T iterations."""
    maps = _maps_in_order(rows)
    Ts = _T_order(rows)
    colors = _family_colors()
    with figure_style():
        fig, axes = new_figure(2.5 * len(maps) + 1.6, 2.4 * len(Ts), nrows=len(Ts), ncols=len(maps),
                               sharex=True, sharey=True)
        for i, T in enumerate(Ts):
            for j, label in enumerate(maps):
                ax = axes[i, j]
                entries = _find(table, map=label, T=T)
                _draw_cost_panel(ax, entries, colors, legend=i == 0 and j == 0)
                if i == 0:
                    ax.set_title(_panel_title(label, entries), fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"T = {T}\nrelative error", fontsize=9)
                if i == len(Ts) - 1:
                    ax.set_xlabel("VJPs + JVPs", fontsize=8)
        fig.legend(loc="outside right center", fontsize=8)
        fig.suptitle("Gradient error vs backward cost after exactly T forward iterations "
                     "(scored against the exact gradient at the true z*)", fontsize=11)
    return fig


def sweep_table(rows: list[dict]) -> list[dict]:
    """One flat record per (sweep instance, T): OneStep's error and cosine with the instance's rho(J)."""
    out = []
    for r in rows:
        if r.get("kind") != "one_step_sweep":
            continue
        for e in r["one_step"]:
            out.append({"map": r["map_label"], "map_kind": r["config"]["map"], "instance": r["instance"],
                        "rho_W": r["config"].get("rho_W"), "rho_J": r["rho_J"], "rho_J_min": r["rho_J_min"],
                        "T": e["T"], "relative_error": e["relative_error"], "cosine": e["cosine"],
                        "norm_ratio": e["norm_ratio"],
                        "samples": r["samples"], "dropped": len(r["dropped_samples"])})
    return out


SWEEP_COLUMNS = ["map", "instance", "rho_W", "rho_J_min", "rho_J", "T", "relative_error", "cosine", "norm_ratio",
                 "samples", "dropped"]


def _T_colors(Ts: list[str]) -> dict:
    import seaborn as sns
    cb = sns.color_palette("colorblind")
    colors = [cb[3], cb[2], cb[4], cb[0], cb[1], cb[9]]
    return {T: colors[i % len(colors)] for i, T in enumerate(Ts)}


def one_step_figure(sweep: list[dict], rows: list[dict]):
    """OneStep's relative error and cosine to the exact gradient vs rho(J) over every sweep instance, coloured by T;
    lines through the tanh maps' medians per rho(W)."""
    Ts = _T_order(rows)
    palette = _T_colors(Ts)
    labels = list(dict.fromkeys(e["map"] for e in sweep if e["map_kind"] != "tanh"))
    markers = {"tanh": "o", **dict(zip(labels, ["s", "D", "^", "v"], strict=False))}
    with figure_style():
        fig, axes = new_figure(11.0, 4.3, nrows=1, ncols=2)
        for k, (key, ylabel) in enumerate((("relative_error", "relative error of ∇θ"),
                                           ("cosine", "cosine(OneStep, exact)"))):
            ax = axes[0, k]
            for T in Ts:
                pts = [e for e in sweep if e["T"] == T and e[key] is not None]
                for group, marker in markers.items():
                    mine = [e for e in pts if (e["map_kind"] == "tanh") == (group == "tanh")
                            and (group == "tanh" or e["map"] == group)]
                    if not mine:
                        continue
                    ax.scatter([e["rho_J"] for e in mine], [e[key] for e in mine], color=palette[T], marker=marker,
                               s=16 if group == "tanh" else 26, alpha=0.55, linewidths=0,
                               label=(f"T = {T}" if group == "tanh" else None))
                tanh = [e for e in pts if e["map_kind"] == "tanh"]
                by_rho = sorted({e["rho_W"] for e in tanh})
                xs = [float(np.median([e["rho_J"] for e in tanh if e["rho_W"] == r])) for r in by_rho]
                ys = [float(np.median([e[key] for e in tanh if e["rho_W"] == r])) for r in by_rho]
                ax.plot(xs, ys, color=palette[T], lw=1.2)
            for group, marker in markers.items():
                ax.scatter([], [], color="0.4", marker=marker, s=26,
                           label="tanh (line: median per ρ(W))" if group == "tanh" else group)
            if key == "relative_error":
                ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
                ax.set_ylim(bottom=0.0)
            else:
                ax.axhline(0.0, color="crimson", lw=1.0, ls="--", label="cosine = 0")
                ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.02)
            ax.set_xlabel("ρ(J) at z* (max over the instance's samples)")
            ax.set_ylabel(ylabel)
        axes[0, 1].legend(loc="lower left", fontsize=7)
        n = len({(e["map"], e["instance"]) for e in sweep})
        fig.suptitle(f"The one-step gradient (Chang et al. 2022) against the exact implicit gradient: {n} map "
                     "instances", fontsize=11)
    return fig


# ---- the written reading ------------------------------------------------------------------------------

def descent_bullets(sweep: list[dict]) -> list[str]:
    """What the OneStep sweep says about error growth and descent (cosine > 0) across map instances."""
    cases = [e for e in sweep if e["cosine"] is not None]
    if not cases:
        return []
    out = []
    instances = len({(e["map"], e["instance"]) for e in cases})
    per_map = max(e["instance"] for e in cases) + 1
    conv = [e for e in cases if e["T"] == CONVERGED and e["map_kind"] == "tanh"]
    if conv:
        parts = []
        for r in sorted({e["rho_W"] for e in conv}):
            mine = [e for e in conv if e["rho_W"] == r]
            parts.append(f"ρ(W) = {r:g}: median ρ(J) {np.median([e['rho_J'] for e in mine]):.3f}, error "
                         f"{np.median([e['relative_error'] for e in mine]):.2f}, cosine "
                         f"{np.median([e['cosine'] for e in mine]):.2f}, ‖g₁‖/‖g*‖ "
                         f"{np.median([e['norm_ratio'] for e in mine]):.2f}")
        out.append(f"Over {per_map} instances (seeds) of each tanh map, OneStep (g₁) against the exact gradient "
                   "g* on the converged forward pass (medians): " + "; ".join(parts) + ".")
        top = max(e["rho_W"] for e in conv)
        mine = [e for e in conv if e["rho_W"] == top]
        err, ratio = np.median([e["relative_error"] for e in mine]), np.median([e["norm_ratio"] for e in mine])
        if err < 1.0 and ratio < 0.5:
            out.append(f"Near ρ(J) = 1 OneStep's error does not blow up but approaches 1 from below (median "
                       f"{err:.2f} at ρ(W) = {top:g}): the exact gradient grows — (I − Jᵀ)⁻¹ multiplies the "
                       "component along an eigenvector of eigenvalue λ by 1/(1 − λ) — while OneStep's does not (its "
                       f"norm is a median {ratio:.2f} of the exact one there), so OneStep becomes a short vector "
                       "whose direction keeps only part of its alignment (our reading of the measured norms).")
    neg = [e for e in cases if not e["cosine"] > 0]
    worst = min(cases, key=lambda e: e["cosine"])
    rho_max = max(e["rho_J"] for e in cases)
    if neg:
        rho_neg = min(e["rho_J"] for e in neg)
        below = [e for e in cases if e["rho_J"] < rho_neg]
        out.append(f"**Descent direction.** OneStep's cosine to the exact gradient is ≤ 0 — not a descent direction "
                   f"— in {len(neg)} of {len(cases)} cases ({instances} map instances × forward budgets T), the "
                   f"first at ρ(J) = {rho_neg:.3f}: " + ", ".join(
                       f"{e['map']} #{e['instance']} at T = {e['T']} (ρ(J) {e['rho_J']:.3f}, cosine "
                       f"{e['cosine']:.2f})" for e in sorted(neg, key=lambda e: e["rho_J"])[:8])
                   + ("…" if len(neg) > 8 else "")
                   + (f". Below ρ(J) = {rho_neg:.3f} every case has cosine > 0 (lowest "
                      f"{min(e['cosine'] for e in below):.2f})." if below else "."))
    else:
        out.append(f"**Descent direction.** OneStep's cosine to the exact gradient is positive in all {len(cases)} "
                   f"cases ({instances} map instances × forward budgets T, ρ(J) up to {rho_max:.3f}): the paper's "
                   "recipe gave a descent direction everywhere in this study, though an increasingly poor one; the "
                   f"lowest cosine is {worst['cosine']:.3f} ({worst['map']} #{worst['instance']}, ρ(J) = "
                   f"{worst['rho_J']:.3f}, T = {worst['T']}). A cosine ≤ 0 needs a relative error ≥ 1; ρ(J) < 1 "
                   "alone does not guarantee descent, so this is a measured statement about these maps, not a "
                   "theorem.")
    return out


def reading(rows: list[dict], table: list[dict], sweep: list[dict]) -> list[str]:
    """Bullets stating what the rows show; every number comes from the rows."""
    acc = [r for r in rows if r.get("kind") == "accuracy"]
    fd = [r for r in rows if r.get("kind") == "fd_check"]
    out = []
    if fd:
        worst = max(fd, key=lambda r: r["implicit_dense_vs_fd"])
        out.append("**The reference is exact.** Implicit(dense) on a z* converged to 1e-12 matches float64 central "
                   "finite differences to a relative error of at most "
                   f"{worst['implicit_dense_vs_fd']:.1e} ({worst['map_label']}); "
                   + "; ".join(f"{r['map_label']}: {r['implicit_dense_vs_fd']:.1e} (GMRES at 1e-12: "
                               f"{r['implicit_gmres_vs_fd']:.1e})" for r in fd) + ".")
    if acc:
        agree = max(r["reference_gmres_vs_dense"] for r in acc)
        out.append(f"On the study's maps the dense reference and GMRES at 1e-12 agree to {agree:.1e} or better.")
    conv = _find(table, T=CONVERGED)
    exact = [e for e in conv if e["family"] == "Implicit" and e["budget"] == min(
        (x["budget"] for x in conv if x["family"] == "Implicit"), default=None)]
    unrolled = [e for e in conv if e["family"] == "Unrolled"]
    if exact and unrolled:
        e_imp = max(e["relative_error"] or math.inf for e in exact)
        e_unr = max(e["relative_error"] or math.inf for e in unrolled)
        t_lo = min(e["T_iterations"] for e in unrolled)
        t_hi = max(e["T_iterations"] for e in unrolled)
        out.append(f"**Exact estimators are exact.** With the forward pass converged, Implicit(gmres, "
                   f"tol={exact[0]['budget']:g}) is within {e_imp:.1e} of the reference on every map, and Unrolled "
                   f"through the {t_lo}–{t_hi} plain iterations that converge to {REFERENCE_TOL:g} is within "
                   f"{e_unr:.1e}.")
    one = sorted((e for e in conv if e["family"] == "OneStep" and e["relative_error"] is not None),
                 key=lambda e: e["rho_J"])
    if one:
        lo, hi = one[0], one[-1]
        tanh = [e for e in one if e["map"].startswith("tanh")]
        grows = all(b["relative_error"] >= a["relative_error"] for a, b in zip(tanh, tanh[1:], strict=False))
        out.append(f"**The one-step gradient's error grows with ρ(J).** On the converged forward pass its relative "
                   f"error is {lo['relative_error']:.2f} at ρ(J) = {lo['rho_J']:.2f} ({lo['map']}) and "
                   f"{hi['relative_error']:.2f} at ρ(J) = {hi['rho_J']:.2f} ({hi['map']})"
                   + ("; on the tanh maps it rises monotonically with ρ(J): " if grows else
                      "; on the tanh maps (not monotonically): ")
                   + ", ".join(f"{e['relative_error']:.2f} at {e['rho_J']:.2f}" for e in tanh) + ".")
        out += descent_bullets(sweep)
    Ts = [t for t in _T_order(rows) if t != CONVERGED]
    if Ts and acc:
        t0 = Ts[0]
        hi_map = max(acc, key=lambda r: r["rho_J"])["map_label"]
        imp = [e for e in _find(table, map=hi_map, T=t0, family="Implicit") if e["relative_error"] is not None]
        one_t = _find(table, map=hi_map, T=t0, family="OneStep")
        unr_t = _find(table, map=hi_map, T=t0, family="Unrolled")
        dist = next(r["forward_distance"] for r in acc if r["map_label"] == hi_map and r["T_label"] == t0)
        if imp and one_t and unr_t:
            best = min(imp, key=lambda e: e["relative_error"])
            out.append(f"**An unconverged forward pass caps every estimator.** After T = {t0} iterations on "
                       f"{hi_map} (ρ(J) = {one_t[0]['rho_J']:.2f}) z_T is {dist:.1e} (relative) from z*; scored "
                       f"against the gradient at z*, the best Implicit solve reaches {best['relative_error']:.2f}, "
                       f"OneStep {one_t[0]['relative_error']:.2f} and Unrolled({t0}) "
                       f"{unr_t[0]['relative_error']:.2f}: no backward budget recovers what the forward pass "
                       "lacks.")
        per_T = []
        for T in _T_order(rows):
            e = _find(table, map=hi_map, T=T, family="OneStep")
            if e:
                per_T.append(f"T = {T}: {e[0]['relative_error']:.2f} (cosine {e[0]['cosine']:.2f})")
        if per_T:
            out.append(f"OneStep on {hi_map} by forward budget: " + "; ".join(per_T) + ".")
    budgets = cheapest_budgets(table, rows)
    if budgets and acc:
        hi_map = max(acc, key=lambda r: r["rho_J"])["map_label"]
        lo_map = min(acc, key=lambda r: r["rho_J"])["map_label"]
        for mp in dict.fromkeys([lo_map, hi_map]):
            recs = [b for b in budgets if b["map"] == mp]
            parts = [f"{b['family']} {b['cost_0.01'] if b['cost_0.01'] is not None else 'never (in this grid)'}"
                     for b in recs]
            out.append(f"**Cost of 1 % error** on {mp} (ρ(J) = {recs[0]['rho_J']:.2f}), in VJPs + JVPs: "
                       + ", ".join(parts) + ".")
    slot = [e for e in conv if e["family"] == "OneStep" and e["map"].startswith("slot")]
    if slot:
        out.append("**Slot attention** (converged forward pass): " + "; ".join(
            f"{e['map']}: ρ(J) = {e['rho_J']:.2f} (min over samples {e['rho_J_min']:.2f}), OneStep error "
            f"{e['relative_error']:.2f}, cosine {e['cosine']:.3f}" for e in slot) + ".")
    dropped = {(r["map_label"], r.get("instance", 0)): r for r in rows if r.get("dropped_samples")}
    if dropped:
        total = sum(r["samples"] + len(r["dropped_samples"]) for r in rows if r.get("kind") == "one_step_sweep")
        out.append("**Dropped samples.** Plain iteration did not converge to the reference tolerance in "
                   f"{MAX_PICARD} steps on " + "; ".join(
                       f"{lb} #{i}: sample(s) {r['dropped_samples']}" for (lb, i), r in dropped.items())
                   + " — no attracting fixed point to score against, so those samples are left out"
                   + (f" ({sum(len(r['dropped_samples']) for r in dropped.values())} of {total} samples in the "
                      "OneStep sweep)." if total else "."))
    bad = [e for e in table if e["cosine"] is not None and not e["cosine"] > 0]
    if bad:
        groups: dict = {}
        for e in bad:
            groups.setdefault((e["map"], e["T"], e["rho_J_at_z_T"]), []).append(e["estimator"])
        def one_step_cos(mp, T) -> str:
            hit = _find(table, map=mp, T=T, family="OneStep")
            return f"; OneStep's cosine there: {hit[0]['cosine']:.2f}" if hit and hit[0]["cosine"] is not None else ""
        out.append("**Not even a descent direction (cosine ≤ 0)**, other estimators: " + "; ".join(
            f"{mp} at T = {T} (ρ(J) at z_T = {rho:.2f}): " + ", ".join(names) + one_step_cos(mp, T)
            for (mp, T, rho), names in groups.items())
            + (". All of these differentiate at an unconverged iterate; none occurs on a converged forward pass."
               if all(e["T"] != CONVERGED for e in bad) else "."))
        warned = [e for e in bad if e["warnings"]]
        silent = sorted({e["family"] for e in bad if not e["warnings"]})
        out.append(f"Of these {len(bad)}, {len(warned)} came with a warning (the state is not a fixed point, "
                   "or the series terms were not shrinking)"
                   + (f"; the {', '.join(silent)} ones warned of nothing: they solve the adjoint system accurately, "
                      "but at z_T, which is not a fixed point — nothing in the backward pass can see that (this "
                      "study runs the forward pass with warn=False; fpgrad.solve warns of an unconverged forward "
                      "pass by default)." if silent else "."))
    errors = [e for e in table if e.get("error")]
    if errors:
        rho_at = {(e["map"], e["T"]): e["rho_J_at_z_T"] for e in errors}
        out.append(f"{len(errors)} estimator runs raised an error rather than return a number (recorded in the "
                   "rows, not plotted): " + "; ".join(
                       f"{e['estimator']} on {e['map']} at T = {e['T']} ({e['error'].split(':')[0]}; ρ(J) at z_T = "
                       f"{rho_at[(e['map'], e['T'])]:.2f})" for e in errors[:8])
                   + ("…" if len(errors) > 8 else "") + ".")
    return out


def finalize(rows: list[dict], out_dir: Path, meta: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = estimator_table(rows)
    write_csv(out / "estimators.csv", table, ESTIMATOR_COLUMNS)
    maps = map_summary(rows)
    Ts = [t for t in _T_order(rows) if t != CONVERGED]
    map_cols = ["map", "rho_W", "rho_J_min", "rho_J", "T_converged", *[f"distance_T{t}" for t in Ts],
                *[f"rho_T{t}" for t in Ts],
                "reference_gmres_vs_dense", "num_params", "state_size", "samples", "dropped"]
    write_csv(out / "maps.csv", maps, map_cols)
    one = one_step_summary(table, rows)
    one_cols = ["map", "rho_J"] + [f"{k}_T{t}" for t in _T_order(rows) for k in ("error", "cosine")]
    write_csv(out / "one_step.csv", one, one_cols)
    budgets = cheapest_budgets(table, rows)
    budget_cols = ["map", "rho_J", "family", "cost_0.1", "cost_0.01", "cost_1e-06"]
    write_csv(out / "cheapest_budgets.csv", budgets, budget_cols)
    pivot, pivot_maps = converged_pivot(table, rows)
    write_csv(out / "errors_converged.csv", pivot, ["estimator", *pivot_maps])
    fd = [r for r in rows if r.get("kind") == "fd_check"]
    fd_cols = ["map_label", "num_params", "rho_J", "implicit_dense_vs_fd", "implicit_gmres_vs_fd", "cosine_dense_fd",
               "reference_gmres_vs_dense", "fd_solves", "fd_seconds"]
    write_csv(out / "fd_check.csv", fd, fd_cols)
    sweep = sweep_table(rows)
    write_csv(out / "one_step_sweep.csv", sweep, SWEEP_COLUMNS)
    sweep_summary = []
    for mp in dict.fromkeys(e["map"] for e in sweep if e["map_kind"] != "tanh"):
        sweep_summary.append({"map": mp, "rho_W": None, "entries": [e for e in sweep if e["map"] == mp]})
    for r in sorted({e["rho_W"] for e in sweep if e["map_kind"] == "tanh"}):
        sweep_summary.insert(len([x for x in sweep_summary if x["rho_W"] is not None]),
                             {"map": f"tanh ρ(W)={r:g}", "rho_W": r,
                              "entries": [e for e in sweep if e["map_kind"] == "tanh" and e["rho_W"] == r]})
    sweep_rows = []
    for item in sweep_summary:
        ent = item["entries"]
        rec = {"map": item["map"], "instances": len({e["instance"] for e in ent}),
               "rho_J_lo": min(e["rho_J"] for e in ent), "rho_J_hi": max(e["rho_J"] for e in ent),
               "dropped": sum(e["dropped"] for e in ent if e["T"] == ent[0]["T"])}
        for T in _T_order(rows):
            cos = [e["cosine"] for e in ent if e["T"] == T and e["cosine"] is not None]
            rec[f"cos_min_T{T}"] = min(cos) if cos else None
        conv = [e["relative_error"] for e in ent if e["T"] == CONVERGED]
        rec["error_median_conv"] = float(np.median(conv)) if conv else None
        sweep_rows.append(rec)
    sweep_cols = ["map", "instances", "rho_J_lo", "rho_J_hi", "error_median_conv",
                  *[f"cos_min_T{T}" for T in _T_order(rows)], "dropped"]
    md_sweep = markdown_table(sweep_rows, sweep_cols, {"rho_J_lo": _fix3, "rho_J_hi": _fix3,
                                                       "error_median_conv": _fix3,
                                                       **{f"cos_min_T{T}": _fix3 for T in _T_order(rows)}},
                              headers={"rho_J_lo": "ρ(J) lowest", "rho_J_hi": "ρ(J) highest",
                                       "error_median_conv": "median error (converged)",
                                       **{f"cos_min_T{T}": f"min cosine T={T}" for T in _T_order(rows)},
                                       "dropped": "samples dropped"})

    md_maps = markdown_table(maps, map_cols, {**{c: _sci for c in map_cols if c.startswith(("distance", "reference"))},
                                              **{c: _fix3 for c in map_cols if c.startswith("rho_")}},
                             headers={"rho_W": "ρ(W)", "rho_J": "ρ(J) max", "rho_J_min": "ρ(J) min",
                                      "T_converged": "T to 1e-12",
                                      **{f"distance_T{t}": f"‖z_{t} − z*‖/‖z*‖" for t in Ts},
                                      **{f"rho_T{t}": f"ρ(J) at z_{t}" for t in Ts},
                                      "reference_gmres_vs_dense": "GMRES vs dense",
                                      "num_params": "params", "state_size": "state n",
                                      "samples": "samples kept", "dropped": "dropped (no convergence)"})
    md_one = markdown_table(one, one_cols, {c: (_fix3 if c.startswith(("cosine", "rho")) else _sci)
                                            for c in one_cols if c != "map"},
                            headers={"rho_J": "ρ(J)", **{f"error_T{t}": f"error T={t}" for t in _T_order(rows)},
                                     **{f"cosine_T{t}": f"cos T={t}" for t in _T_order(rows)}})
    md_budget = markdown_table(budgets, budget_cols, {"rho_J": _fix3},
                               headers={"rho_J": "ρ(J)", "cost_0.1": "VJPs for 10 %", "cost_0.01": "VJPs for 1 %",
                                        "cost_1e-06": "VJPs for 1e-6"})
    md_pivot = markdown_table(pivot, ["estimator", *pivot_maps], {mp: _sci for mp in pivot_maps})
    md_fd = markdown_table(fd, fd_cols, {"implicit_dense_vs_fd": _sci, "implicit_gmres_vs_fd": _sci,
                                         "reference_gmres_vs_dense": _sci, "rho_J": _fix3,
                                         "cosine_dense_fd": lambda v: f"{v:.12f}", "fd_seconds": ".1f"},
                           headers={"map_label": "map", "num_params": "params", "rho_J": "ρ(J)",
                                    "implicit_dense_vs_fd": "Implicit(dense) vs FD",
                                    "implicit_gmres_vs_fd": "Implicit(gmres 1e-12) vs FD",
                                    "cosine_dense_fd": "cosine", "reference_gmres_vs_dense": "GMRES vs dense",
                                    "fd_solves": "FD solves", "fd_seconds": "FD seconds"})
    tables_md = "\n\n".join([
        "# gradient-accuracy: tables", "## Maps", md_maps, "## OneStep vs the exact gradient", md_one,
        "## Cheapest backward budget per estimator family", md_budget,
        "## Relative error of every estimator, forward pass converged", md_pivot,
        "## Reference vs finite differences", md_fd,
        "## OneStep over many instances of each map (seeds)", md_sweep,
        "All numbers per (map, T, estimator), with cost, cosines and warnings: `estimators.csv`."]) + "\n"
    atomic_write_text(out / "tables.md", tables_md)

    figures = {}
    if table:
        save_figure(error_vs_cost_figure(table, rows), out / "error_vs_cost.png")
        save_figure(error_vs_cost_by_T_figure(table, rows), out / "error_vs_cost_by_T.png")
        save_figure(one_step_figure(sweep_table(rows), rows), out / "one_step_vs_rho.png")
        figures = {"error_vs_cost.png": "Relative error of the parameter gradient vs backward cost (VJPs + JVPs), "
                                        "one panel per map; forward pass converged (Unrolled over T = 5, 10, 30 "
                                        "and converged, since T is its budget). Red ring: cosine ≤ 0. Dotted: "
                                        "error = 1.",
                   "one_step_vs_rho.png": "The paper's one-step gradient: relative error and cosine to the exact "
                                          "gradient vs ρ(J) over every map instance of the sweep (colour: forward "
                                          "budget T; lines: median over the tanh instances of each ρ(W)).",
                   "error_vs_cost_by_T.png": "Every estimator after exactly T forward iterations (rows), scored "
                                             "against the exact gradient at the true z*."}
    write_readme(out, rows, table, meta, md_maps, md_one, md_budget, md_fd, md_sweep, figures)


def write_readme(out: Path, rows, table, meta, md_maps, md_one, md_budget, md_fd, md_sweep, figures) -> None:
    acc = [r for r in rows if r.get("kind") == "accuracy"]
    c0 = next((r["config"] for r in acc if r["config"]["map"] == "tanh"), None)
    s0 = next((r["config"] for r in acc if r["config"]["map"] == "slot_attention"), None)
    budgets = acc[0]["config"]["budgets"] if acc else {}
    sweep = [r for r in rows if r.get("kind") == "one_step_sweep"]
    sweep_instances = len({r["instance"] for r in sweep})
    sweep_rho = sorted({r["config"]["rho_W"] for r in sweep if r["config"]["map"] == "tanh"})
    setup = ["## Setup", ""]
    if c0:
        setup.append(f"- tanh maps z = tanh(W z + U x + b): n = {c0['n']}, batch {c0['batch']}, x ~ "
                     f"{c0['input_scale']:g}·N(0, I), bias scale {c0['bias_scale']:g}, float64; W is one Gaussian "
                     "matrix rescaled to each ρ(W), so the maps differ only in ρ(W). ρ(J) (J = ∂f/∂z at z*) is "
                     "measured densely per sample; it is below ρ(W) because tanh' < 1.")
    if s0:
        setup.append(f"- slot attention: dim {s0['dim']}, {s0['num_slots']} slots, {s0['inputs']} inputs, batch "
                     f"{s0['batch']}, float64, at its random init (seed {s0['seed']}), and with its recurrent "
                     "weights (GRU hidden, query, last MLP layer) scaled down to make it more contractive.")
    setup += ["- loss: mean((z − t)²) with a fixed Gaussian target t; the score is the relative error "
              "‖g − g*‖/‖g*‖ and cosine of the parameter gradient g against g*.",
              "- g*: the exact gradient at the true fixed point: Implicit(dense) on z* from plain iteration to a "
              f"relative residual of {REFERENCE_TOL:g}, cross-checked against GMRES at {REFERENCE_TOL:g} and, on "
              "small maps, against float64 central finite differences. A sample on which plain iteration does not "
              f"converge in {MAX_PICARD} steps has no attracting fixed point to score against and is dropped (the "
              "maps table says how many).",
              "- forward budget T: exactly T plain iterations from the same z0 (no stopping rule) for every "
              "estimator, or 'converged' (plain iteration to the reference's z*; Unrolled then runs the number of "
              f"plain iterations that reaches {REFERENCE_TOL:g}). Truncated(k/T) backprops through the last k of "
              "the T iterations; OneStep, Neumann, Phantom and Implicit differentiate at the forward pass's last "
              "iterate.",
              f"- backward budgets: Truncated k ∈ {budgets.get('truncated')}, Neumann k ∈ {budgets.get('neumann')} "
              f"(k + 1 terms), Phantom k ∈ {budgets.get('phantom')} (τ = {budgets.get('phantom_tau')}), Implicit "
              f"GMRES tol ∈ {budgets.get('implicit_tol')}.",
              "- cost: VJPs + JVPs of the backward pass as counted by fpgrad (the forward iterations are not "
              "included: every estimator at a given T pays the same forward pass, except Unrolled whose VJPs = T).",
              f"- OneStep sweep: OneStep alone at every T on {sweep_instances} instances (seeds) of each tanh map "
              f"(ρ(W) ∈ {sweep_rho}) and of each slot attention variant, each with its own exact gradient and ρ(J)."]
    lines = ["# Gradient accuracy of fixed-point gradient estimators", "",
             "How close does each estimator come to the exact implicit gradient, and at what cost, as the "
             "spectral radius of the map's Jacobian and the forward / backward budgets vary? (issue #6, part 1)", "",
             provenance_markdown(meta, sum(r.get("seconds", 0.0) for r in rows)), "", *setup, "", "## Reading",
             ""]
    lines += [f"- {b}" for b in reading(rows, table, sweep_table(rows))]
    lines += [""]
    for name, caption in figures.items():
        lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    lines += ["## Maps", "", md_maps, "", "## OneStep vs the exact gradient", "", md_one, "",
              "## OneStep over many instances (seeds) of each map", "", md_sweep, "",
              "## Cheapest backward budget reaching a relative error (converged forward pass; Unrolled over T)", "",
              md_budget, "", "## The reference against finite differences", "", md_fd, "",
              "More: `tables.md` (also every estimator's error on every map), `estimators.csv` (every row), "
              "`maps.csv`, `one_step.csv`, `one_step_sweep.csv`, `cheapest_budgets.csv`, `errors_converged.csv`, "
              "`fd_check.csv`, "
              "`rows.jsonl` (the raw rows the runner stored).", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))


STUDY = Study(name=NAME,
              description="error and cosine of every gradient estimator vs the exact implicit gradient, across "
                          "spectral radii, forward iterations and backward budgets",
              grid=grid, run=run, finalize=finalize, module=__name__)
