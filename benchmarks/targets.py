"""Regenerate reports/benchmarks/README.md from the benchmarks' JSON files (nothing is recomputed here).

    python -m benchmarks.targets      (or: fpgrad bench targets)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import _common as C

ORDER = ("adjoint_solve", "solver_overhead", "forward_solve", "memory", "spectral_radius", "silent_failures", "vmap",
         "reuse", "recipe_overhead", "contraction", "dispatch")


def _description(name: str, dtype: str = "float64") -> str:
    """The benchmark module's docstring (what it measures and how), without its usage line; for float64 without
    its --dtype paragraph, for float32 that paragraph alone."""
    import importlib
    doc = importlib.import_module(f"benchmarks.{name}").__doc__ or ""
    paragraphs = [p for p in doc.strip().split("\n\n") if not p.strip().startswith("python -m")]
    keep = [p for p in paragraphs if p.strip().startswith("--dtype") == (dtype != "float64")]
    return "\n\n".join(keep) + "\n"


# ---- float32 beside float64 ------------------------------------------------------------------------------

FLOAT32 = ("adjoint_solve", "forward_solve", "vmap", "memory")     # the benchmarks that take --dtype
FLOAT32_DIR = "float32"
FLOAT32_NOTES = "NOTES.md"      # the hand-written reading of the numbers, kept beside the float32 JSON files
# float32/NAME.float64.json, where present: the same benchmark in float64 at the float32 run's sizes (when the
# float32 run had to be --quick), a like-for-like column beside the committed full-size float64 figure
TWIN = "{name}.float64.json"


def _adjoint_key(target_name: str) -> str:
    """'adjoint time to 1e-6, tanh rho=0.9 (rho 0.900)' -> 'adjoint time, tanh rho=0.9': the same target of the
    same map, whatever the dtype's error target and the measured rho."""
    import re
    return re.sub(r" \(rho [0-9.]+\)", "", re.sub(r" to [0-9.e+-]+,", ",", target_name))


def _forward_targets(data: dict) -> list[dict]:
    """forward_solve has no stored targets; the kind the other benchmarks use: per map, fpgrad's fastest converged
    solver against TorchDEQ's fastest converged one (time ratio <= 1.0), with their steps."""
    out = []
    for entry in data["results"]["maps"]:
        best = {}
        for lib in ("fpgrad", "torchdeq"):
            ok = [r for r in entry["rows"] if r["library"] == lib and r["converged"]]
            best[lib] = min(ok, key=lambda r: r["seconds_median"]) if ok else None
        fp, peer = best["fpgrad"], best["torchdeq"]
        name = f"forward time to tol {data['results']['tol']:g} vs torchdeq, {entry['label']}"
        if fp is None or peer is None:
            out.append(C.target(name, None if peer is None else False, None, "<= 1.0",
                                "no converged " + ("torchdeq" if peer is None else "fpgrad") + " solver"))
            continue
        ratio = fp["seconds_median"] / peer["seconds_median"]
        out.append(C.target(name, ratio <= 1.0, round(ratio, 3), "<= 1.0",
                            f"fpgrad {fp['solver']} {fp['steps']} steps {C.fmt(fp['seconds_median'])} s vs torchdeq "
                            f"{peer['solver']} {peer['steps']} steps {C.fmt(peer['seconds_median'])} s"))
    return out


def _targets_of(name: str, data: dict) -> list[dict]:
    """A run's targets, keyed for pairing across dtypes (adjoint_solve's re-derived with the run's tolerances)."""
    if name == "adjoint_solve":
        from benchmarks.adjoint_solve import targets_for, tolerances_of
        tol = tolerances_of(data["results"])
        out = [t for e in data["results"]["maps"]
               for t in targets_for(f"{e['label']} (rho {e['rho']:.3f})", e["solvers"], e.get("end_to_end"), tol)]
        return [{**t, "key": _adjoint_key(t["target"])} for t in out]
    if name == "forward_solve":
        return [{**t, "key": t["target"].split(" vs torchdeq, ")[1]} for t in _forward_targets(data)]
    return [{**t, "key": t["target"]} for t in data.get("targets", [])]


