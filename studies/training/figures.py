"""The training study's figures, drawn from the stored rows and the summary table (nothing is recomputed).
`draw_all` saves every figure and returns {name: file name or None}."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .run import ABLATIONS, ESTIMATORS, LABELS


def draw_all(rows: list[dict], summary: list[dict], more: int, T: int, folder: Path) -> dict[str, str | None]:
    """Every figure saved as folder/NAME.png: {name: file name, or None where there was nothing to draw}."""
    smooth = max(1, len(rows[0]["losses"]) // 50)
    figs = {
        "loss": _curve_figure(rows, "base", "", "losses", "training loss (MSE)", "Loss, base setting (smoothed)",
                              log=True, smooth=smooth),
        "grad_norm": _curve_figure(rows, "base", "", "grad_norms", "gradient norm",
                                   "Gradient norm, base setting (no clipping)", log=True),
        "spectral_radius": _rho_figure(rows),
        "residual": _curve_figure(rows, "base", "log_step", "residual", "relative residual at z_T",
                                  "Forward residual ||f(z_T) − z_T|| / ||f(z_T)||", log=True),
        "cosine": _cosine_figure(rows),
        "eval_bars": _bars_figure(summary, more, T),
        "iterations": _iterations_figure(rows),
        "ablations": _ablation_figure(summary, more),
        "ablation_grad_norm": _ablation_curves(rows),
        "examples": _examples_figure(rows),
    }
    folder.mkdir(parents=True, exist_ok=True)
    return {name: _save(fig, folder / f"{name}.png") for name, fig in figs.items()}


def _smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def _palette():
    import seaborn as sns
    colours = sns.color_palette("colorblind", 3)
    return dict(zip(ESTIMATORS, colours, strict=True))


def _curve_figure(rows: list[dict], ablation: str, x_key: str, y_key: str, ylabel: str, title: str, *,
                  log: bool = False, smooth: int = 1, hline: float | None = None, rows_key=None):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    sel = [r for r in rows if r["config"]["ablation"] == ablation]
    if not sel or not any(r.get(y_key) for r in sel):
        return None
    with figure_style():
        fig, axes = new_figure(6.4, 3.8)
        ax = axes[0, 0]
        for est in ESTIMATORS:
            first = True
            for r in (r for r in sel if r["config"]["estimator"] == est):
                y = r.get(y_key) or []
                if not y:
                    continue
                x = r[x_key] if x_key else list(range(len(y)))
                ys = _smooth(y, smooth)
                ax.plot(x[:len(ys)], ys, color=colours[est], lw=1.2, alpha=0.85,
                        label=LABELS[est] if first else None)
                first = False
        if hline is not None:
            ax.axhline(hline, color="0.3", lw=0.9, ls="--")
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    return fig


def _bars_figure(summary: list[dict], more: int, T: int):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    base = [s for s in summary if s["ablation"] == "base"]
    if not base:
        return None
    with figure_style():
        fig, axes = new_figure(9.0, 3.6, ncols=2)
        for ax, metric, ylabel in ((axes[0, 0], "fg_ari", "FG-ARI (higher is better)"),
                                   (axes[0, 1], "mse", "reconstruction MSE (lower is better)")):
            width = 0.38
            for i, s in enumerate(base):
                for j, (key, hatch) in enumerate(((f"{metric}_T", None), (f"{metric}_{more}", "//"))):
                    ax.bar(i + (j - 0.5) * width, s[key], width, yerr=s[key + "_std"], color=colours[s["estimator"]],
                           hatch=hatch, edgecolor="0.2", lw=0.6, capsize=3,
                           label=(f"{T} test iterations" if j == 0 else f"{more} test iterations") if i == 0 else None)
            ax.set_xticks(range(len(base)), [LABELS[s["estimator"]] for s in base], fontsize=8)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle("Base setting: mean ± std over seeds")
    return fig


def _iterations_figure(rows: list[dict]):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    with figure_style():
        fig, axes = new_figure(10.0, 3.8, ncols=2)
        for ablation, ls in (("base", "-"), ("iters7", "--")):
            for est in ESTIMATORS:
                sel = [r for r in rows if r["config"]["ablation"] == ablation and r["config"]["estimator"] == est]
                if not sel:
                    continue
                its = sel[0]["eval_iters"]
                for ax, key in ((axes[0, 0], "fg_ari"), (axes[0, 1], "mse")):
                    y = np.nanmean(np.array([r[key] for r in sel], dtype=float), axis=0)
                    ax.plot(its, y, ls=ls, marker="o", ms=3, color=colours[est],
                            label=f"{LABELS[est]}, trained with {sel[0]['config']['iters']}")
        axes[0, 0].set(xlabel="test-time iterations", ylabel="FG-ARI", title="FG-ARI vs test-time iterations")
        axes[0, 1].set(xlabel="test-time iterations", ylabel="MSE", title="MSE vs test-time iterations")
        axes[0, 1].set_yscale("log")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7)
    return fig


def _ablation_figure(summary: list[dict], more: int):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    with figure_style():
        fig, axes = new_figure(12.0, 3.6, ncols=3)
        for ax, key, ylabel in ((axes[0, 0], f"mse_{more}", f"MSE at {more} test iterations"),
                                (axes[0, 1], "fg_ari_T", "FG-ARI at the training iterations"),
                                (axes[0, 2], "max_grad_norm", "largest gradient norm")):
            width = 0.26
            for j, est in enumerate(ESTIMATORS):
                ys = [next((s[key] for s in summary if s["ablation"] == a and s["estimator"] == est), math.nan)
                      for a in ABLATIONS]
                ax.bar(np.arange(len(ABLATIONS)) + (j - 1) * width, ys, width, color=colours[est], label=LABELS[est])
            ax.set_xticks(range(len(ABLATIONS)), ABLATIONS)
            ax.set_ylabel(ylabel)
            if key == "max_grad_norm":
                ax.set_yscale("log")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("Ablations (seed 0; base = mean over seeds)")
    return fig


def _examples_figure(rows: list[dict]):
    from fpgrad.report import figure_style, new_figure
    sel = [r for r in rows if "examples" in r and r["config"]["ablation"] == "base"]
    sel.sort(key=lambda r: ESTIMATORS.index(r["config"]["estimator"]))
    if not sel:
        return None
    ex0 = sel[0]["examples"]
    n = len(ex0["image"])
    K = len(ex0["masks"][0][0])
    # columns: image, true labels, then per estimator and iteration count: reconstruction, segmentation
    cols = 2 + sum(2 * len(r["examples"]["iters"]) for r in sel)
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    with figure_style():
        fig, axes = new_figure(1.15 * cols, 1.25 * n + 0.6, nrows=n, ncols=cols)
        for i in range(n):
            image = np.asarray(ex0["image"][i], dtype=float).transpose(1, 2, 0) / 255
            axes[i, 0].imshow(image)
            axes[i, 1].imshow(np.asarray(ex0["labels"][i]), cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
            c = 2
            for r in sel:
                ex = r["examples"]
                for t, iters in enumerate(ex["iters"]):
                    recon = np.asarray(ex["reconstruction"][t][i], dtype=float).transpose(1, 2, 0) / 255
                    seg = np.asarray(ex["masks"][t][i], dtype=float).argmax(0)
                    axes[i, c].imshow(recon)
                    axes[i, c + 1].imshow(seg + 1, cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
                    if i == 0:
                        short = {"unrolled": "unrolled", "one_step": "one-step", "implicit": "implicit"}
                        est = short[r["config"]["estimator"]]
                        axes[i, c].set_title(f"{est}\nrecon, {iters} it", fontsize=7)
                        axes[i, c + 1].set_title(f"{est}\nmasks, {iters} it", fontsize=7)
                    c += 2
        axes[0, 0].set_title("image", fontsize=7)
        axes[0, 1].set_title("true objects", fontsize=7)
        for ax in axes.reshape(-1):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        fig.suptitle(f"Test scenes, seed-0 models of the base setting ({K} slots; masks = argmax over slots)",
                     fontsize=9)
    return fig


def _save(fig, path: Path) -> str | None:
    from fpgrad.report import save_figure
    if fig is None:
        return None
    save_figure(fig, path)
    return path.name


def _rho_figure(rows: list[dict]):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    sel = [r for r in rows if r["config"]["ablation"] == "base" and r.get("rho_T")]
    if not sel:
        return None
    with figure_style():
        fig, axes = new_figure(10.0, 3.8, ncols=2, sharey=True)
        for ax, key, title in ((axes[0, 0], "rho_T", "at the training iterate z_T"),
                               (axes[0, 1], "rho_star", "at z* (Anderson; hollow: not converged)")):
            for est in ESTIMATORS:
                first = True
                for r in (r for r in sel if r["config"]["estimator"] == est):
                    ax.plot(r["spectral_step"], r[key], color=colours[est], lw=1.2,
                            label=LABELS[est] if first else None)
                    done = np.asarray(r.get("fixed_point_converged", [1.0] * len(r[key])), dtype=float) >= 1.0
                    if key == "rho_T":
                        done = np.ones_like(done, dtype=bool)
                    x, y = np.asarray(r["spectral_step"]), np.asarray(r[key], dtype=float)
                    ax.plot(x[done], y[done], ls="none", marker="o", ms=4, color=colours[est])
                    ax.plot(x[~done], y[~done], ls="none", marker="o", ms=4, mfc="white", color=colours[est])
                    first = False
            ax.axhline(1.0, color="crimson", lw=1.0, ls="--")
            ax.set(xlabel="training step", ylabel="spectral radius ρ(J)", title=f"ρ(J) {title}")
        axes[0, 0].legend(fontsize=8)
    return fig


def _cosine_figure(rows: list[dict]):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    sel = [r for r in rows if r["config"]["ablation"] == "base" and r.get("cosine_one_step_all")]
    if not sel:
        return None
    with figure_style():
        fig, axes = new_figure(10.0, 3.8, ncols=2, sharey=True)
        for ax, name, title in ((axes[0, 0], "one_step", "one-step vs implicit"),
                                (axes[0, 1], "unrolled", "unrolled vs implicit")):
            for est in ESTIMATORS:
                first = True
                for r in (r for r in sel if r["config"]["estimator"] == est):
                    ax.plot(r["probe_step"], r[f"cosine_{name}_all"], color=colours[est], lw=1.2, marker=".",
                            label=f"model trained with {LABELS[est]}" if first else None)
                    first = False
            ax.axhline(0.0, color="0.4", lw=0.8)
            ax.set(xlabel="training step", ylabel="cosine (all parameters)", title=title, ylim=(-1.05, 1.05))
        axes[0, 0].legend(fontsize=7)
    return fig


def _ablation_curves(rows: list[dict]):
    from fpgrad.report import figure_style, new_figure
    colours = _palette()
    with figure_style():
        fig, axes = new_figure(12.0, 6.4, nrows=2, ncols=len(ABLATIONS), sharey="row")
        for j, ablation in enumerate(ABLATIONS):
            sel = [r for r in rows if r["config"]["ablation"] == ablation and r["config"]["seed"] == 0]
            for r in sel:
                est = r["config"]["estimator"]
                axes[0, j].plot(r["grad_norms"], color=colours[est], lw=0.6, alpha=0.8, label=LABELS[est])
                losses = _smooth(r["losses"], max(1, len(r["losses"]) // 50))
                axes[1, j].plot(losses, color=colours[est], lw=1.0, label=LABELS[est])
            axes[0, j].set(title=ablation, yscale="log")
            axes[1, j].set(xlabel="training step", yscale="log")
        axes[0, 0].set_ylabel("gradient norm")
        axes[1, 0].set_ylabel("loss (smoothed)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
        fig.suptitle("Ablations, seed 0")
    return fig
