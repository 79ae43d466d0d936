"""Contraction control in the training study's slot attention autoencoder: exact-implicit training without and
with the spectral penalty.

The setting is the training study's base run (fpgrad.setting: 32x32 scenes, 4 slots of 64, batch 16, Adam lr 2e-3,
no clipping, no warm-up, 3 slot attention iterations) with its exact-implicit estimator (GMRES to 1e-4, 60 steps;
studies.training.run.exact_estimator). The penalty arm adds, in one line,

    loss = out.loss(images) + weight * spectral_penalty(model, state=state, target=target)

(rho(J) at the slots the backward linearises at, 2 warm power steps a step from the state's vectors). Every step
a row: task loss, penalty, the penalty's estimate, gradient norm and its ratio to the running median of the previous
100 steps (a spike: ratio > 10; also counted at the training study's 5), the adjoint solve. Every `--probe-every`
steps also rho(J) at z_T and at the fixed point z* (Anderson, float64) on the training study's 4 probe scenes
(studies.training.run.spectral_probe). Rows go to reports/contraction/slot_attention/<arm>/rows.jsonl (one fsync'd
append each); a checkpoint (model, optimiser, generators, spectral state, history) every `--ckpt-every` steps,
atomically: a rerun of the same command resumes from it (rows past the checkpoint are dropped and redone).

    python -m studies.contraction_slot_attention --arm penalty [--steps 1000] [--weight 1] [--target 0.8]
    python -m studies.contraction_slot_attention --arm none
    python -m studies.contraction_slot_attention --table        # reports/contraction/README.md's table
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

OUT = Path("reports/contraction/slot_attention")
SPIKE_WINDOW = 100        # the running median is over the previous 100 steps
SPIKE_MIN_HISTORY = 20    # and is trusted after 20 steps (as the training study)
SPIKE_RATIO = 10.0        # the spike: gradient norm > 10x the running median
STUDY_SPIKE_RATIO = 5.0   # the training study's (studies/training/run.py SPIKE_FACTOR)
ARMS = ("none", "penalty")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    from fpgrad.setting import BASE_RUN, autoencoder_settings
    cfg = {**autoencoder_settings(args.quick), **BASE_RUN, "seed": args.seed, "estimator": "implicit",
           "ablation": "base"}
    cfg.update(arm=args.arm, steps=args.steps, weight=args.weight if args.arm == "penalty" else 0.0,
               target=args.target, probe_every=args.probe_every, ckpt_every=args.ckpt_every,
               power_iters=args.power_iters)
    if args.squared:          # (only when set: runs stored before the option existed resume unchanged)
        cfg["squared"] = True
    if args.smooth:
        cfg["smooth"] = args.smooth
    return cfg


def _rng_state(g: torch.Generator) -> torch.Tensor:
    return g.get_state()


def save_checkpoint(path: Path, step: int, model, optimiser, gens: dict, state, history: list[float],
                    config: dict) -> None:
    from fpgrad._io import atomic_write_bytes
    buffer = io.BytesIO()
    torch.save({"step": step, "config": config, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                "generators": {k: _rng_state(g) for k, g in gens.items()},
                "spectral": {"right": state.right, "left": state.left, "kind": state.kind, "form": state.form,
                             "calls": state.calls, "generator": state.generator.get_state()},
                "history": history}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _rewrite_rows(path: Path, rows: list[dict]) -> None:
    from fpgrad._io import atomic_write_text
    atomic_write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def train(args: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from fpgrad.contraction import SpectralState, append_jsonl, read_jsonl, spectral_penalty
    from fpgrad.errors import ConvergenceWarning, FPGradError
    from fpgrad.setting import build_autoencoder, scenes
    from studies.training.run import TEST_SEED, exact_estimator, grad_norm, learning_rate, spectral_probe

    config = config_of(args)
    out = Path(args.out) / args.arm
    out.mkdir(parents=True, exist_ok=True)
    rows_path, ckpt_path = out / "rows.jsonl", out / "ckpt.pt"
    torch.manual_seed(config["seed"])
    data = scenes(config)
    model = build_autoencoder(config, exact_estimator(config))
    optimiser = torch.optim.Adam(model.parameters(), lr=config["lr"])
    gens = {"data": torch.Generator().manual_seed(1000 * config["seed"] + 1),
            "noise": torch.Generator().manual_seed(1000 * config["seed"] + 2)}
    state = SpectralState(generator=torch.Generator().manual_seed(1000 * config["seed"] + 3))
    probe_images = data.sample(config["test_scenes"], torch.Generator().manual_seed(TEST_SEED)).images[
        :config["spectral_batch"]]
    history: list[float] = []
    start = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        old = {k: v for k, v in ckpt["config"].items() if k != "steps"}
        new = {k: v for k, v in config.items() if k != "steps"}
        if old != new:
            raise SystemExit(f"{ckpt_path} was written with another configuration: {old} != {new}; "
                             "use another --out or delete it")
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        for k, g in gens.items():
            g.set_state(ckpt["generators"][k])
        sp = ckpt["spectral"]
        state.right, state.left, state.kind, state.form, state.calls = (sp["right"], sp["left"], sp["kind"],
                                                                        sp["form"], sp["calls"])
        state.generator.set_state(sp["generator"])
        history, start = list(ckpt["history"]), int(ckpt["step"])
        if rows_path.exists():      # rows past the checkpoint are redone
            _rewrite_rows(rows_path, [r for r in read_jsonl(rows_path) if r["step"] < start])
    elif rows_path.exists() and read_jsonl(rows_path):
        if not args.restart:
            raise SystemExit(f"{rows_path} has rows but {ckpt_path} is missing, so the run cannot resume; pass "
                             "--restart to start it again from step 0 (the rows are replaced), or another --out")
        rows_path.unlink()
    append_jsonl(out / "runs.jsonl", {"event": "start", "at": time.time(), "from_step": start, "config": config})
    bar = tqdm(range(start, config["steps"]), initial=start, total=config["steps"], desc=f"arm {args.arm}",
               mininterval=10)
    for step in bar:
        t0 = time.perf_counter()
        images = data.sample(config["batch"], gens["data"]).images
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config, step)
        row: dict[str, Any] = {"step": step}
        with warnings.catch_warnings():     # the adjoint's convergence is read from the record below
            warnings.simplefilter("ignore", ConvergenceWarning)
            try:
                output = model(images, generator=gens["noise"])
                loss = output.loss(images)
                total = loss
                if config["weight"] > 0:
                    pen = spectral_penalty(model, state=state, target=config["target"], iters=config["power_iters"],
                                           squared=config.get("squared", False), smooth=config.get("smooth", 0.0))
                    total = loss + config["weight"] * pen
                    row.update(penalty=float(pen.detach()), rho_est_max=float(state.last.max()),
                               rho_est_mean=float(state.last.mean()))
                optimiser.zero_grad(set_to_none=True)
                total.backward()
            except FPGradError as e:        # e.g. a diverged adjoint solve: skip the step, record it
                optimiser.zero_grad(set_to_none=True)
                row.update(failed=f"{type(e).__name__}: {e}"[:300])
                append_jsonl(rows_path, row)
                continue
        norm = grad_norm(model)
        window = history[-SPIKE_WINDOW:]
        ratio = norm / statistics.median(window) if len(window) >= SPIKE_MIN_HISTORY else math.nan
        history.append(norm)
        solves = output.record.solves
        row.update(loss=float(loss.detach()), grad_norm=norm, ratio=ratio,
                   spike=bool(ratio > SPIKE_RATIO), spike5=bool(ratio > STUDY_SPIKE_RATIO),
                   adjoint_converged=float(solves[-1].converged.float().mean()) if solves else math.nan,
                   adjoint_matvecs=int(solves[-1].matvecs) if solves else 0)
        if not (math.isfinite(norm) and math.isfinite(row["loss"])):
            row["diverged"] = True
            append_jsonl(rows_path, row)
            break
        optimiser.step()
        row["seconds"] = time.perf_counter() - t0
        if step % config["probe_every"] == 0 or step == config["steps"] - 1:
            t1 = time.perf_counter()
            row.update(spectral_probe(model, probe_images, config))
            row["probe_seconds"] = time.perf_counter() - t1
            bar.set_postfix(loss=f"{row['loss']:.4f}", rho_star=f"{row['rho_star_max']:.3f}")
        append_jsonl(rows_path, row)
        if (step + 1) % config["ckpt_every"] == 0 or step == config["steps"] - 1:
            save_checkpoint(ckpt_path, step + 1, model, optimiser, gens, state, history, config)
    append_jsonl(out / "runs.jsonl", {"event": "stop", "at": time.time()})
    return rows_path


def summary(rows: list[dict]) -> dict[str, Any]:
    """Per arm: steps done, max rho at z* / z_T over the logged steps, spikes, final loss (mean of the last 50)."""
    done = [r for r in rows if "loss" in r]
    probes = [r for r in done if "rho_star_max" in r]
    rho_star = [r["rho_star_max"] for r in probes if isinstance(r["rho_star_max"], float)]
    over = [r["step"] for r in probes if not (isinstance(r["rho_star_max"], float) and r["rho_star_max"] < 1)]
    last = [r["loss"] for r in done[-50:]]
    return {"steps": len(done), "probes": len(probes), "max_rho_star": max(rho_star, default=math.nan),
            "final_rho_star": probes[-1]["rho_star_max"] if probes else math.nan,
            "max_rho_T": max((r["rho_T_max"] for r in probes), default=math.nan),
            "probes_rho_star_ge_1": len(over), "first_rho_star_ge_1": over[0] if over else None,
            "spikes": sum(r.get("spike", False) for r in done), "spikes5": sum(r.get("spike5", False) for r in done),
            "max_ratio": max((r["ratio"] for r in done if isinstance(r.get("ratio"), float)
                              and math.isfinite(r["ratio"])), default=math.nan),
            "failed": sum("failed" in r for r in rows),
            "adjoint_unconverged": sum(r.get("adjoint_converged", 1.0) < 1.0 for r in done),
            "final_loss": statistics.fmean(last) if last else math.nan,
            "step_seconds": statistics.median([r["seconds"] for r in done]) if done else math.nan}


def _row(arm: str, s: dict[str, Any]) -> str:
    return (f"| {arm} | {s['steps']} | {s['probes']} | {s['max_rho_star']:.3f} | "
            f"{s['probes_rho_star_ge_1']} (first at {s['first_rho_star_ge_1']}) | {s['max_rho_T']:.3f} | "
            f"{s['spikes']} | {s['spikes5']} | {s['max_ratio']:.1f} | {s['final_loss']:.4f} | "
            f"{s['adjoint_unconverged']} | {s['step_seconds']:.2f} |")


def variants(out: Path) -> list[Path]:
    """The arm runs of the variants stored beside `out` (folders `variant_*/<arm>/`), in name order."""
    return sorted(d / arm for d in out.parent.glob("variant_*") for arm in ARMS if (d / arm / "rows.jsonl").exists())


def variant_label(run: Path) -> str:
    """A variant arm run's settings as its stored configuration says (the last start event of its runs.jsonl)."""
    from fpgrad.contraction import read_jsonl
    starts = [r for r in read_jsonl(run / "runs.jsonl") if r.get("event") == "start"] \
        if (run / "runs.jsonl").exists() else []
    if not starts:
        return f"{run.parent.name}/{run.name}"
    c = starts[-1]["config"]
    if c["arm"] == "none":
        return f"none, seed {c['seed']} (`{run.parent.name}/`)"
    shape = " squared" if c.get("squared") else (f" Huber {c['smooth']:g}" if c.get("smooth") else "")
    return (f"penalty{shape}, weight {c['weight']:g}, target {c['target']:g}, "
            f"{c['power_iters']} power steps, seed {c['seed']} (`{run.parent.name}/`)")