def _figure(t: dict | None) -> str:
    return "-" if t is None else f"{t['value']} ({_met(t['met'])})"


def float32_section(out_dir: Path) -> list[str]:
    """'## float32 beside float64': per benchmark and target, the float64 figure (out_dir/NAME.json) beside the
    float32 one (out_dir/float32/NAME.json), each judged by its own dtype's tolerances; then the reading
    (float32/NOTES.md) and the float32 tables. Empty when no float32 run is stored."""
    from fpgrad.report import markdown_table
    f32_dir = out_dir / FLOAT32_DIR
    runs = {name: (C.load(name, out_dir), C.load(name, f32_dir)) for name in FLOAT32}
    if not any(d32 for _, d32 in runs.values()):
        return []
    lines = ["## float32 beside float64", "",
             "Generated from `reports/benchmarks/float32/*.json` (`python -m benchmarks.NAME --dtype float32`) beside "
             "the float64 JSON files above. Each side is judged with its own dtype's tolerances (float64: adjoint "
             "to 1e-6, gradients accepted at 1e-5, forward tol 1e-8; float32: adjoint to 1e-4, gradients at 1e-3, "
             "forward tol 1e-5); references (dense LU u_ref, exact gradients, z*) are float64 in both.", ""]
    rows = []
    for name, (d64, d32) in runs.items():
        if d32 is None:
            rows.append({"benchmark": name, "target": "(float32 not run)"})
            continue
        t64 = {t["key"]: t for t in _targets_of(name, d64)} if d64 else {}
        t32 = {t["key"]: t for t in _targets_of(name, d32)}
        twin_path = f32_dir / TWIN.format(name=name)
        twin = ({t["key"]: t for t in _targets_of(name, json.loads(twin_path.read_text(encoding="utf-8")))}
                if twin_path.exists() else {})
        bench = name + (" (float32 --quick)" if d32.get("quick") else "")
        for key in list(t32) + [k for k in t64 if k not in t32]:
            rows.append({"benchmark": bench, "target": key, "float64": _figure(t64.get(key)),
                         "float64, float32's sizes": _figure(twin.get(key)) if twin else "",
                         "float32": _figure(t32.get(key)), "float32 detail": (t32.get(key) or {}).get("detail", "")})
    met = sum(1 for r in rows if r.get("float32", "").endswith("(met)"))
    missed = sum(1 for r in rows if r.get("float32", "").endswith("(**missed**)"))
    cols = ["benchmark", "target", "float64"]
    if any(r.get("float64, float32's sizes") for r in rows):
        cols.append("float64, float32's sizes")
    lines += [markdown_table(rows, cols + ["float32", "float32 detail"]), "",
              f"float32: {met} met, {missed} missed ('-': that map or size is not in that dtype's run; a --quick "
              "float32 run has fewer maps, smaller ones).",
              ""]
    notes = f32_dir / FLOAT32_NOTES
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").strip(), ""]
    lines += ["### float32 runs", ""] + [_run_line(name, d32) for name, (_, d32) in runs.items() if d32]
    lines += [_run_line(f"{name} (float64 at float32's sizes)", json.loads(path.read_text(encoding="utf-8")))
              for name in FLOAT32 if (path := f32_dir / TWIN.format(name=name)).exists()]
    for name, (_, d32) in runs.items():
        if d32 is None:
            continue
        lines += ["", f"### {name}, float32", "", _description(name, "float32"), ""]
        if name == "adjoint_solve":
            lines += _adjoint_tables(d32)
        elif name == "forward_solve":
            lines += _forward_tables(d32)
        else:
            lines += _generic_tables(name, d32)
    return lines


def _met(value: Any) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}.get(value, str(value))


def _run_line(name: str, data: dict) -> str:
    m = data.get("machine", {})
    v = m.get("versions", {})
    git = m.get("git", {}) or {}
    return (f"- `{name}`: {data.get('date', '?')}, {data.get('seconds', '?')} s"
            f"{' (--quick: not a result)' if data.get('quick') else ''}; {m.get('cpu', '?')}, "
            f"{data.get('threads')} thread(s), load average {m.get('load_average_start')} -> "
            f"{m.get('load_average_end')}; torch {v.get('torch')}, torchdeq {v.get('torchdeq')}, "
            f"torchopt {v.get('torchopt')}, scipy {v.get('scipy')}; commit {str(git.get('commit'))[:10]}"
            f"{' (dirty tree)' if git.get('dirty') else ''}")


