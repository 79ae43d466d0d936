"""The `fpgrad` command: `fpgrad report spectral ...`, `fpgrad study NAME ...`, `fpgrad study --list`.

Thin: it parses arguments, builds the map and inputs, and calls the library. Bad arguments exit with
status 2 and a one-line message, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path
from typing import Sequence

DTYPES = {"float64": "float64", "double": "float64", "float32": "float32", "float": "float32"}


class UsageError(Exception):
    """A bad argument: reported as 'fpgrad: error: ...' with exit status 2."""


class RefusedError(Exception):
    """A run that cannot go ahead now (another run holds --out, a store line that is not a row): exit status 1."""


# ---- the output folder ------------------------------------------------------------------------------

def check_out_writable(out: Path) -> None:
    """--out can be created and written: it is a folder or absent, and its nearest existing ancestor is a writable
    folder. Checked before any analysis (a traceback after minutes of work is the thing to avoid)."""
    import os
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    parent = out.resolve().parent if out.name in ("", ".", "..") else out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {parent} (permission denied); choose another --out")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the `.tmp-<name>-*` folders a killed report left beside `out` and put back a `.bak-<name>-*` that a
    kill mid-swap left in place of a missing `out`. Call only while holding the lock on `out`: no live fpgrad run
    writes there, so every such folder older than this run belongs to a dead one. Returns what was removed."""
    import re
    import shutil
    import time
    out = out.absolute()
    if not out.parent.is_dir():
        return []
    now = time.time()
    pattern = re.compile(rf"^\.(tmp|bak)-{re.escape(out.name)}-[A-Za-z0-9_]{{8}}$")
    removed = []
    for entry in sorted(out.parent.iterdir(), key=lambda p: p.name):
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or entry.stat().st_mtime > now:
            continue
        if match.group(1) == "bak" and not out.exists():
            entry.rename(out)                      # killed between moving the old report aside and the new in
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# ---- building the map to analyse ------------------------------------------------------------------

def _torch_setup(args):
    import torch
    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {args.device}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use one of those or --device cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {args.device}: use cpu or cuda[:N]")
    return dtype, device


def build_target(args):
    """(map, x, description) from --map: 'slot-attention', 'tanh', 'module:function' or a checkpoint."""
    import torch

    import fpgrad
    dtype, device = _torch_setup(args)
    g = torch.Generator().manual_seed(args.seed)
    spec = args.map
    if spec == "slot-attention":
        m = fpgrad.maps.slot_attention(dim=args.dim, num_slots=args.slots, seed=args.seed, dtype=dtype,
                                       device=device)
        x = torch.randn(args.batch, args.inputs, args.dim, generator=g, dtype=dtype).to(device)
        desc = (f"slot attention at random init (dim {args.dim}, {args.slots} slots, seed {args.seed}), "
                f"Gaussian inputs [{args.batch}, {args.inputs}, {args.dim}]")
        return m, x, desc
    if spec == "tanh":
        m = fpgrad.maps.tanh_rnn(n=args.dim, spectral_radius=args.radius, seed=args.seed, dtype=dtype, device=device)
        x = torch.randn(args.batch, args.dim, generator=g, dtype=dtype).to(device)
        return m, x, f"tanh map (n {args.dim}, spectral radius of W {args.radius}, seed {args.seed})"
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        if not path.exists():
            raise UsageError(f"--map {spec}: no such checkpoint file")
        try:
            layer = fpgrad.nn.ImplicitSlotAttention.load_checkpoint(path, map_location=device)
        except Exception as e:  # noqa: BLE001 - any load failure is a usage error here
            raise UsageError(f"--map {spec}: could not load an ImplicitSlotAttention checkpoint ({e})") from None
        layer = layer.to(dtype=dtype, device=device)
        m = layer.as_map()
        x = torch.randn(args.batch, args.inputs, layer.input_dim, generator=g, dtype=dtype).to(device)
        return m, x, f"ImplicitSlotAttention checkpoint {path.name}, Gaussian inputs [{args.batch}, {args.inputs}]"
    if ":" in spec:
        module_name, _, func_name = spec.partition(":")
        try:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"--map {spec}: cannot import module {module_name!r} ({e})") from None
        func = getattr(module, func_name, None)
        if not callable(func):
            raise UsageError(f"--map {spec}: {module_name} has no function {func_name!r}")
        out = func()
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], fpgrad.maps.Map)):
            raise UsageError(f"--map {spec}: the function must return (fpgrad.maps.Map, x), got {type(out).__name__}")
        m, x = out
        x = x.to(dtype=dtype if x.is_floating_point() else None, device=device)
        m = m.to(dtype=dtype, device=device)                                # params and buffers
        return m.with_params({k: v.detach() for k, v in m.params.items()}), x, f"user map {spec}"
    raise UsageError(f"--map {spec!r}: use 'slot-attention', 'tanh', 'module:function' or a checkpoint .pt file")


