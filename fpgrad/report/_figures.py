"""Figures of a SpectralSummary (seaborn on matplotlib `Figure` objects: no pyplot, no backend switch).

Each `*_figure(summary)` returns a Figure, or None when the summary lacks the numbers it needs.
They only draw numbers the summary holds; nothing is recomputed from a map.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from fpgrad.spectral._summary import SpectralSummary

from .._io import PathLike, atomic_write_bytes

DPI = 110
_MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p"]
_MAX_LEGEND = 10         # samples; beyond this, per-sample legend entries are left out
_SMALL_MULTIPLES = 4     # eigenvalue panels, one per sample, up to this many samples
_FIT_SPAN = 0.5          # the fitted-rate line covers this last fraction of a trace
_ERROR_FLOOR = 1e-16     # zero relative errors are drawn here on the log axis

# metadata that would make two saves of the same figure differ (dates, versions)
_NO_STAMP = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None},
             "svg": {"Date": None, "Creator": None}}


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """The look of every fpgrad figure: seaborn's whitegrid, a fixed dpi; restored on exit (rc_context)."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
          "figure.dpi": DPI, "savefig.dpi": DPI, "svg.hashsalt": "fpgrad", "axes.titlesize": 11}
    with matplotlib.rc_context(rc):
        yield


def new_figure(width: float, height: float, **subplots) -> tuple[Figure, np.ndarray]:
    """A pyplot-free Figure (constrained layout) and its axes as a 2-D array; call inside `figure_style()`."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(squeeze=False, **subplots)
    return fig, axes


def save_figure(fig: Figure, path: PathLike, *, dpi: int | None = None) -> Path:
    """Save `fig` atomically to `path` (format from the suffix: png, pdf, svg), without date/version stamps."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "fpgrad"}):
        fig.savefig(buffer, format=fmt, dpi=dpi or fig.dpi, metadata=_NO_STAMP.get(fmt))
    return atomic_write_bytes(path, buffer.getvalue())


def _palette(count: int) -> list:
    return sns.color_palette("colorblind" if count <= 10 else "viridis", max(count, 1))


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _at(values: list, i: int) -> float | None:
    """values[i] if present and finite, else None."""
    if i < len(values) and values[i] is not None and math.isfinite(float(values[i])):
        return float(values[i])
    return None


# ---- eigenvalues ----------------------------------------------------------------------------------

def _circle(ax, radius: float, **style) -> None:
    theta = np.linspace(0.0, 2.0 * np.pi, 361)
    ax.plot(radius * np.cos(theta), radius * np.sin(theta), **style)


def eigenvalue_figure(summary: SpectralSummary) -> Figure | None:
    """Eigenvalues of J in the complex plane per sample, with the unit circle and the spectral-radius circle.

    Up to four samples: one panel each; more: one panel, coloured by sample, with the largest radius's circle.
    """
    samples = [i for i, ev in enumerate(summary.eigenvalues) if ev]
    if not samples:
        return None
    colors = _palette(len(summary.eigenvalues))
    moduli = [math.hypot(re, im) for i in samples for re, im in summary.eigenvalues[i]]
    reach = max([1.0, *_finite(moduli), *_finite(summary.spectral_radius)]) * 1.08
    single = len(samples) > _SMALL_MULTIPLES
    with figure_style():
        # square panels placed by hand (in inches): constrained layout does not settle with square axes
        side, left, gap, top = (5.0, 0.85, 0.0, 0.35) if single else (3.0, 0.85, 0.6, 0.35)
        right, bottom = (2.4, 0.6) if single else (0.15, 0.95)
        count = 1 if single else len(samples)
        width, height = left + count * side + (count - 1) * gap + right, bottom + side + top
        fig = Figure(figsize=(width, height), dpi=DPI)
        axes = [fig.add_axes(((left + k * (side + gap)) / width, bottom / height, side / width, side / height))
                for k in range(count)]
        panels = [(axes[0], samples)] if single else [(axes[k], [i]) for k, i in enumerate(samples)]
        for ax, members in panels:
            _circle(ax, 1.0, color="black", lw=1.2, label="|λ| = 1")
            for i in members:
                ev = np.asarray(summary.eigenvalues[i], dtype=float).reshape(-1, 2)
                label = "eigenvalues" if not single else (f"sample {i}" if len(members) <= 10 else None)
                sns.scatterplot(x=ev[:, 0], y=ev[:, 1], ax=ax, color=colors[i], s=18, alpha=0.8, linewidth=0,
                                label=label, legend=False)
            radii = [(i, _at(summary.spectral_radius, i)) for i in members]
            radii = [(i, r) for i, r in radii if r is not None]
            if radii:
                i, r = max(radii, key=lambda ir: ir[1])
                _circle(ax, r, color=colors[i] if single else "0.25", lw=1.2, ls="--",
                        label=f"max ρ = {r:.4g} (sample {i})" if single else "spectral radius ρ")
            ax.axhline(0, color="0.6", lw=0.6)
            ax.axvline(0, color="0.6", lw=0.6)
            ax.set(xlim=(-reach, reach), ylim=(-reach, reach), xlabel="Re λ",
                   ylabel="Im λ" if ax is panels[0][0] else "")
            if single:
                ax.set_title(f"{len(members)} samples")
                handles, labels = ax.get_legend_handles_labels()
                fig.legend(handles, labels, loc="center left", bbox_to_anchor=((left + side + 0.15) / width, 0.5),
                           fontsize=8)
            else:
                i = members[0]
                rho = _at(summary.spectral_radius, i)
                count = len(summary.eigenvalues[i])
                ax.set_title(f"sample {i}: ρ = {rho:.4g}" if rho is not None else f"sample {i}", fontsize=10)
                ax.text(0.02, 0.02, f"{count} of {summary.n} eigenvalues", transform=ax.transAxes, fontsize=7,
                        color="0.3")
        if not single:
            handles, labels = panels[0][0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.02), ncols=len(labels), fontsize=8)
    return fig


