"""Study `cost-scaling`: memory saved for backward and wall time of forward + backward vs the number of forward
iterations T, per gradient estimator, on slot attention: the constant-memory claim measured.

Every estimator sees exactly T plain iterations from the same z0: Unrolled(T) backprops through all of them,
Truncated(3, T) through the last 3, OneStep through one more step at z_T, Neumann(k) and Implicit(gmres)
solve their adjoint at z_T. Bytes: `Gradient.cost.bytes_saved` (saved-tensor hooks in fpgrad.gradient).
Time: time.perf_counter around fixed_point + torch.autograd.grad (what a training step does), median of
`repeats` calls after one warm-up call, with torch.set_num_threads(threads).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

import fpgrad
from fpgrad.estimators import Implicit, Neumann, OneStep, Truncated, Unrolled
from fpgrad.forward import Iterate
from fpgrad.report import atomic_write_text, figure_style, markdown_table, new_figure, save_figure
from fpgrad.spectral import spectral_radius
from fpgrad.study import Study
from fpgrad.study_tools import (
    median,
    provenance_markdown,
    time_interleaved,
    torch_threads,
    write_csv,
)

NAME = "cost-scaling"
ESTIMATORS = ["Unrolled", "Truncated", "OneStep", "Neumann", "Implicit"]
TRUNCATED_K = 3
NEUMANN_K = 5

FULL = {"map": {"dim": 64, "num_slots": 7, "batch": 8, "inputs": 64},
        "T": [1, 3, 10, 30, 100, 300, 1000], "threads": 1, "repeats": 3}
QUICK = {"map": {"dim": 8, "num_slots": 3, "batch": 2, "inputs": 8},
         "T": [1, 10, 30], "threads": 1, "repeats": 3}


def grid(quick: bool) -> list[dict]:
    s = QUICK if quick else FULL
    return [{"estimator": name, "T": T, **s["map"], "dtype": "float32", "truncated_k": TRUNCATED_K,
             "neumann_k": NEUMANN_K, "threads": s["threads"], "repeats": s["repeats"]}
            for T in s["T"] for name in ESTIMATORS]


def make_estimator(c: dict):
    T = int(c["T"])
    name = c["estimator"]
    if name == "Unrolled":
        return Unrolled(T)
    if name == "Truncated":
        return Truncated(min(c["truncated_k"], T), T=T)       # k <= T: at T < k it is Unrolled(T)
    if name == "OneStep":
        return OneStep()
    if name == "Neumann":
        return Neumann(c["neumann_k"])
    if name == "Implicit":
        return Implicit(solver="gmres")                       # default tolerance of the dtype (1e-5 in float32)
    raise ValueError(f"cost-scaling: unknown estimator {name!r}")


def label(c: dict) -> str:
    name = c["estimator"]
    if name == "Truncated":
        return f"Truncated({c['truncated_k']})"
    if name == "Neumann":
        return f"Neumann({c['neumann_k']})"
    if name == "Implicit":
        return "Implicit(gmres)"
    return name


def build_problem(c: dict):
    dtype = getattr(torch, c["dtype"])
    seed = int(c["seed"])
    m = fpgrad.maps.slot_attention(dim=c["dim"], num_slots=c["num_slots"], seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(1000 * seed + 1)
    x = torch.randn(c["batch"], c["inputs"], c["dim"], generator=g, dtype=dtype)
    with torch.no_grad():
        z0 = m.init_state(x, torch.Generator().manual_seed(1000 * seed + 3))
    target = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1000 * seed + 2), dtype=dtype)

    def loss_fn(z):
        return ((z - target) ** 2).mean()
    return m, x, z0, loss_fn


def run(c: dict) -> dict:
    t0 = time.perf_counter()
    with torch_threads(c["threads"]):
        row = _run(c)
    row["run_seconds"] = time.perf_counter() - t0
    return row


def _run(c: dict) -> dict:
    m, x, z0, loss_fn = build_problem(c)
    est = make_estimator(c)
    forward = Iterate.exactly(int(c["T"]))
    # bytes and counts: fpgrad.gradient measures the bytes autograd saves for backward (saved-tensor hooks)
    g = fpgrad.gradient(m, x, loss_fn, estimator=est, z0=z0, forward=forward)
    g2 = fpgrad.gradient(m, x, loss_fn, estimator=est, z0=z0, forward=forward)
    params = {k: v.detach().requires_grad_(True) for k, v in m.params.items()}
    leaves = list(params.values())

    def training_step():
        z = fpgrad.fixed_point(m.step, params, x, z0, forward=forward, backward=est)
        return torch.autograd.grad(loss_fn(z), leaves, allow_unused=True)

    def forward_only():
        with torch.no_grad():
            return forward.solve(m.step, m.params, x, z0, batched=True, check=False)

    timed = time_interleaved({"training_step": training_step, "forward_only": forward_only}, repeats=c["repeats"])
    seconds, forward_seconds = timed["training_step"], timed["forward_only"]
    fp = forward_only()
    residuals = [float(v) for v in fp.relative_residuals[-1]]
    solve = g.solve
    rho_T = None
    if c["estimator"] == "Implicit":      # what the adjoint solve faces at z_T (once per T: only in this row)
        rho_T = [float(v) for v in spectral_radius(m, x, fp.z, method="dense", check_fixed_point=False)]
    return {
        "label": label(c), "estimator_repr": repr(est), "bytes_saved": int(g.cost.bytes_saved),
        "bytes_saved_repeat": int(g2.cost.bytes_saved), "vjps": int(g.cost.vjps), "jvps": int(g.cost.jvps),
        "forward_steps": int(g.cost.forward_steps), "backward_steps": int(g.cost.backward_steps),
        "seconds": median(seconds), "seconds_all": [float(s) for s in seconds],
        "forward_only_seconds": median(forward_seconds),
        "forward_relative_residual": max(residuals), "forward_relative_residual_samples": residuals,
        "rho_J_at_z_T_samples": rho_T,
        "adjoint_converged": None if solve is None else bool(torch.as_tensor(solve.converged).all()),
        "adjoint_iterations": None if solve is None else int(torch.as_tensor(solve.iterations).max()),
        "loss": float(g.loss), "num_params": m.num_params(), "state_size": int(z0[0].numel()),
        "threads": torch.get_num_threads(), "unix_time": time.time(),
    }


# ---- tables -----------------------------------------------------------------------------------------

def ratio_table(rows: list[dict]) -> list[dict]:
    """Per (estimator, T): bytes and time, relative to the same estimator at the smallest T and to Unrolled at
    the same T."""
    Ts = sorted({r["config"]["T"] for r in rows})
    by = {(r["label"], r["config"]["T"]): r for r in rows}
    labels = [lb for lb in dict.fromkeys(r["label"] for r in sorted(rows, key=_order))]
    out = []
    for lb in labels:
        first = next((by[(lb, T)] for T in Ts if (lb, T) in by), None)
        for T in Ts:
            r = by.get((lb, T))
            if r is None:
                continue
            unrolled = by.get(("Unrolled", T))
            out.append({
                "estimator": lb, "T": T, "bytes_saved": r["bytes_saved"], "MiB": r["bytes_saved"] / 2 ** 20,
                "bytes_vs_T_min": r["bytes_saved"] / first["bytes_saved"] if first["bytes_saved"] else math.nan,
                "bytes_vs_unrolled": r["bytes_saved"] / unrolled["bytes_saved"] if unrolled else None,
                "ms": 1e3 * r["seconds"], "seconds_vs_T_min": r["seconds"] / first["seconds"],
                "seconds_vs_unrolled": r["seconds"] / unrolled["seconds"] if unrolled else None,
                "forward_only_ms": 1e3 * r["forward_only_seconds"],
                "backward_ms": 1e3 * (r["seconds"] - r["forward_only_seconds"]),
                "vjps": r["vjps"], "jvps": r["jvps"], "forward_steps": r["forward_steps"],
                "backward_steps": r["backward_steps"], "adjoint_iterations": r["adjoint_iterations"],
                "adjoint_converged": r["adjoint_converged"],
                "forward_relative_residual": r["forward_relative_residual"],
                "forward_relative_residual_samples": r.get("forward_relative_residual_samples"),
                "rho_J_at_z_T_samples": r.get("rho_J_at_z_T_samples"),
                "seconds_all": r["seconds_all"]})
    return out


def _order(r: dict) -> tuple:
    return (ESTIMATORS.index(r["config"]["estimator"]), r["config"]["T"])


def pivot(table: list[dict], key: str) -> tuple[list[dict], list[str]]:
    Ts = sorted({r["T"] for r in table})
    labels = list(dict.fromkeys(r["estimator"] for r in table))
    out = []
    for lb in labels:
        rec = {"estimator": lb}
        for r in table:
            if r["estimator"] == lb:
                rec[f"T={r['T']}"] = r[key]
        out.append(rec)
    return out, [f"T={T}" for T in Ts]


# ---- figures ----------------------------------------------------------------------------------------

_MARKERS = {"Unrolled": "o", "Truncated": "s", "OneStep": "*", "Neumann": "D", "Implicit": "v"}


def _colors(labels: list[str]) -> dict:
    import seaborn as sns
    cb = sns.color_palette("colorblind")
    base = {"Unrolled": cb[0], "Truncated": cb[1], "OneStep": cb[2], "Neumann": cb[4], "Implicit": (0.15, 0.15, 0.15)}
    return {lb: base.get(lb.split("(")[0], cb[7]) for lb in labels}


def _vs_T_figure(table: list[dict], key: str, ylabel: str, title: str, meta: dict):
    labels = list(dict.fromkeys(r["estimator"] for r in table))
    colors = _colors(labels)
    with figure_style():
        fig, axes = new_figure(6.8, 4.4)
        ax = axes[0, 0]
        for lb in labels:
            pts = sorted((r for r in table if r["estimator"] == lb), key=lambda r: r["T"])
            xs = np.array([r["T"] for r in pts], dtype=float)
            ys = np.array([r[key] for r in pts], dtype=float)
            ax.plot(xs, ys, color=colors[lb], marker=_MARKERS.get(lb.split("(")[0], "o"),
                    ms=9 if lb == "OneStep" else 6, lw=1.4, label=lb)
            if key == "ms":
                lo = [min(r["seconds_all"]) * 1e3 for r in pts]
                hi = [max(r["seconds_all"]) * 1e3 for r in pts]
                ax.fill_between(xs, lo, hi, color=colors[lb], alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="forward iterations T", ylabel=ylabel, title=title)
        ax.legend(loc="upper left" if key != "ms" else "lower right", fontsize=8)
    return fig


# ---- the written reading ------------------------------------------------------------------------------

def _fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def reading(table: list[dict]) -> list[str]:
    if not table:
        return ["No rows."]
    Ts = sorted({r["T"] for r in table})
    t_lo, t_hi = Ts[0], Ts[-1]
    at = {(r["estimator"], r["T"]): r for r in table}
    out = []
    unr_lo, unr_hi = at.get(("Unrolled", t_lo)), at.get(("Unrolled", t_hi))
    if unr_lo and unr_hi and t_hi > t_lo:
        per_step = (unr_hi["bytes_saved"] - unr_lo["bytes_saved"]) / (t_hi - t_lo)
        slope = math.log(unr_hi["bytes_saved"] / unr_lo["bytes_saved"]) / math.log(t_hi / t_lo)
        out.append(f"**Unrolled's memory grows linearly with T**: {_fmt_bytes(unr_lo['bytes_saved'])} saved for "
                   f"backward at T = {t_lo}, {_fmt_bytes(unr_hi['bytes_saved'])} at T = {t_hi} "
                   f"(×{unr_hi['bytes_saved'] / unr_lo['bytes_saved']:.0f}; {_fmt_bytes(per_step)} per iteration; "
                   f"log-log slope {slope:.2f}).")
    flat = []
    for lb in dict.fromkeys(r["estimator"] for r in table):
        if lb == "Unrolled":
            continue
        # Truncated(k, T) is Unrolled(T) while T < k: its claim is constancy from T = k on
        t_from = TRUNCATED_K if lb.startswith("Truncated") else t_lo
        vals = [r["bytes_saved"] for r in table if r["estimator"] == lb and r["T"] >= t_from]
        if not vals:
            continue
        spread = max(vals) / min(vals) if min(vals) else math.inf
        flat.append((lb, min(vals), max(vals), spread, t_from))
    const = [f for f in flat if f[3] <= 1.0 + 1e-9]
    varying = [f for f in flat if f[3] > 1.0 + 1e-9]
    if const:
        out.append("**Constant memory, measured**: the bytes saved are identical at every T for "
                   + ", ".join(f"{lb} ({_fmt_bytes(lo)}" + (f", from T = {t_from} on" if t_from > t_lo else "")
                               + ")" for lb, lo, _, _, t_from in const) + ".")
    if varying:
        out.append("Not constant across T: " + ", ".join(
            f"{lb} ({_fmt_bytes(lo)}–{_fmt_bytes(hi)}, ×{s:.2f})" for lb, lo, hi, s, _ in varying) + ".")
    if unr_hi:
        parts = [f"{lb} {at[(lb, t_hi)]['bytes_vs_unrolled']:.2g}×" for lb, *_ in flat if (lb, t_hi) in at]
        out.append(f"At T = {t_hi}, relative to Unrolled's bytes: " + ", ".join(parts)
                   + f" (Unrolled stores {1 / min(at[(lb, t_hi)]['bytes_vs_unrolled'] for lb, *_ in flat):.0f}× "
                     "more than the leanest).")
    labels = list(dict.fromkeys(r["estimator"] for r in table))
    hi_rows = [at[(lb, t_hi)] for lb in labels if (lb, t_hi) in at]
    lo_rows = [at[(lb, t_lo)] for lb in labels if (lb, t_lo) in at]
    if hi_rows:
        fwd = float(np.median([r["forward_only_ms"] for r in hi_rows]))

        def share(r: dict) -> str:
            if r["estimator"] == "Unrolled":
                return ""
            if r["forward_only_ms"] >= r["ms"]:
                return " (≈ all of it forward iterations: the rest is within timing noise)"
            return f" (forward iterations {r['forward_only_ms'] / r['ms']:.0%} of it)"
        out.append(f"**Time at T = {t_hi}**: the {t_hi} plain iterations alone (no tape, timed beside each "
                   f"configuration) take {fwd:.4g} ms (median over the configurations); one "
                   "forward + backward takes "
                   + ", ".join(f"{r['estimator']} {r['ms']:.4g} ms{share(r)}" for r in hi_rows) + ".")
    if unr_hi:
        rel = [f"{lb} {at[(lb, t_hi)]['seconds_vs_unrolled']:.2f}×" for lb in labels
               if lb != "Unrolled" and (lb, t_hi) in at]
        out.append(f"At T = {t_hi}, time relative to Unrolled: " + ", ".join(rel) + ".")
    spreads = [max(r["seconds_all"]) / min(r["seconds_all"]) - 1.0 for r in table if min(r["seconds_all"]) > 0]
    if spreads:
        out.append(f"**Timing noise**: the {len(table[0]['seconds_all'])} repeats of one configuration differ by a "
                   f"median {float(np.median(spreads)):.0%} and up to {max(spreads):.0%} (max/min − 1), so time "
                   "ratios closer to 1 than that are not resolved (Truncated and OneStep, for instance, do nearly the "
                   "same work: T − 3 untaped iterations + 3 taped steps vs T untaped + 1 taped).")
    if lo_rows:
        out.append(f"At T = {t_lo}: " + ", ".join(f"{r['estimator']} {r['ms']:.3g} ms"
                                                                       for r in lo_rows)
                   + f" (one iteration alone: {lo_rows[0]['forward_only_ms']:.3g} ms).")
    any_row = [r for r in table if r["estimator"] == labels[0]]
    if any_row:
        last = max(any_row, key=lambda r: r["T"])
        res = last["forward_relative_residual_samples"] or []
        unconverged = [v for v in res if v > 1e-4]
        out.append(f"**The forward pass itself**: after T = {last['T']} plain iterations the relative residual "
                   f"‖f(z_T) − z_T‖/‖f(z_T)‖ is at most {max(res):.1e} (median over the {len(res)} samples "
                   f"{float(np.median(res)):.1e})"
                   + (f"; {len(unconverged)} of them {'is' if len(unconverged) == 1 else 'are'} still above 1e-4, "
                      "so z_T is not yet a fixed point there" if unconverged else "")
                   + ". Memory and time here are per T, whatever the residual.")
    imp = [r for r in table if r["estimator"].startswith("Implicit")]
    if imp:
        parts = []
        for r in imp:
            rho = r.get("rho_J_at_z_T_samples") or []
            parts.append(f"T = {r['T']}: {r['vjps']} VJPs, {'converged' if r['adjoint_converged'] else 'NOT converged'}"
                         + (f", ρ(J) at z_T up to {max(rho):.2f}" if rho else ""))
        bad = [r["T"] for r in imp if r["adjoint_converged"] is False]
        out.append("**Implicit(gmres)'s backward cost depends on the state it linearises at**: "
                   + "; ".join(parts) + "."
                   + (f" At T = {', '.join(map(str, bad))} GMRES (restart 30, at most 1000 iterations, tol 1e-5) "
                      "stopped without reaching its tolerance (fpgrad warned); there z_T is far from a fixed point "
                      "and the system (I − Jᵀ) u = g it solves is not the one whose solution gives the implicit "
                      "gradient." if bad else ""))
    return out


def finalize(rows: list[dict], out_dir: Path, meta: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=_order)
    table = ratio_table(rows)
    columns = ["estimator", "T", "bytes_saved", "MiB", "bytes_vs_T_min", "bytes_vs_unrolled", "ms",
               "seconds_vs_T_min", "seconds_vs_unrolled", "forward_only_ms", "backward_ms", "vjps", "jvps",
               "forward_steps", "backward_steps", "adjoint_iterations", "adjoint_converged",
               "forward_relative_residual", "forward_relative_residual_samples", "rho_J_at_z_T_samples",
               "seconds_all"]
    write_csv(out / "cost.csv", table, columns)
    piv = {}
    for key, fmt in (("MiB", ".3g"), ("bytes_vs_T_min", ".3g"), ("bytes_vs_unrolled", ".3g"), ("ms", ".3g"),
                     ("seconds_vs_unrolled", ".3g")):
        p, cols = pivot(table, key)
        write_csv(out / f"{key}_by_T.csv", p, ["estimator", *cols])
        piv[key] = markdown_table(p, ["estimator", *cols], {c: fmt for c in cols})
    c0 = rows[0]["config"] if rows else {}
    threads = sorted({r["threads"] for r in rows})
    titles = {"MiB": "Memory saved for backward (MiB)",
              "bytes_vs_T_min": f"Memory saved relative to the same estimator at T = {table[0]['T'] if table else '?'}",
              "bytes_vs_unrolled": "Memory saved relative to Unrolled at the same T",
              "ms": "Wall time of forward + backward (ms, median)",
              "seconds_vs_unrolled": "Wall time relative to Unrolled at the same T"}
    tables_md = "\n\n".join(["# cost-scaling: tables", *[f"## {titles[k]}\n\n{v}" for k, v in piv.items()],
                             "Every number, with VJPs, adjoint iterations and each timed repeat: `cost.csv`."]) + "\n"
    atomic_write_text(out / "tables.md", tables_md)
    figures = {}
    if table:
        save_figure(_vs_T_figure(table, "MiB", "MiB saved for backward (saved-tensor hooks)",
                                 "Memory saved for backward vs forward iterations", meta), out / "bytes_vs_T.png")
        save_figure(_vs_T_figure(table, "ms", "forward + backward wall time (ms)",
                                 f"Wall time vs forward iterations ({', '.join(map(str, threads))} thread)", meta),
                    out / "time_vs_T.png")
        figures = {"bytes_vs_T.png": "Memory autograd saves for backward (saved-tensor hooks) vs T, log-log. Lines "
                                     "that coincide are estimators that keep the same tensors (Neumann and Implicit "
                                     "both keep z*, x and the parameters).",
                   "time_vs_T.png": "Median wall time of one forward + backward call vs T, log-log; the band spans "
                                    "the repeats."}
    setup = ["## Setup", "",
             f"- slot attention at its random init: dim {c0.get('dim')}, {c0.get('num_slots')} slots, batch "
             f"{c0.get('batch')}, {c0.get('inputs')} inputs, {c0.get('dtype')}; loss mean((z − t)²), fixed "
             "Gaussian target t.",
             "- every estimator sees exactly T plain iterations from the same z0 "
             "(`Iterate(tol=0.0, max_iter=T, warn=False)` for the non-unrolled ones): Unrolled(T) backprops through "
             f"all T; Truncated({TRUNCATED_K}, T=T) through the last {TRUNCATED_K} (at T < {TRUNCATED_K}: "
             f"through all T); OneStep through one more step at z_T; Neumann({NEUMANN_K}) and Implicit(gmres, "
             "tol 1e-5, GMRES restart 30, at most 1000 iterations: the defaults) solve their adjoint at z_T.",
             "- memory: `Gradient.cost.bytes_saved` from `fpgrad.gradient` — the unique storages autograd saves for "
             "backward during the forward pass (saved-tensor hooks); measured twice per configuration, equal "
             "both times in every row" if all(r["bytes_saved"] == r["bytes_saved_repeat"] for r in rows) else
             "- memory: `Gradient.cost.bytes_saved` (saved-tensor hooks); NOTE: two measurements of the same "
             "configuration differed in some rows (see rows.jsonl)",
             f"- time: `time.perf_counter` around `fpgrad.fixed_point` + `torch.autograd.grad` w.r.t. the "
             f"parameters, median of {c0.get('repeats')} calls after one warm-up call, "
             f"`torch.set_num_threads({', '.join(map(str, threads))})`; `forward_only_ms` in the tables is the "
             "T iterations alone without the tape, timed in turn with the forward + backward calls.",
             "- caveats: bytes_saved is what is held between forward and backward; the backward pass's own "
             "transient workspace (e.g. GMRES's Krylov basis of up to 31 vectors per sample, the one-step VJP's "
             "activations) is not in it. `fpgrad.maps.slot_attention_step` recomputes LayerNorm(inputs), k and v "
             "every iteration, so Unrolled saves those [B, N, D] tensors once per iteration; an implementation that "
             "computes them once would make Unrolled's per-iteration bytes smaller (the growth stays linear). "
             "Timings depend on what else the machine runs: see the timing-noise line of the reading before "
             "comparing times."]
    lines = ["# Cost scaling of fixed-point gradient estimators", "",
             "Memory saved for backward and wall time of one forward + backward pass vs the number of forward "
             "iterations T (issue #6, part 2): the constant-memory claim of implicit / one-step gradients, "
             "measured.", "",
             provenance_markdown(meta, sum(r["run_seconds"] for r in rows) if all("run_seconds" in r for r in rows)
                                 else None), "", *setup, "", "## Reading", ""]
    lines += [f"- {b}" for b in reading(table)]
    lines += [""]
    for name, caption in figures.items():
        lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    for key in ("MiB", "bytes_vs_unrolled", "ms", "seconds_vs_unrolled"):
        lines += [f"## {titles[key]}", "", piv[key], ""]
    lines += ["More: `tables.md` (also bytes relative to T = 1), `cost.csv` (every number), `*_by_T.csv`, "
              "`rows.jsonl` (the raw rows).", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))


STUDY = Study(name=NAME,
              description="bytes saved for backward and wall time vs forward iterations T, per estimator "
                          "(slot attention, float32)",
              grid=grid, run=run, finalize=finalize, module=__name__)