def default_estimators():
    from fpgrad.estimators import Implicit, Neumann, OneStep, Phantom, Truncated, Unrolled
    return [Unrolled(3), Unrolled(10), Unrolled(100), Truncated(3), OneStep(), OneStep(straight_through=True),
            Neumann(1),
            Neumann(5), Neumann(20), Phantom(5, 0.5), Implicit(solver="gmres"), Implicit(solver="bicgstab"),
            Implicit(solver="cg_normal"), Implicit(solver="neumann")]


def cmd_report_spectral(args) -> int:
    from fpgrad.study import OutputLockedError, output_lock
    out = Path(args.out)
    check_out_writable(out)
    m, x, desc = build_target(args)
    lock = out.absolute().parent / f".{out.absolute().name}.fpgrad.lock"
    try:
        with output_lock(lock, f"--out {out}"):
            remove_stale_temporaries(out)
            return _report_spectral(args, out, m, x, desc)
    except OutputLockedError as e:
        raise RefusedError(str(e)) from None


def _report_spectral(args, out: Path, m, x, desc: str) -> int:
    import torch
    from tqdm.auto import tqdm

    import fpgrad
    from fpgrad import compare, spectral
    from fpgrad.report import spectral_report
    steps = ["forward solve", "spectral analysis"] + (["estimator comparison"] if args.gradients else []) + ["report"]
    bar = tqdm(total=len(steps), desc="spectral report", unit="stage", file=sys.stderr, disable=args.quiet)
    forward = fpgrad.forward.get_forward(args.forward, tol=args.tol, max_iter=args.max_iter)
    bar.set_postfix_str(steps[0])
    with torch.no_grad():
        z0 = m.init_state(x, torch.Generator().manual_seed(args.seed))
    sol = fpgrad.solve(m, x, z0=z0, method=forward)
    bar.update(1)
    bar.set_postfix_str(steps[1])
    summary = spectral.analyze(m, x, sol.z, forward=sol, k=args.k, seed=args.seed)
    summary.forward.update(tol=args.tol, max_iter=args.max_iter)
    summary.notes.insert(0, f"Map: {desc}.")
    summary.seed = args.seed
    bar.update(1)
    if args.gradients:
        bar.set_postfix_str(steps[2])
        gen = torch.Generator().manual_seed(args.seed + 1)
        target = torch.randn(sol.z.shape, generator=gen, dtype=sol.z.dtype).to(sol.z.device)

        def loss(z):
            return ((z - target) ** 2).mean()
        rows = compare.compare_estimators(m, x, loss, default_estimators(), forward=forward, generator_seed=args.seed)
        summary.estimators = rows
        summary.notes.append("Estimator comparison: loss = mean((z* - t)^2) with a fixed Gaussian target t; "
                             "reference = Implicit(gmres) at a tight tolerance on the forward solution; every "
                             "estimator starts from the same initial slots, Unrolled(T) runs T plain iterations "
                             "(the usual training regime), the others use the forward solver above.")
        bar.update(1)
    bar.set_postfix_str(steps[-1])
    path = spectral_report(summary, out, title=f"Spectral report: {m.name}")
    bar.update(1)
    bar.close()
    print(f"wrote {path}")
    return 0