# ---- singular values ------------------------------------------------------------------------------

def singular_value_figure(summary: SpectralSummary) -> Figure | None:
    """Largest singular values of J and smallest of I - J per sample (log scale)."""
    panels = [(name, title, rows) for name, title, rows in (
        ("J", "largest singular values of J", summary.singular_values),
        ("I - J", "smallest singular values of I − J", summary.singular_values_I_minus_J)) if any(rows)]
    if not panels:
        return None
    batch = max(len(summary.singular_values), len(summary.singular_values_I_minus_J))
    colors = _palette(batch)
    dodge = 0.5 / max(batch, 1)
    with figure_style():
        fig, axes = new_figure(5.2 * len(panels), 3.8, ncols=len(panels))
        for ax, (name, title, rows) in zip(axes[0], panels, strict=False):
            for i, values in enumerate(rows):
                v = np.asarray(values, dtype=float)
                keep = np.isfinite(v) & (v > 0)
                k = np.arange(1, len(v) + 1, dtype=float) + (i - (batch - 1) / 2) * dodge
                ax.vlines(k[keep], 0, v[keep], color=colors[i], lw=0.8, alpha=0.6)
                ax.plot(k[keep], v[keep], ls="none", marker=_MARKERS[i % len(_MARKERS)], ms=4, color=colors[i],
                        label=f"sample {i}" if batch <= _MAX_LEGEND else None)
            ax.set_yscale("log")
            if name == "J":
                ax.axhline(1.0, color="crimson", lw=1.0, ls="--", label="σ = 1 (above: a step expands)")
                ax.set_xlabel("index i (σ_i decreasing)")
                ax.set_ylabel("σ_i(J)")
            else:
                ax.set_xlabel("index i (σ_i increasing)")
                ax.set_ylabel("σ_i(I − J)")
            ax.set_title(title)
            ax.xaxis.get_major_locator().set_params(integer=True)
        # one legend under both panels: the stems fill the panels, a legend inside would hide some
        labels = dict(zip(*reversed(axes[0, 0].get_legend_handles_labels()), strict=True))
        for ax in axes[0, 1:]:
            labels.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        if labels:
            fig.legend(list(labels.values()), list(labels), loc="outside lower center", ncols=min(len(labels), 6),
                       fontsize=8)
    return fig


# ---- forward residual trace -----------------------------------------------------------------------

def residual_figure(summary: SpectralSummary) -> Figure | None:
    """Forward residual per step (log scale) per sample, with the fitted contraction rate anchored at the end.

    Dashed: the summary's contraction rate drawn as r_T * rate^(t - T) back from the last step T over the trace's
    second half; dotted (up to four samples): r_0 * rho^t from the first step, the slope plain iteration follows.
    """
    traces = [(i, np.asarray(r, dtype=float)) for i, r in enumerate(summary.residuals) if len(r)]
    traces = [(i, r) for i, r in traces if np.any(np.isfinite(r) & (r > 0))]
    if not traces:
        return None
    colors = _palette(len(summary.residuals))
    many = len(traces) > _SMALL_MULTIPLES
    with figure_style():
        fig, axes = new_figure(7.6, 4.4)
        ax = axes[0, 0]
        for i, r in traces:
            t = np.arange(len(r), dtype=float)
            keep = np.isfinite(r) & (r > 0)
            t, r = t[keep], r[keep]
            ax.plot(t, r, color=colors[i], lw=0.9 if many else 1.5, alpha=0.7 if many else 1.0,
                    label=f"sample {i}" if len(traces) <= _MAX_LEGEND else None)
            lo, hi = r.min(), r.max()
            # fitted rate: back from the last step over the trace's second half (where a geometric fit lives);
            # ρ: forward from the first step, the slope plain iteration would follow
            for rate, style, anchor in ((_at(summary.contraction_rate, i), "--", -1),
                                        (None if many else _at(summary.spectral_radius, i), ":", 0)):
                if rate is None or rate <= 0:
                    continue
                line = r[anchor] * rate ** (t - t[anchor])
                inside = (line >= lo * (1 - 1e-12)) & (line <= hi * (1 + 1e-12))
                if anchor == -1:
                    inside &= t >= t[-1] * (1.0 - _FIT_SPAN)
                if inside.sum() >= 2:
                    ax.plot(t[inside], line[inside], color=colors[i], lw=1.1, ls=style)
        tol = summary.forward.get("tol")
        if isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0:
            ax.axhline(tol, color="0.35", lw=0.9, ls="-.")
        # line styles explained once, whatever the number of samples
        for style, what in (("-", "residual"), ("--", "fitted contraction rate"),
                            (":", None if many else "rate ρ (spectral radius)"),
                            ("-.", "solver tol" if isinstance(tol, (int, float)) and tol > 0 else None)):
            if what:
                ax.plot([], [], color="0.3", ls=style, lw=1.1, label=what)
        ax.set_yscale("log")
        ax.set(xlabel="forward step t", ylabel="residual ‖f(z_t) − z_t‖",
               title="forward solve" + (f" ({summary.forward['method']})" if summary.forward.get("method") else ""))
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return fig


