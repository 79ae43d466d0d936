"""spectral_report: a SpectralSummary -> report.md, report.html, figures/*.png, summary.json, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from fpgrad.spectral._summary import SpectralSummary

from .._io import PathLike, atomic_directory, atomic_write_text, jsonable
from . import _figures
from ._markdown import format_number as num
from ._markdown import markdown_table, write_html
from ._verdict import derived_numbers, estimator_bullets, headline, meaning_bullets, samples

# (file stem, figure function name in _figures, caption); looked up at call time so tests can patch them
FIGURES = {
    "spectral_radius": ("spectral_radius_figure",
                        "Spectral radius ρ per sample (error bars: its uncertainty) and ‖J‖₂ where known; "
                        "the dashed line is ρ = 1, the contraction boundary."),
    "eigenvalues": ("eigenvalue_figure",
                    "Eigenvalues of J in the complex plane: solid circle |λ| = 1, dashed circle the spectral radius."),
    "singular_values": ("singular_value_figure",
                        "Largest singular values of J (above the dashed line σ = 1 a step expands that direction) and "
                        "smallest singular values of I − J (their inverse bounds the implicit gradient's error)."),
    "residuals": ("residual_figure",
                  "Forward residual per step (log scale); dashed: the fitted contraction rate, anchored at the trace's "
                  "end and drawn over its second half; dotted (up to four samples): the slope ρ, from the first step."),
    "estimators": ("estimator_figure",
                   "Relative gradient error vs matrix-vector products per estimator (log-log); a red ring marks a "
                   "cosine ≤ 0, i.e. not a descent direction; exact rows sit at the bottom edge."),
}


def _flatten(prefix: str, value: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    elif isinstance(value, (list, tuple)):
        out.append({"measurement": prefix, "value": ", ".join(num(v) for v in value)})
    else:
        out.append({"measurement": prefix, "value": value})


def _per_sample_rows(summary: SpectralSummary) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """One row per sample with the per-sample fields the summary holds; columns with no data are left out."""
    fwd = summary.forward or {}
    steps = fwd.get("steps") if isinstance(fwd.get("steps"), list) else []
    converged = fwd.get("converged") if isinstance(fwd.get("converged"), list) else []
    fields = [("spectral_radius", "ρ", summary.spectral_radius),
              ("spectral_radius_uncertainty", "uncertainty of ρ", summary.spectral_radius_uncertainty),
              ("lipschitz", "‖J‖₂", summary.lipschitz),
              ("frobenius", "‖J‖_F", summary.frobenius),
              ("sigma_min_I_minus_J", "σ_min(I − J)", summary.sigma_min_I_minus_J),
              ("condition_I_minus_J", "cond(I − J)", summary.condition_I_minus_J),
              ("contraction_rate", "contraction rate", summary.contraction_rate),
              ("final_residual", "final residual", [r[-1] if r else None for r in summary.residuals]),
              ("steps", "forward steps", steps),
              ("converged", "converged", converged)]
    fields = [f for f in fields if f[2]]
    batch = max([summary.batch, *(len(values) for _, _, values in fields), len(summary.frobenius_interval)])
    rows = []
    for i in range(batch):
        row: dict[str, Any] = {"sample": i}
        for key, _, values in fields:
            row[key] = values[i] if i < len(values) else None
        if summary.frobenius_interval:
            lo_hi = summary.frobenius_interval[i] if i < len(summary.frobenius_interval) else None
            row["frobenius_interval"] = f"[{num(lo_hi[0])}, {num(lo_hi[1])}]" if lo_hi else None
        rows.append(row)
    columns = ["sample"] + [key for key, _, _ in fields]
    headers = {key: header for key, header, _ in fields}
    if summary.frobenius_interval:
        columns.insert(columns.index("frobenius") + 1 if "frobenius" in columns else len(columns),
                       "frobenius_interval")
        headers["frobenius_interval"] = "‖J‖_F interval"
    return rows, columns, headers


def _figure_block(name: str, figures: dict[str, str | None]) -> list[str]:
    path = figures.get(name)
    if path is None:
        return []
    return [f"![{name.replace('_', ' ')}]({path})", f"*{FIGURES[name][1]}*", ""]


def spectral_markdown(summary: SpectralSummary, derived: dict[str, Any], figures: dict[str, str | None],
                      title: str) -> str:
    """The report's Markdown; `figures` maps a figure name to its path relative to report.md (None: omitted)."""
    d = derived
    seed = f", seed {summary.seed}" if summary.seed is not None else ""
    md = [f"# {title}", "",
          f"Map `{summary.map_name}`: n = {summary.n} state entries per sample, batch of {samples(summary.batch)}; "
          f"Jacobian J = ∂f/∂z at the fixed point z*, measured by `{summary.method}` in "
          f"`{summary.dtype}` on `{summary.device}`{seed}. Every number below comes from the summary "
          "(`summary.json`); derived ones are under its `report` key.", "",
          "## Verdict", "", headline(summary, d), ""]
    md += [f"- {b}" for b in meaning_bullets(summary, d)] + [""]
    md += ["## Which gradient estimators are safe here", ""]
    md += [f"- {b}" for b in estimator_bullets(summary, d)] + [""]

    md += ["## Per sample", ""]
    rows, columns, headers = _per_sample_rows(summary)
    if len(columns) > 1:
        md += [markdown_table(rows, columns, headers=headers), ""]
        if summary.frobenius_interval:
            md += [f"The ‖J‖_F interval holds at confidence {num(summary.confidence)}.", ""]
    else:
        md += ["Omitted: the summary holds no per-sample numbers.", ""]
    md += _figure_block("spectral_radius", figures)

    md += ["## Eigenvalues", ""]
    if figures.get("eigenvalues"):
        what = ("all eigenvalues" if summary.eigenvalues_complete
                else f"the eigenvalues of largest modulus found by `{summary.method}`")
        md += [f"The figure shows {what} of each sample's J (n = {summary.n}).", ""]
        md += _figure_block("eigenvalues", figures)
    else:
        md += ["Omitted: the summary holds no eigenvalues.", ""]

    md += ["## Singular values", ""]
    if figures.get("singular_values"):
        md += _figure_block("singular_values", figures)
    else:
        md += ["Omitted: the summary holds no singular values of J or of I − J.", ""]

    md += ["## Forward solve", ""]
    fwd = summary.forward or {}
    scalars = [{"setting": k, "value": fwd[k]} for k in sorted(fwd) if not isinstance(fwd[k], (list, tuple, dict))]
    if scalars:
        md += [markdown_table(scalars, ["setting", "value"]), ""]
    if figures.get("residuals"):
        md += _figure_block("residuals", figures)
    else:
        md += ["Omitted: the summary holds no forward residual trace.", ""]

    md += ["## Gradient estimators", ""]
    if summary.estimators:
        columns = ["estimator", "relative_error", "cosine", "vjps", "jvps", "forward_steps"]
        for extra in ("budget", "bytes_saved", "seconds", "converged"):
            if any(extra in r for r in summary.estimators):
                columns.append(extra)
        headers = {"relative_error": "relative error", "vjps": "VJPs", "jvps": "JVPs",
                   "forward_steps": "forward steps", "bytes_saved": "bytes saved"}
        md += [markdown_table(summary.estimators, columns, headers=headers), ""]
        failed = [r for r in summary.estimators if r.get("error")]
        if failed:
            md += ["Estimators that raised instead of returning a gradient (their NaN rows above):", ""]
            md += [f"- {r.get('estimator')}: {r['error']}" for r in failed] + [""]
        md += _figure_block("estimators", figures)
    else:
        md += ["Omitted: the summary holds no gradient-estimator rows.", ""]

    md += ["## Cost of this analysis", ""]
    cost_rows: list[dict[str, Any]] = []
    _flatten("", summary.cost or {}, cost_rows)
    if cost_rows:
        md += [markdown_table(cost_rows, ["measurement", "value"]), ""]
    else:
        md += ["Omitted: the summary records no cost.", ""]

    if summary.notes:
        md += ["## Notes", ""] + [f"- {note}" for note in summary.notes] + [""]
    return "\n".join(md).rstrip("\n") + "\n"