def _adjoint_tables(data: dict) -> list[str]:
    from fpgrad.report import markdown_table
    out = []
    for entry in data["results"]["maps"]:
        rows = []
        for r in entry["solvers"]:
            row = {"library": r["library"], "solver": r["solver"]}
            for t in data["results"]["targets_error"]:
                hit = r["targets"].get(str(t))
                row[f"VJP+JVP to {t:g}"] = "not reached" if hit is None else f"{hit['vjps']}+{hit['jvps']}"
                row[f"s to {t:g}"] = "-" if hit is None else C.fmt(hit.get("seconds_median"))
            if "floor" in r:
                f = r["floor"]
                row["least error (budget)"] = f"{C.fmt(f['error'])} ({f['budget']})"
            rows.append(row)
        cols = ["library", "solver"] + [f"{k} to {t:g}" for t in data["results"]["targets_error"]
                                        for k in ("VJP+JVP", "s")]
        if any("floor" in r for r in entry["solvers"]):
            cols.append("least error (budget)")
        out += [f"#### {entry['label']}: n = {entry['n']}, rho(J) = {entry['rho']:.4f}"
                + (f", one VJP {C.fmt(entry['vjp_seconds'])} s" if entry.get("vjp_seconds") else ""), "",
                markdown_table(rows, cols), ""]
        e2e = entry.get("end_to_end")
        if e2e:
            out += [f"End to end (forward tol {e2e['forward_tol']:g}, backward tol {e2e['backward_tol']:g}; "
                    f"loss {e2e['loss']}):", "",
                    markdown_table([{"method": r["method"], "seconds": C.fmt(r["seconds_median"]),
                                     "gradient error": C.fmt(r["gradient_error"]), "cosine": C.fmt(r["cosine"], 8)}
                                    for r in e2e["rows"]], ["method", "seconds", "gradient error", "cosine"]), ""]
    return out


def _forward_tables(data: dict) -> list[str]:
    from fpgrad.report import markdown_table
    out = []
    for entry in data["results"]["maps"]:
        out += [f"#### {entry['label']}: n = {entry['n']}, batch {entry['batch']}, rho(J) = {entry['rho']:.4f}, "
                f"tol {data['results']['tol']:g}", "",
                markdown_table([{**r, "residual": C.fmt(r["residual"]), "seconds": C.fmt(r["seconds_median"])}
                                for r in entry["rows"]],
                               ["library", "solver", "steps", "residual", "converged", "seconds"]), ""]
    return out


def _silent_table(data: dict) -> list[str]:
    from fpgrad.report import markdown_table
    libs = ("fpgrad", "torchdeq", "torchopt")
    rows = [{"case": r["case"], **{lib: r[lib]["class"] for lib in libs}} for r in data["results"]["rows"]]
    details = [{"case": r["case"], "library": lib, "class": r[lib]["class"],
                "gradient error": C.fmt(r[lib].get("gradient_error")), "what it said or returned": r[lib]["detail"]}
               for r in data["results"]["rows"] for lib in libs if r[lib]["class"] != "n/a"]
    return ["", markdown_table(rows, ["case", *libs]), "", "<details><summary>Details</summary>", "",
            markdown_table(details, ["case", "library", "class", "gradient error", "what it said or returned"]),
            "", "</details>", ""]