# ---- spread of the spectral radius ----------------------------------------------------------------

def _jitter(count: int) -> np.ndarray:
    """Deterministic horizontal offsets in [-0.15, 0.15] (golden-ratio sequence, no random state)."""
    return (((np.arange(count) * 0.6180339887) % 1.0) - 0.5) * 0.3


def spectral_radius_figure(summary: SpectralSummary) -> Figure | None:
    """Spectral radius (and ‖J‖₂ where known) over samples: box + points, the line ρ = 1."""
    groups = [("spectral radius ρ", summary.spectral_radius), ("‖J‖₂", summary.lipschitz)]
    groups = [(name, values) for name, values in groups if _finite(values)]
    if not groups or groups[0][0] != "spectral radius ρ":
        return None
    names = [name for name, _ in groups]
    with figure_style():
        fig, axes = new_figure(2.4 + 1.9 * len(groups), 4.2)
        ax = axes[0, 0]
        xs, ys = [], []
        for name, values in groups:
            for v in _finite(values):
                xs.append(name)
                ys.append(v)
        sns.boxplot(x=xs, y=ys, order=names, ax=ax, width=0.5, showfliers=False, color="0.9", linecolor="0.4")
        for g, (name, values) in enumerate(groups):
            idx = [i for i in range(len(values)) if _at(values, i) is not None]
            x = g + _jitter(len(idx))
            y = np.array([values[i] for i in idx], dtype=float)
            err = None
            if name == "spectral radius ρ" and summary.spectral_radius_uncertainty:
                err = np.array([_at(summary.spectral_radius_uncertainty, i) or 0.0 for i in idx])
            ax.errorbar(x, y, yerr=err, fmt="o", ms=5, color=sns.color_palette("colorblind")[g],
                        ecolor="0.3", elinewidth=0.8, capsize=2, zorder=3)
        ax.axhline(1.0, color="crimson", lw=1.2, ls="--", label="ρ = 1: contraction boundary")
        ax.set(xlabel="", ylabel="value over samples", title=f"spread over {len(summary.spectral_radius)} samples")
        ax.legend(loc="best", fontsize=7)
    return fig


# ---- gradient estimators --------------------------------------------------------------------------

def _cost(row: dict) -> float:
    return float(row.get("vjps") or 0) + float(row.get("jvps") or 0)


def estimator_figure(summary: SpectralSummary) -> Figure | None:
    """Relative gradient error vs matvec cost (VJPs + JVPs) per estimator, log-log; cosine <= 0 circled."""
    rows = [r for r in summary.estimators
            if isinstance(r.get("relative_error"), (int, float)) and math.isfinite(float(r["relative_error"]))]
    if not rows:
        return None
    names = list(dict.fromkeys(str(r.get("estimator")) for r in rows))
    colors = _palette(len(names))
    with figure_style():
        fig, axes = new_figure(7.6, 4.6)
        ax = axes[0, 0]
        bad_x, bad_y = [], []
        for k, name in enumerate(names):
            group = sorted((r for r in rows if str(r.get("estimator")) == name), key=_cost)
            x = np.array([_cost(r) for r in group])
            y = np.maximum(np.array([float(r["relative_error"]) for r in group]), _ERROR_FLOOR)
            if len(group) > 1:
                ax.plot(x, y, color=colors[k], lw=0.8, alpha=0.6)
            ax.scatter(x, y, marker=_MARKERS[k % len(_MARKERS)], s=55, color=colors[k], label=name, zorder=3,
                       edgecolors="white", linewidths=0.5)
            for r, xv, yv in zip(group, x, y, strict=False):
                cosine = r.get("cosine")
                if isinstance(cosine, (int, float)) and not (cosine > 0):
                    bad_x.append(xv)
                    bad_y.append(yv)
        if bad_x:
            ax.scatter(bad_x, bad_y, s=260, facecolors="none", edgecolors="crimson", linewidths=1.6, zorder=4,
                       label="cosine ≤ 0 (not a descent direction)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("log")
        ax.set(xlabel="matrix-vector products (VJPs + JVPs)", ylabel="relative gradient error",
               title="gradient error vs cost")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return fig
