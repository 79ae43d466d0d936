"""A tiny deterministic study for testing the runner (not registered in studies/)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from fpgrad.study import Study

CALLS_FILE = os.environ.get("FPGRAD_TOY_CALLS")


def grid(quick: bool):
    return [{"a": a, "b": b} for a in range(3) for b in range(2 if quick else 3)]


def run(config):
    if CALLS_FILE:
        with open(CALLS_FILE, "a") as f:
            f.write(json.dumps(config, sort_keys=True) + "\n")
    _fault_hooks(config)
    time.sleep(float(os.environ.get("FPGRAD_TOY_SLEEP", "0")))
    return {"value": config["a"] * 10 + config["b"] + config["seed"]}


def _fault_hooks(config):
    """Faults for the executor tests, set through the environment (read at call time, so a Ray task's runtime_env
    reaches them): FPGRAD_TOY_RAISE="a,b" raises ValueError in that configuration; FPGRAD_TOY_KILL_ONCE=<marker
    file> SIGKILLs the process running a=1, b=1 the first time (the marker records that it happened)."""
    fail = os.environ.get("FPGRAD_TOY_RAISE")
    if fail and [int(v) for v in fail.split(",")] == [config["a"], config["b"]]:
        raise ValueError(f"toy study asked to fail at a={config['a']}, b={config['b']}")
    marker = os.environ.get("FPGRAD_TOY_KILL_ONCE")
    if marker and (config["a"], config["b"]) == (1, 1) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def finalize(rows, out_dir: Path, meta):
    (Path(out_dir) / "summary.json").write_text(json.dumps({"n": len(rows), "meta": meta["study"]}))


STUDY = Study("toy", "a toy study", grid, run, finalize, module=__name__)
