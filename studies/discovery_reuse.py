"""Adjoint reuse in the discovery study: which of fpgrad's reuse options pays for the exact implicit arm.

(A study instrument rather than a benchmark: it reruns a stored run of studies/discovery.py, which benchmarks/
do not import; no speed target, VJP counts per option.)

The implicit arms of `studies/discovery.py` differentiate slot attention at a z* solved by Anderson to 1e-4,
by unrestarted GMRES to 1e-4 (at most 100 VJPs). Issue #20 asks for "the reuse options where they pay". This
benchmark loads a stored run of such an arm (its checkpoint: the trained model at that step), and runs the same
training steps (fresh batches, same slot noise, forward + backward, no optimiser step) once per backward:

- gmres: the arm's own (no reuse);
- precondition=forward: GMRES right-preconditioned by Anderson's multisecant inverse estimate (SHINE);
- initial_guess=forward: that estimate applied to dL/dz* as GMRES's starting vector;
- gcrodr recycle: GCRO-DR (restart 100, k 10) with a RecycleSpace carried from step to step (shared across
  samples: each step's batch is new);
- warm start: the previous step's adjoint as the guess (a WarmStart without sample keys: batches are new, so
  this measures a guess from other scenes).

Per backward: VJPs per step (median and total), the steps whose adjoint stopped short of 1e-4, seconds per step,
and the cosine and relative error of the slot attention gradient to the no-reuse one (each option solves the
same systems to the same tolerance, so the gradients agree to about that tolerance). A reuse option "pays" when
it needs fewer VJPs than plain GMRES at the same tolerance without losing steps to the cap.

    python -m studies.discovery_reuse [--run reports/discovery/arms/plain-fullres-k6-implicit-penalty]
                                      [--steps 8] [--quick] [--out reports/discovery/arms/reuse.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from fpgrad._io import write_json
from fpgrad.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "discovery" / "arms" / "reuse.json"
DEFAULT_RUN = ROOT / "reports" / "discovery" / "arms" / "plain-fullres-k6-implicit-penalty"


def backwards(config: dict) -> dict:
    """name -> a function returning a fresh Implicit backward (each holds its own reuse state)."""
    from fpgrad.estimators import Implicit, WarmStart
    from fpgrad.linsolve import GCRODR, GMRES, RecycleSpace
    tol, cap = config["backward_tol"], int(config["backward_max_iter"])
    return {
        "gmres": lambda: Implicit(solver=GMRES(restart=cap), tol=tol, max_iter=cap),
        "precondition=forward": lambda: Implicit(solver=GMRES(restart=cap), tol=tol, max_iter=cap,
                                                 precondition="forward"),
        "initial_guess=forward": lambda: Implicit(solver=GMRES(restart=cap), tol=tol, max_iter=cap,
                                                  initial_guess="forward"),
        "gcrodr recycle": lambda: Implicit(solver=GCRODR(restart=cap, k=10), tol=tol, max_iter=cap,
                                           recycle=RecycleSpace(10, shared=True)),
        "warm start": lambda: Implicit(solver=GMRES(restart=cap), tol=tol, max_iter=cap, warm_start=WarmStart()),
    }


def measure(run_dir: Path, steps: int, seed: int, quick: bool) -> dict:
    from studies import discovery
    if quick:
        config = discovery.config_of("", quick=True, arm="implicit-penalty")
        state = None
    else:
        config = {**discovery.DEFAULTS, **json.loads((run_dir / "config.json").read_text())}
        state = torch.load(run_dir / "ckpt.pt", weights_only=False)
    data = discovery.dataset(config)
    results, reference = {}, None
    for name, make in backwards(config).items():
        model = discovery.build_model(config)
        if state is not None:
            model.load_state_dict(state["model"])
        model.slot_attention.backward_spec = make()
        data_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        vjps, short, seconds, grads = [], 0, [], []
        for _ in range(steps):
            images = data.sample(config["batch"], data_gen).images
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # the cap is counted below, not printed per step
                out = model(images, generator=noise_gen)
                out.loss(images).backward()
            seconds.append(time.perf_counter() - t0)
            vjps.append(int(out.record.vjps))
            short += any(not bool(s.converged.all()) for s in out.record.solves)
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.slot_attention.parameters()
                                    if p.grad is not None]).double())
        g = torch.cat(grads)
        if reference is None:
            reference = g
        cosine = float(torch.nn.functional.cosine_similarity(g, reference, dim=0))
        rel = float((g - reference).norm() / reference.norm().clamp_min(1e-300))
        results[name] = {"vjps_median": statistics.median(vjps), "vjps_total": sum(vjps), "vjps": vjps,
                         "capped_steps": short, "seconds_median": statistics.median(seconds),
                         "cosine_to_gmres": cosine, "rel_error_to_gmres": rel}
    where = run_dir.resolve()
    label = "quick (a fresh quick-sized model)" if quick else (
        str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where))
    return {"run": label,
            "step": None if state is None else state["step"], "steps": steps,
            "tol": config["backward_tol"], "cap": config["backward_max_iter"], "backwards": results}


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.discovery_reuse", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="a run directory of an implicit arm (config.json, "
                   "ckpt.pt)")
    p.add_argument("--steps", type=int, default=None, help="training steps measured per backward (default 8; 2 "
                   "with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and slot noise")
    p.add_argument("--quick", action="store_true", help="a fresh quick-sized model, 2 steps (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or (OUT if not args.quick else OUT.with_name("reuse_quick.json"))
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    started = time.perf_counter()
    result = measure(args.run, steps, args.seed, args.quick)
    plain = result["backwards"]["gmres"]
    rows = [{"backward": name, "VJPs / step (median)": r["vjps_median"], "VJPs (total)": r["vjps_total"],
             "vs gmres": _fmt(r["vjps_total"] / max(plain["vjps_total"], 1)), "capped steps": r["capped_steps"],
             "s / step": _fmt(r["seconds_median"]), "cosine to gmres": _fmt(r["cosine_to_gmres"], 6),
             "rel. error": _fmt(r["rel_error_to_gmres"])}
            for name, r in result["backwards"].items()]
    print(f"Adjoint reuse on {result['run']} at step {result['step']}: {steps} training steps each, GMRES to "
          f"{result['tol']:g} (cap {result['cap']})\n")
    print(markdown_table(rows, list(rows[0])))
    best = min((r["vjps_total"], name) for name, r in result["backwards"].items()
               if name != "gmres" and r["capped_steps"] <= plain["capped_steps"])
    result["pays"] = {name: r["vjps_total"] < plain["vjps_total"] and r["capped_steps"] <= plain["capped_steps"]
                      for name, r in result["backwards"].items() if name != "gmres"}
    result["best"] = best[1]
    write_json(out, {"study": "discovery_reuse", "command": "python -m studies.discovery_reuse " + " ".join(
        sys.argv[1:] if argv is None else argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
        "results": result})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