def _generic_tables(name: str, data: dict) -> list[str]:
    from fpgrad.report import markdown_table
    res = data["results"]
    if name == "memory":
        out = []
        for entry in res["maps"]:
            cols = ["estimator"] + [f"bytes T={T}" for T in res["T"]] + ["ratio"]
            out += [f"#### {entry['label']}", "",
                    markdown_table([{**r, "ratio": C.fmt(r["ratio"], 4)} for r in entry["rows"]], cols), ""]
        return out
    if name == "spectral_radius":
        out = []
        for case in res["cases"]:
            out += [f"#### {case['case']}: n = {case['n']}, dense rho = {case['dense_rho']:.6f}", "",
                    markdown_table([{**r, "value": C.fmt(r["value"], 6), "rel error": C.fmt(r["rel_error_vs_dense"]),
                                     "seconds": C.fmt(r["seconds_median"])} for r in case["rows"]],
                                   ["library", "method", "value", "rel error", "products", "seconds"]), ""]
        return out
    if name == "solver_overhead":
        return [f"Stand-in VJP: {C.fmt(res['stand_in_vjp_us'])} us; n = {res['n']}, {res['iterations']} iterations.",
                "",
                markdown_table([{**r, "us / iteration": C.fmt(r["us_per_iteration_outside_vjp"]),
                                 "us / product": C.fmt(r["us_per_product_outside_vjp"])} for r in res["rows"]],
                               ["library", "solver", "vjps", "jvps", "us / iteration", "us / product"]), ""]
    if name == "vmap":
        return ["", markdown_table([{**r, "vmap s": C.fmt(r["vmap_seconds"]), "loop s": C.fmt(r["loop_seconds"]),
                                     "speedup": C.fmt(r["speedup"]), "max rel diff": C.fmt(r["max_rel_difference"])}
                                    for r in res["rows"]],
                                   ["map", "batch", "vmap s", "loop s", "speedup", "max rel diff",
                                    "forward_unconverged_samples"]), ""]
    if name == "recipe_overhead":
        return ["", markdown_table([{**r, "plain ms": C.fmt(r["plain_ms"]), "fpgrad ms": C.fmt(r["fpgrad_ms"]),
                                     "ratio": C.fmt(r["ratio"], 4), "CPU-time ratio": C.fmt(r["cpu_ratio"], 4)}
                                    for r in res["rows"]],
                                   ["size", "mode", "plain ms", "fpgrad ms", "ratio", "CPU-time ratio"]), ""]
    if name == "dispatch":
        return ["", markdown_table([{**r, "top kernels": ", ".join(f"{k} {v}" for k, v in
                                                            list(r.get("top_kernels", {}).items())[:4])}
                                    for r in res["rows"]],
                                   ["map", "method", "top_level_ops", "kernel_like_ops", "host_syncs",
                                    "top kernels"]), ""]
    if name == "contraction":
        return _contraction_tables(res)
    return []


def _contraction_tables(res: dict) -> list[str]:
    from fpgrad.report import markdown_table
    out = []
    fro = res.get("frobenius")
    if fro:
        out += [f"#### Frobenius penalty: n = {fro['n']}, batch {fro['batch']}, exact ||J||_F^2 / n = "
                f"{C.fmt(fro['exact'])}", "",
                markdown_table([{**r, "mean": C.fmt(r["mean"]), "std error": C.fmt(r["std_error"]),
                                 "z": C.fmt(r["z_score"], 3)} for r in fro["rows"]],
                               ["method", "mean", "std error", "z", "draws"]), "",
                markdown_table([{"method": k.split(" | ")[0], "part": k.split(" | ")[-1], "seconds": C.fmt(v)}
                                for k, v in fro["step_seconds"].items()], ["method", "part", "seconds"]), ""]
    spec = res.get("spectral")
    if spec:
        sweep = "; ".join(f"{k} warm steps: {C.fmt(v['median_rel_error_after_first'], 3)} "
                          f"({v['products_per_step']} products)" for k, v in spec.get("warm_steps_sweep", {}).items())
        out += [f"#### Spectral penalty along training: n = {spec['n']}, batch {spec['batch']}, {spec['steps']} steps",
                "",
                f"Median relative error of the warm estimate of max rho(J) after the first step: "
                f"{C.fmt(spec['median_rel_error_after_first'], 3)} ({spec['products_per_warm_step']} products a step; "
                f"the first, cold step {spec['products_cold_first_step']}); of ||J||_2: "
                f"{C.fmt(spec['norm_median_rel_error_after_first'], 3)}. {sweep}.", ""]
    mon = res.get("monitor")
    if mon:
        out += [f"#### Monitor: n = {mon['n']}, batch {mon['batch']}", "",
                f"Training step {C.fmt(mon['step_seconds'])} s, one check {C.fmt(mon['monitor_seconds'])} s: "
                f"{C.fmt(mon['fraction_at_default_period'], 3)} of a step at the default period "
                f"(every {mon['every']} steps).", ""]
    return out