def table(out: Path) -> str:
    """Per arm over all its steps (then the variant runs stored beside `out`), then (when both arms exist) over
    the steps both have done."""
    from fpgrad.contraction import read_jsonl
    head = ["| arm | steps | rho(J) at z* logged | max rho(J) at z* | logged steps rho >= 1 | max rho(J) at z_T | "
            "spikes (>10x) | spikes (>5x) | max ratio | final loss (last 50) | adjoint capped | s / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {arm: read_jsonl(out / arm / "rows.jsonl") for arm in ARMS if (out / arm / "rows.jsonl").exists()}
    lines = head + [_row(arm, summary(rows)) for arm, rows in runs.items()]
    lines += [_row(variant_label(v), summary(read_jsonl(v / "rows.jsonl"))) for v in variants(out)]
    lasts = [max((r["step"] for r in rows), default=-1) + 1 for rows in runs.values()]
    if len(runs) == 2 and min(lasts) < max(lasts):
        common = min(lasts)
        lines += ["", f"Over the first {common} steps (done by both arms):", ""] + head
        lines += [_row(arm, summary([r for r in rows if r["step"] < common])) for arm, rows in runs.items()]
    return "\n".join(lines)


def rho_trace(out: Path) -> str:
    """rho(J) at z* (max over the 4 probe scenes) at every logged step, per arm, as a table."""
    from fpgrad.contraction import read_jsonl
    traces = {arm: {r["step"]: r["rho_star_max"] for r in read_jsonl(out / arm / "rows.jsonl") if "rho_star_max" in r}
              for arm in ARMS if (out / arm / "rows.jsonl").exists()}
    steps = sorted(set().union(*[set(t) for t in traces.values()])) if traces else []
    lines = ["| step | " + " | ".join(traces) + " |", "|---" * (len(traces) + 1) + "|"]
    for st in steps:
        cells = [f"{t[st]:.3f}" if isinstance(t.get(st), float) else str(t.get(st, "")) for t in traces.values()]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


REPORT = """# Contraction control in the slot attention autoencoder

The training study's base setting (fpgrad.setting: 32x32 scenes with 2-3 objects, 4 slots of 64, batch 16, Adam
lr 2e-3, no clipping, no warm-up, 3 slot attention iterations), trained with the exact-implicit estimator (GMRES to
1e-4, at most 60 steps), seed 0, without and with the spectral penalty added in one line:

    loss = out.loss(images) + 1.0 * spectral_penalty(model, state=state, target=0.8)

(rho(J) at the slots the backward linearises at, z_T; 2 warm power steps a training step). rho(J) at z* is the
training study's probe (studies.training.run.spectral_probe: Anderson to 1e-6 in float64 from z_T, then the power
method, max over its 4 probe scenes), taken every 20 steps after the step's update. A spike: a step whose gradient
norm (task + penalty) exceeds 10x the median of the previous 100 steps (also counted at the training study's 5x).
"adjoint capped": steps whose adjoint GMRES stopped at its cap short of 1e-4. One thread per run, nice 19, on a
shared 2-core machine (the seconds a step are wall time under that load).

{status}

## Per arm

{table}

## rho(J) at z* along training (max over the probe scenes)

{trace}

{findings}
## Reproduce / resume

    python -m studies.contraction_slot_attention --arm none
    python -m studies.contraction_slot_attention --arm penalty
    python -m studies.contraction_slot_attention --arm penalty --weight 0.2 --target 0.7 --power-iters 4 \\
        --out reports/contraction/variant_w0.2_t0.7_p4            # a variant: a row of the table above
    python -m studies.contraction_slot_attention --report      # this file (the findings: FINDINGS.md beside it)

A rerun resumes from the arm's checkpoint (reports/contraction/slot_attention/<arm>/ckpt.pt, every 20 steps);
rows past it are redone.
"""


def report(out: Path, target_steps: int = 1000) -> str:
    """reports/contraction/README.md's text: the tables, with where each arm stands."""
    from fpgrad.contraction import read_jsonl
    done = {arm: sum("loss" in r for r in read_jsonl(out / arm / "rows.jsonl"))
            for arm in ARMS if (out / arm / "rows.jsonl").exists()}
    status = "Status: " + "; ".join(f"{arm} {n} of {target_steps} steps" for arm, n in done.items())
    if any(n < target_steps for n in done.values()):
        status += " (unfinished: the commands below resume them)"
    findings = out.parent / "FINDINGS.md"
    text = findings.read_text(encoding="utf-8").rstrip() + "\n" if findings.exists() else ""
    return REPORT.format(status=status + ".", table=table(out), trace=rho_trace(out), findings=text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=ARMS, default="penalty")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--weight", type=float, default=1.0, help="penalty weight (arm penalty)")
    p.add_argument("--target", type=float, default=0.8, help="the penalty's target for rho(J)")
    p.add_argument("--power-iters", type=int, default=2, help="warm power steps a training step")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="Huber width d of the hinge: quadratic below an excess of d, linear (gradient bounded by the "
                        "weight) beyond")
    p.add_argument("--squared", action="store_true",
                   help="squared hinge max(0, rho - target)^2: its gradient grows from zero as rho crosses the "
                        "target, where the plain hinge's jumps to the full weight (the spikes at switch-on)")
    p.add_argument("--probe-every", type=int, default=20, help="steps between rho(J) at z* probes")
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the setting's smoke-test size (seconds, not a result)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--restart", action="store_true", help="start from step 0 when rows exist without a checkpoint")
    p.add_argument("--report", action="store_true", help="write reports/contraction/README.md (next to --out)")
    p.add_argument("--table", action="store_true", help="print the tables of the runs in --out and exit")
    args = p.parse_args(argv)
    if args.report:
        from fpgrad._io import atomic_write_text
        path = Path(args.out).parent / "README.md"
        atomic_write_text(path, report(Path(args.out), args.steps))
        print(f"wrote {path}")
        return 0
    if args.table:
        print(table(Path(args.out)))
        print()
        print(rho_trace(Path(args.out)))
        return 0
    torch.set_num_threads(1)
    train(args)
    print(table(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
