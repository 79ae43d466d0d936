"""Run several discovery arms at once within a wall-clock budget, then pack their run folders into one archive.

Made for a lent GPU machine (issue #20): one process per run (`python -m studies.discovery --arm ... --device`),
all started together, stopped at the budget (each keeps its rows and checkpoint up to its last 500-step row and
resumes from there, here or anywhere), and their folders packed into one .tar.gz (a device call returns a few
files: at most --per-archive runs an archive, arms.tar.gz, arms-2.tar.gz, ...). Back on this machine:
`for a in arms*.tar.gz; do tar -xzf $a -C reports/discovery/arms; done`, then
`python -m studies.discovery --arms-readme reports/discovery/arms`.

    python -m studies.discovery_batch --device cuda --budget 480 --archive $OUT/arms.tar.gz \\
        unrolled@1 one-step@1 implicit@1 implicit-penalty@1 neumann-5@1 one-step:no-warmup unrolled:iters7 ...

A run is ARM[:ABLATION][@SEED] (seed 0 when left out) of --config (plain-fullres-k6), trained to --steps (14000).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from studies import discovery

ROOT = Path(__file__).resolve().parents[1]


def parse_run(spec: str) -> tuple[str, str | None, int]:
    """'one-step:no-warmup@2' -> ('one-step', 'no-warmup', 2)."""
    rest, _, seed = spec.partition("@")
    arm, _, ablation = rest.partition(":")
    if arm not in discovery.ARMS:
        raise ValueError(f"discovery_batch: unknown arm {arm!r} in {spec!r}; choose one of {sorted(discovery.ARMS)}")
    if ablation and ablation not in discovery.ABLATIONS:
        raise ValueError(f"discovery_batch: unknown ablation {ablation!r} in {spec!r}; choose one of "
                         f"{sorted(discovery.ABLATIONS)}")
    try:
        return arm, ablation or None, int(seed) if seed else 0
    except ValueError:
        raise ValueError(f"discovery_batch: the seed in {spec!r} is not an integer (ARM[:ABLATION][@SEED])") from None


def run_batch(specs: list[str], *, config: str, steps: int, device: str | None, budget: float, root: Path,
              archive: Path, quick: bool = False, poll: float = 2.0, per_archive: int = 6) -> dict:
    """Start every run, stop what is still running at `budget` seconds, pack the run folders into `archive`;
    returns (and writes beside the archive as .json) each run's state: finished, or the step it reached."""
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in specs:
        arm, ablation, seed = parse_run(spec)
        name = discovery.config_of(config, quick, seed, arm, ablation)["name"]
        command = [sys.executable, "-m", "studies.discovery", "--config", config, "--arm", arm, "--seed", str(seed),
                   "--steps", str(steps), "--out", str(root / name)]
        command += ["--ablation", ablation] if ablation else []
        command += ["--device", device] if device else []
        command += ["--quick"] if quick else []
        log = open(root / f"{name}.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        runs.append({"spec": spec, "name": name, "log": log,
                     "process": subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)})
    start = time.monotonic()
    while any(r["process"].poll() is None for r in runs) and time.monotonic() - start < budget:
        time.sleep(poll)
    for r in runs:
        if r["process"].poll() is None:
            r["process"].send_signal(signal.SIGTERM)
    for r in runs:
        try:
            r["process"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            r["process"].kill()
            r["process"].wait()
        r["log"].close()
    summary = {"config": config, "steps": steps, "device": device or "cpu", "budget_seconds": budget,
               "seconds": round(time.monotonic() - start, 1), "runs": {}}
    archive.parent.mkdir(parents=True, exist_ok=True)
    # a checkpoint is about 2 MB: at most `per_archive` runs an archive (a device call returns files of 16 MiB at
    # most), named ARCHIVE, then ARCHIVE's stem -2, -3, ...
    stem = archive.name.removesuffix(".tar.gz")
    summary["archives"] = []
    for k in range(0, len(runs), per_archive):
        path = archive if k == 0 else archive.with_name(f"{stem}-{k // per_archive + 1}.tar.gz")
        summary["archives"].append(path.name)
        with tarfile.open(path, "w:gz") as tar:
            for r in runs[k:k + per_archive]:
                folder = root / r["name"]
                rows = discovery.read_rows(folder / "rows.jsonl") if (folder / "rows.jsonl").exists() else []
                summary["runs"][r["spec"]] = {"name": r["name"], "returncode": r["process"].returncode,
                                              "last_row_step": rows[-1]["step"] if rows else None,
                                              "finished": bool(rows) and rows[-1]["step"] >= steps,
                                              "archive": path.name}
                if folder.is_dir():
                    tar.add(folder, arcname=r["name"])
                tar.add(root / f"{r['name']}.log", arcname=f"{r['name']}.log")
    archive.with_name(f"{stem}.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.discovery_batch", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="ARM[:ABLATION][@SEED], e.g. one-step@1 unrolled:iters7")
    p.add_argument("--config", default="plain-fullres-k6")
    p.add_argument("--steps", type=int, default=14_000)
    p.add_argument("--device", default=None, help="e.g. cuda (default: the CPU)")
    p.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds before the runs are stopped")
    p.add_argument("--root", type=Path, default=ROOT / "reports" / "discovery" / "arms",
                   help="where the run folders live (resumed when present)")
    p.add_argument("--archive", type=Path, required=True, help="the .tar.gz to write (a .json summary beside it)")
    p.add_argument("--per-archive", type=int, default=6, help="runs packed per archive (a checkpoint is ~2 MB)")
    p.add_argument("--quick", action="store_true", help="the tiny quick configuration (a smoke run)")
    args = p.parse_args(argv)
    try:
        [parse_run(s) for s in args.runs]
    except ValueError as err:
        p.error(str(err))
    summary = run_batch(args.runs, config=args.config, steps=args.steps, device=args.device, budget=args.budget,
                        root=args.root, archive=args.archive, quick=args.quick, per_archive=args.per_archive)
    for spec, r in summary["runs"].items():
        print(f"{spec}: {'finished' if r['finished'] else 'stopped'} at row {r['last_row_step']} "
              f"(returncode {r['returncode']})")
    print(f"wrote {', '.join(summary['archives'])} in {args.archive.parent} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
