"""The training study's tables: one line per run (results.csv), mean ± std per group (summary.csv), and the
test-time iteration table of the README, from the stored rows (nothing is recomputed)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .run import ABLATIONS, ESTIMATORS


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v)) if len(v) > 1 else 0.0


def _at_iters(row: dict, key: str, iters: int) -> float:
    its = row["eval_iters"]
    return row[key][its.index(iters)] if iters in its else math.nan


def _finite_values(values) -> list[float]:
    return [float(v) for v in (values or []) if v is not None and math.isfinite(float(v))]


def _nanmax(values) -> float:
    v = _finite_values(values)
    return max(v) if v else math.nan


def _nanmin(values) -> float:
    v = _finite_values(values)
    return min(v) if v else math.nan


def _nanmean(values) -> float:
    v = _finite_values(values)
    return float(np.mean(v)) if v else math.nan


def run_table(rows: list[dict]) -> list[dict]:
    """One line per configuration (the CSV)."""
    out = []
    for r in rows:
        c = r["config"]
        more = max(r["eval_iters"])
        T = c["iters"]
        out.append({
            "estimator": c["estimator"], "ablation": c["ablation"], "seed": c["seed"], "iters": T,
            "steps": r["steps_done"], "diverged_at": r["diverged_at"],
            "final_loss": float(np.mean(r["losses"][-50:])) if r["losses"] else math.nan,
            "mse_T": _at_iters(r, "mse", T), f"mse_{more}": _at_iters(r, "mse", more),
            "fg_ari_T": _at_iters(r, "fg_ari", T), f"fg_ari_{more}": _at_iters(r, "fg_ari", more),
            "spikes": r["spikes"], "max_grad_norm": max(r["grad_norms"]) if r["grad_norms"] else math.nan,
            "median_grad_norm": float(np.median(r["grad_norms"])) if r["grad_norms"] else math.nan,
            "rho_T_final": r["rho_T"][-1] if r.get("rho_T") else math.nan,
            "rho_star_final": r["rho_star"][-1] if r.get("rho_star") else math.nan,
            "residual_final": r["residual"][-1] if r["residual"] else math.nan,
            "rho_T_peak": max(r["rho_T"]) if r.get("rho_T") else math.nan,
            "rho_star_peak": _nanmax(r.get("rho_star")),
            "cos_one_step_final": r["cosine_one_step_all"][-1] if r.get("cosine_one_step_all") else math.nan,
            "cos_unrolled_final": r["cosine_unrolled_all"][-1] if r.get("cosine_unrolled_all") else math.nan,
            "cos_one_step_mean": _nanmean(r.get("cosine_one_step_all")),
            "cos_one_step_min": _nanmin(r.get("cosine_one_step_all")),
            "cos_one_step_sa_mean": _nanmean(r.get("cosine_one_step_slot_attention")),
            "cos_unrolled_mean": _nanmean(r.get("cosine_unrolled_all")),
            "cos_unrolled_sa_mean": _nanmean(r.get("cosine_unrolled_slot_attention")),
            "fg_ari_best": _nanmax(r["fg_ari"]), "fg_ari_1": _at_iters(r, "fg_ari", 1), "mse_1": _at_iters(r, "mse", 1),
            "clipped_steps": r["clipped_steps"], "failed_steps": r["failed_steps"],
            "adjoint_unconverged_steps": r["adjoint_unconverged_steps"],
            "train_seconds": r["train_seconds"], "seconds": r["seconds"],
        })
    return out


def summary_table(table: list[dict], more: int) -> list[dict]:
    """Mean ± std over seeds per (ablation, estimator)."""
    out = []
    keys = ["final_loss", "mse_T", f"mse_{more}", "mse_1", "fg_ari_T", f"fg_ari_{more}", "fg_ari_1", "fg_ari_best",
            "spikes", "max_grad_norm", "median_grad_norm", "rho_T_final", "rho_star_final", "rho_T_peak",
            "rho_star_peak", "residual_final", "cos_one_step_final", "cos_one_step_mean", "cos_one_step_min",
            "cos_one_step_sa_mean", "cos_unrolled_mean", "cos_unrolled_sa_mean", "clipped_steps", "train_seconds"]
    for ablation in ABLATIONS:
        for est in ESTIMATORS:
            sel = [t for t in table if t["ablation"] == ablation and t["estimator"] == est]
            if not sel:
                continue
            line: dict[str, Any] = {"ablation": ablation, "estimator": est, "seeds": len(sel),
                                    "diverged": sum(t["diverged_at"] is not None for t in sel)}
            for k in keys:
                mean, std = _mean_std([t.get(k, math.nan) for t in sel])
                line[k], line[k + "_std"] = mean, std
            out.append(line)
    return out


def format_pm(lines: list[dict], keys: list[str], spec: dict[str, str]) -> list[dict]:
    out = []
    for line in lines:
        new = {k: line[k] for k in ("ablation", "estimator", "seeds", "diverged")}
        for k in keys:
            mean, std = line[k], line[k + "_std"]
            f = spec.get(k, ".3g")
            new[k] = "nan" if not math.isfinite(mean) else (
                format(mean, f) + (f" ± {format(std, f)}" if line["seeds"] > 1 else ""))
        out.append(new)
    return out


def iterations_table(rows: list[dict], markdown_table) -> str:
    its = rows[0]["eval_iters"]
    lines = []
    for ablation in ABLATIONS:
        for est in ESTIMATORS:
            sel = [r for r in rows if r["config"]["ablation"] == ablation and r["config"]["estimator"] == est]
            if not sel:
                continue
            ari = np.nanmean(np.array([r["fg_ari"] for r in sel], dtype=float), axis=0)
            mse = np.nanmean(np.array([r["mse"] for r in sel], dtype=float), axis=0)
            line = {"run": f"{ablation} / {est} (trained with {sel[0]['config']['iters']})"}
            line.update({f"a{t}": f"{a:.3f} / {m * 1e3:.2f}" for t, a, m in zip(its, ari, mse, strict=True)})
            lines.append(line)
    headers = {f"a{t}": f"{t} it" for t in its}
    return ("Each cell: FG-ARI / MSE × 10³.\n\n"
            + markdown_table(lines, ["run", *[f"a{t}" for t in its]], headers=headers))


def group_value(summary: list[dict], ablation: str, est: str, key: str) -> float:
    """The summary value of `key` for (ablation, estimator); NaN where that group has no runs."""
    return next((s[key] for s in summary if s["ablation"] == ablation and s["estimator"] == est), math.nan)