def _overhead(found: dict, library: str, solver: str) -> float | None:
    data = found.get("solver_overhead")
    if not data:
        return None
    for r in data["results"]["rows"]:
        if r["library"] == library and r["solver"] == solver:
            return r["us_per_iteration_outside_vjp"]
    return None


def _adjoint_bound(t: dict, found: dict) -> str:
    """What bounds a missed adjoint target, from the stored numbers (adjoint_solve, solver_overhead,
    forward_solve): nothing is recomputed."""
    data = found["adjoint_solve"]
    entry = next((e for e in data["results"]["maps"] if f"{e['label']} (rho" in t["target"]), None)
    if entry is None:
        return ""

    def hits(fpgrad: bool):
        out = []
        for r in entry["solvers"]:
            h = r["targets"].get("1e-06")
            if h is None or not r["exact"] or (r["library"] == "fpgrad") != fpgrad:
                continue
            out.append((r, h))
        return out
    if t["target"].startswith("adjoint products"):
        fp = min(hits(True), key=lambda x: x[1]["vjps"] + x[1]["jvps"])
        peer = min(hits(False), key=lambda x: x[1]["vjps"] + x[1]["jvps"])
        gap = fp[1]["vjps"] + fp[1]["jvps"] - peer[1]["vjps"] - peer[1]["jvps"]
        return (f"{gap} product(s): fpgrad {fp[0]['solver']} builds the same Krylov space as {peer[0]['library']} "
                f"{peer[0]['solver']}; its cycle ends with a true-residual VJP where the residual formed from its "
                "basis cannot decide (rounding of the tolerance's size, or a preconditioner)")
    if t["target"].startswith("adjoint time"):
        fp = min(hits(True), key=lambda x: x[1].get("seconds_median", float("inf")))
        peer = min(hits(False), key=lambda x: x[1].get("seconds_median", float("inf")))
        a, b = _overhead(found, "fpgrad", fp[0]["solver"]), _overhead(found, peer[0]["library"], peer[0]["solver"])
        text = (f"fpgrad {fp[0]['solver']}: {fp[1]['vjps']} VJPs in {C.fmt(fp[1]['seconds_median'])} s; "
                f"{peer[0]['library']} {peer[0]['solver']}: {peer[1]['vjps']} VJPs in "
                f"{C.fmt(peer[1]['seconds_median'])} s")
        if a is not None and b is not None:
            text += (f". Time per iteration outside the VJP (solver_overhead, n=2000 stand-in): fpgrad "
                     f"{C.fmt(a)} us, {peer[0]['library']} {C.fmt(b)} us")
        if fp[1]["vjps"] < peer[1]["vjps"]:
            text += (": the per-sample residual, convergence and divergence tracking and GMRES's "
                     "orthogonalisation cost more than the VJPs GMRES saves on this easy system")
        else:
            text += ": same VJPs, the difference is time outside the VJP (and the load on the machine)"
        return text
    if t["target"].startswith("end-to-end"):
        e2e = entry.get("end_to_end") or {}
        reached = e2e.get("forward") or {}
        if "fpgrad broyden" not in reached or "torchdeq broyden" not in reached:
            return "the forward solve dominates the end-to-end time"
        a, b = reached["fpgrad broyden"], reached["torchdeq broyden"]
        tol = e2e["forward_tol"]
        text = (f"the forward solve dominates: to tol {tol:g} fpgrad's Broyden takes {a['steps']} steps (relative "
                f"residual {C.fmt(a['relative_residual'])}), TorchDEQ's (in its layer and in the TorchOpt run) "
                f"{b['steps']} (relative residual {C.fmt(b['relative_residual'])}"
                + (": it stops within 3x the tolerance after 30 steps of little progress)"
                   if b["relative_residual"] > tol else ")"))
        if "torchopt" in t["target"]:
            text += ("; TorchOpt's Neumann series was given maxiter from the known rho(J) (its default, 10, gives "
                     "a wrong gradient: silent_failures)")
        return text
    return ""