def cmd_study(args) -> int:
    import studies
    from fpgrad.study import LocalExecutor, run_study
    if args.list:
        for name, module in studies.available().items():
            study = importlib.import_module(module).STUDY
            print(f"{name:20s} {study.description}")
        return 0
    if not args.name:
        raise UsageError("fpgrad study: name a study (see `fpgrad study --list`)")
    try:
        study = studies.get_study(args.name)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    ray_options = {"--address": args.address, "--cpus-per-task": args.cpus_per_task,
                   "--gpus-per-task": args.gpus_per_task, "--retries": args.retries}
    if args.executor == "ray":
        if args.workers is not None:
            raise UsageError("--workers is for the local executor; with --executor ray the cluster's CPUs and "
                             "--cpus-per-task set how many configurations run at once")
        if args.cpus_per_task is not None and not args.cpus_per_task > 0:
            raise UsageError(f"--cpus-per-task must be positive, got {args.cpus_per_task}")
        if args.gpus_per_task is not None and args.gpus_per_task < 0:
            raise UsageError(f"--gpus-per-task must be >= 0, got {args.gpus_per_task}")
        if args.retries is not None and args.retries < 0:
            raise UsageError(f"--retries must be >= 0, got {args.retries}")
        try:
            from fpgrad.distributed import RayExecutor
            executor = RayExecutor(address=args.address, num_cpus_per_task=_or(args.cpus_per_task, 1),
                                   num_gpus_per_task=_or(args.gpus_per_task, 0), max_retries=_or(args.retries, 2))
        except ImportError as e:
            raise UsageError(f"--executor ray needs the 'distributed' extra: {e}") from None
    else:
        given = [name for name, value in ray_options.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --executor ray")
        if args.workers is not None and args.workers < 1:
            raise UsageError(f"--workers must be a positive integer, got {args.workers}")
        executor = LocalExecutor(workers=_or(args.workers, 1))
    out = Path(args.out) if args.out else Path("reports") / study.name
    command = "fpgrad " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else None
    from fpgrad.study import OutputLockedError, RowStoreError
    try:
        run_study(study, out, quick=args.quick, seed=args.seed, executor=executor, progress=not args.quiet,
                  command=command)
    except (OutputLockedError, RowStoreError) as e:
        raise RefusedError(str(e)) from None
    print(f"wrote {out}")
    return 0


def _or(value, default):
    return default if value is None else value


def cmd_bench(args) -> int:
    module = f"benchmarks.{args.name.replace('-', '_')}"
    try:
        bench = importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"unknown benchmark {args.name!r} ({e})") from None
    return int(bench.main(args.rest) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpgrad", description="Gradients and spectra of maps iterated to a fixed point.")
    sub = p.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("report", help="generate a report")
    rsub = rep.add_subparsers(dest="kind", required=True)
    sp = rsub.add_parser("spectral", help="spectral report of a map at its fixed point (+ estimator comparison)")
    sp.add_argument("--map", default="slot-attention",
                    help="slot-attention (default), tanh, module:function returning (Map, x), or a checkpoint .pt")
    sp.add_argument("--out", default="reports/spectral-slot-attention", help="output folder")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--dtype", default="float64", choices=sorted(DTYPES),
                    help="dtype of the map's parameters, buffers and inputs (default float64: the spectral analysis "
                         "and the gradient reference need its precision; float32 reaches a round-off floor near "
                         "1e-6 that tolerances must respect)")
    sp.add_argument("--dim", type=int, default=64, help="slot dimension (or n for --map tanh)")
    sp.add_argument("--slots", type=int, default=5)
    sp.add_argument("--inputs", type=int, default=64, help="number of input tokens N")
    sp.add_argument("--batch", type=int, default=4)
    sp.add_argument("--radius", type=float, default=0.9, help="spectral radius of W for --map tanh")
    sp.add_argument("--forward", default="anderson", choices=["iterate", "anderson", "broyden"])
    sp.add_argument("--tol", type=float, default=1e-8)
    sp.add_argument("--max-iter", type=int, default=1000)
    sp.add_argument("-k", type=int, default=6, help="eigen/singular values per sample")
    sp.add_argument("--no-gradients", dest="gradients", action="store_false", help="skip the estimator comparison")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_report_spectral)

    st = sub.add_parser("study", help="run a study from studies/ (resumable)")
    st.add_argument("name", nargs="?")
    st.add_argument("--list", action="store_true", help="list the studies")
    st.add_argument("--out", default=None, help="output folder (default reports/NAME)")
    st.add_argument("--quick", action="store_true", help="the small setting used by tests and CI")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--workers", type=int, default=None, help="local worker processes (default 1)")
    st.add_argument("--executor", default="local", choices=["local", "ray"],
                    help="local (default), or ray: one Ray task per configuration")
    st.add_argument("--address", default=None,
                    help="Ray cluster address, e.g. auto (default: RAY_ADDRESS, else a local Ray on this machine)")
    st.add_argument("--cpus-per-task", type=float, default=None,
                    help="CPUs (and torch threads) per configuration with --executor ray (default 1)")
    st.add_argument("--gpus-per-task", type=float, default=None,
                    help="GPUs per configuration with --executor ray (default 0)")
    st.add_argument("--retries", type=int, default=None,
                    help="with --executor ray: times a configuration whose worker process died is rerun (default 2)")
    st.add_argument("--quiet", action="store_true")
    st.set_defaults(func=cmd_study)

    be = sub.add_parser("bench", help="run a benchmark from benchmarks/")
    be.add_argument("name")
    be.add_argument("rest", nargs=argparse.REMAINDER)
    be.set_defaults(func=cmd_bench)
    return p


def _check_numbers(args) -> None:
    for name in ("dim", "slots", "inputs", "batch", "max_iter", "k"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    tol = getattr(args, "tol", None)
    if tol is not None and not tol > 0:
        raise UsageError(f"--tol must be positive, got {tol}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check_numbers(args)
        return args.func(args)
    except UsageError as e:
        print(f"fpgrad: error: {e}", file=sys.stderr)
        return 2
    except RefusedError as e:
        print(f"fpgrad: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fpgrad: interrupted (finished study rows are kept; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