def spectral_report(summary: SpectralSummary, out_dir: PathLike, *, title: str | None = None,
                    overwrite: bool = True, tol: float = 1e-6) -> Path:
    """Write a report folder for `summary`: report.md, report.html (self-contained), figures/*.png, summary.json.

    The folder is built in a temporary sibling and moved into place only when everything succeeded; on
    failure an existing `out_dir` is left as it was. The report only formats the summary's numbers.

    tol: the gradient tolerance the text converts ρ into a step count for (log(tol) / log(ρ)).
    Raises FileExistsError if `out_dir` exists and `overwrite` is False.
    """
    if not isinstance(summary, SpectralSummary):
        raise TypeError(f"spectral_report needs a SpectralSummary, got {type(summary).__name__}; "
                        "build one with fpgrad.spectral.analyze(...) or SpectralSummary.from_json(...)")
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    out_dir = Path(out_dir)
    title = title or f"Spectral report: {summary.map_name}"
    derived = derived_numbers(summary, tol)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        figures: dict[str, str | None] = {}
        for name, (function, _caption) in FIGURES.items():
            make: Callable[[SpectralSummary], Any] = getattr(_figures, function)
            fig = make(summary)
            if fig is None:
                figures[name] = None
                continue
            relative = f"figures/{name}.png"
            _figures.save_figure(fig, tmp / relative)
            figures[name] = relative
        derived["figures"] = figures
        text = spectral_markdown(summary, derived, figures, title)
        payload = summary.to_dict()
        payload["report"] = jsonable(derived)
        atomic_write_text(tmp / "summary.json", json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
        atomic_write_text(tmp / "report.md", text)
        write_html(text, tmp / "report.html", title=title)
    return out_dir
