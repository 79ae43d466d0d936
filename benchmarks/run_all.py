"""Run every benchmark in turn (each writes reports/benchmarks/NAME.json), then regenerate the README.

--dtype float32 runs only the benchmarks that take --dtype (benchmarks.targets.FLOAT32), in float32, writing
reports/benchmarks/float32/NAME.json; the README's "float32 beside float64" section pairs them with float64's.

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--dtype float32]      (or: fpgrad bench run-all)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks import _common as C

BENCHMARKS = ("adjoint_solve", "solver_overhead", "forward_solve", "memory", "spectral_radius", "silent_failures",
              "vmap", "reuse", "contraction", "recipe_overhead", "dispatch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fpgrad bench run-all", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every benchmark's --quick mode (a smoke run)")
    p.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    p.add_argument("--dtype", choices=tuple(C.DTYPES), default="float64",
                   help="float32: only the benchmarks that take --dtype, in float32")
    args = p.parse_args(argv)
    from benchmarks.targets import FLOAT32
    names = args.only or BENCHMARKS
    extra = []
    if args.dtype != "float64":
        names = [n for n in names if n in FLOAT32]
        extra = ["--dtype", args.dtype]
    status = 0
    for name in names:
        print(f"== {name} (load average {C.load_average()})", flush=True)
        t0 = time.perf_counter()
        code = importlib.import_module(f"benchmarks.{name}").main((["--quick"] if args.quick else []) + extra)
        print(f"== {name}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
        status = status or int(code or 0)
    importlib.import_module("benchmarks.targets").main([])
    return status


if __name__ == "__main__":
    sys.exit(main())