def render(out_dir: Path) -> str:
    from fpgrad.report import markdown_table
    found = {name: C.load(name, out_dir) for name in ORDER}
    lines = ["# fpgrad benchmarks", "",
             "Generated by `python -m benchmarks.targets` from the JSON files beside it (each written by "
             "`python -m benchmarks.NAME`, or `fpgrad bench NAME`; `python -m benchmarks.run_all` runs them all). "
             "Numbers are float64 on one torch thread, medians of interleaved repeats; ratios are measured side by "
             "side in one run. Peers: `pip install 'fpgrad[bench]'` (torchdeq, torchopt).", "",
             "## Targets", ""]
    rows = []
    for name in ORDER:
        data = found[name]
        if data is None:
            rows.append({"benchmark": name, "target": "(not run)", "status": "not measured"})
            continue
        stored = data.get("targets", [])
        if name == "adjoint_solve":       # verdicts re-derived from the stored rows by the benchmark's own rule
            from benchmarks.adjoint_solve import targets_for, tolerances_of
            tol = tolerances_of(data["results"])
            stored = [t for e in data["results"]["maps"]
                      for t in targets_for(f"{e['label']} (rho {e['rho']:.3f})", e["solvers"], e.get("end_to_end"),
                                           tol)]
        for t in stored:
            bound = t.get("bound", "")
            if name == "adjoint_solve" and t["met"] is False and not bound:
                bound = _adjoint_bound(t, found)
            rows.append({"benchmark": name + (" (quick)" if data.get("quick") else ""), "target": t["target"],
                         "status": _met(t["met"]), "value": t["value"], "threshold": t["threshold"],
                         "detail": t.get("detail", ""), "what bounds it": bound})
    lines += [markdown_table(rows, ["benchmark", "target", "status", "value", "threshold", "detail",
                                    "what bounds it"]), ""]
    met = sum(1 for r in rows if r["status"] == "met")
    missed = sum(1 for r in rows if r["status"] == "**missed**")
    lines += [f"{met} met, {missed} missed, {len(rows) - met - missed} not measured.", "", "## Runs", ""]
    lines += [_run_line(name, data) for name, data in found.items() if data is not None]
    for name in ORDER:
        data = found[name]
        if data is None:
            continue
        lines += ["", f"## {name}", "", _description(name), ""]
        if name == "adjoint_solve":
            lines += _adjoint_tables(data)
        elif name == "forward_solve":
            lines += _forward_tables(data)
        elif name == "silent_failures":
            lines += _silent_table(data)
        elif name == "reuse":
            from benchmarks.reuse import markdown
            lines += markdown(data)
        else:
            lines += _generic_tables(name, data)
    section = float32_section(out_dir)
    if section:
        lines += ([""] if lines[-1] != "" else []) + section
    section = gpu_section(out_dir)
    if section:
        lines += ([""] if lines[-1] != "" else []) + section
    return "\n".join(lines).rstrip() + "\n"


def gpu_section(out_dir: Path) -> list[str]:
    """'## GPU': the reading (gpu/NOTES.md) and the end-to-end target lines of the stored GPU check
    (gpu/*.json, written by `python -m benchmarks.gpu` on a CUDA machine); empty when none is stored."""
    folder = out_dir / "gpu"
    path = folder / "end_to_end.json"
    if not path.exists():
        return []
    from benchmarks.gpu import end_to_end_target
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [r for r in data["results"] if "error" not in r and not r.get("skipped_for_time")]
    lines = ["## GPU", "", f"`python -m benchmarks.gpu` on {data['device']} (float32, tolerance "
             f"{data['tolerance']:g}); every table in [gpu/README.md](gpu/README.md).", "", end_to_end_target(rows), ""]
    notes = folder / "NOTES.md"
    if notes.exists():
        lines += ["#" + line if line.startswith("## ") else line
                  for line in notes.read_text(encoding="utf-8").rstrip().splitlines()]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fpgrad bench targets", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(C.REPORTS), help="folder of the JSON files (default reports/benchmarks)")
    args = p.parse_args(argv)
    from fpgrad.report import atomic_write_text
    out_dir = Path(args.dir)
    text = render(out_dir)
    path = atomic_write_text(out_dir / "README.md", text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
