"""Recipe overhead: fpgrad.nn.ImplicitSlotAttention against the same slot attention written as a plain loop.

The seed paper's recipe (Chang et al. 2022) is one line in a plain loop: iterate without the tape, then one step
on the tape from the detached slots; unrolled training backprops through every iteration. Both are timed here
as a training step (forward, loss, backward) against `ImplicitSlotAttention(backward="one_step")` and
`(backward="unrolled")`, which share the plain loops' parameters (the loops call the module's own tensors through
the same step function, fpgrad.maps.slot_attention_step) and initial-slot noise. Before timing, the slots and
every parameter gradient are checked equal (torch.testing.assert_close, float32 tolerances). Float32, one thread,
interleaved medians; ratio = fpgrad / plain in wall time (target <= 1.05), beside the same ratio in the thread's
CPU time (steadier on a shared machine).

    python -m benchmarks.recipe_overhead [--quick] [--iters 3] [--profile]
"""

from __future__ import annotations

import cProfile
import datetime as _dt
import io
import json
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from benchmarks import _common as C
from fpgrad._io import jsonable

SIZES = ((16, 256, 64, 5), (64, 64, 32, 4), (4, 1024, 128, 7))      # (B, N, D, K)
QUICK_SIZES = ((4, 16, 8, 3), (2, 32, 16, 4))
DTYPE = torch.float32
RATIO_LIMIT = 1.05
MODES = ("one_step", "unrolled")


@dataclass
class Case:
    """One size: the fpgrad modules (one per mode, the same parameters), inputs, initial-slot noise, loss weights."""

    B: int
    N: int
    D: int
    K: int
    iters: int
    modules: dict
    inputs: Tensor
    noise: Tensor
    weights: Tensor

    @property
    def label(self) -> str:
        return f"B={self.B} N={self.N} D={self.D} K={self.K}"


def make_case(B: int, N: int, D: int, K: int, iters: int, seed: int) -> Case:
    from fpgrad.nn import ImplicitSlotAttention
    first = ImplicitSlotAttention(D, K, iters=iters, backward=MODES[0], seed=seed).to(DTYPE)
    modules = {MODES[0]: first}
    for mode in MODES[1:]:
        other = ImplicitSlotAttention(D, K, iters=iters, backward=mode).to(DTYPE)
        other.load_state_dict(first.state_dict())
        modules[mode] = other
    g = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(B, N, D, generator=g, dtype=DTYPE)
    noise = torch.randn(B, K, D, generator=g, dtype=DTYPE)
    weights = torch.randn(B, K, D, generator=g, dtype=DTYPE)
    return Case(B, N, D, K, iters, modules, inputs, noise, weights)


def plain_slots(module, inputs: Tensor, noise: Tensor, mode: str) -> Tensor:
    """The hand-written loop a user would write, with the module's own parameter tensors.

    one_step: iters - 1 steps without the tape, then one step on the tape from the detached slots;
    unrolled: iters steps on the tape.
    """
    from fpgrad.maps import slot_attention_step
    params = dict(module.named_parameters())
    eps = module.eps
    slots = params["slots_mu"] + params["slots_log_sigma"].exp() * noise
    if mode == "one_step":
        with torch.no_grad():
            for _ in range(module.iters - 1):
                slots = slot_attention_step(params, slots, inputs, eps=eps)
        return slot_attention_step(params, slots.detach(), inputs, eps=eps)
    for _ in range(module.iters):
        slots = slot_attention_step(params, slots, inputs, eps=eps)
    return slots


def training_step(case: Case, mode: str, plain: bool) -> Callable[[], tuple[Tensor, tuple]]:
    """A closure: slots, then the loss <slots, weights> differentiated to every parameter (None where unused)."""
    module = case.modules[mode]
    params = list(module.parameters())

    def run():
        slots = plain_slots(module, case.inputs, case.noise, mode) if plain else module(case.inputs, noise=case.noise)
        grads = torch.autograd.grad((slots * case.weights).sum(), params, allow_unused=True)
        return slots, grads
    return run


def check_identical(case: Case, mode: str) -> dict:
    """Slots and gradients of fpgrad and the plain loop agree (float32 tolerances); the largest differences."""
    names = [k for k, _ in case.modules[mode].named_parameters()]
    slots_f, grads_f = training_step(case, mode, plain=False)()
    slots_p, grads_p = training_step(case, mode, plain=True)()
    torch.testing.assert_close(slots_f, slots_p, msg=lambda m: f"{case.label} {mode}: slots differ: {m}")
    worst = 0.0
    for name, a, b in zip(names, grads_f, grads_p):
        if (a is None) != (b is None):
            raise AssertionError(f"{case.label} {mode}: gradient of {name} is None in only one of fpgrad "
                                 f"({a is None}) and the plain loop ({b is None})")
        if a is not None:
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{case.label} {mode}: grad {n} differs: {m}")
            worst = max(worst, float((a - b).abs().max()))
    return {"slots_max_abs_diff": float((slots_f - slots_p).detach().abs().max()), "grads_max_abs_diff": worst,
            "grads_none": [n for n, a in zip(names, grads_f) if a is None]}


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """fpgrad.study_tools.time_interleaved with two clocks read around every call: wall (time.perf_counter) and
    this thread's CPU time (time.thread_time, which a busy shared machine's other jobs barely move)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    seconds = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            c1, w1 = time.thread_time(), time.perf_counter()
            seconds[name]["wall"].append(w1 - w0)
            seconds[name]["cpu"].append(c1 - c0)
    return seconds


def measure(case: Case, repeats: int) -> list[dict]:
    from fpgrad.study_tools import median
    checks = {mode: check_identical(case, mode) for mode in MODES}
    calls = {}
    for mode in MODES:
        calls[f"plain {mode}"] = training_step(case, mode, plain=True)
        calls[f"fpgrad {mode}"] = training_step(case, mode, plain=False)
    seconds = time_interleaved(calls, repeats=repeats)
    rows = []
    for mode in MODES:
        plain, fp = seconds[f"plain {mode}"], seconds[f"fpgrad {mode}"]
        wall_p, wall_f, cpu_p, cpu_f = (median(plain["wall"]), median(fp["wall"]), median(plain["cpu"]),
                                        median(fp["cpu"]))
        rows.append({"size": case.label, "B": case.B, "N": case.N, "D": case.D, "K": case.K, "iters": case.iters,
                     "mode": mode, "plain_ms": 1e3 * wall_p, "fpgrad_ms": 1e3 * wall_f, "ratio": wall_f / wall_p,
                     "overhead_ms": 1e3 * (wall_f - wall_p), "plain_cpu_ms": 1e3 * cpu_p,
                     "fpgrad_cpu_ms": 1e3 * cpu_f, "cpu_ratio": cpu_f / cpu_p, "plain_samples": plain,
                     "fpgrad_samples": fp, **checks[mode]})
    return rows


def profile(case: Case, mode: str, calls: int = 20, top: int = 25) -> str:
    """cProfile (by own time) and torch.profiler (by CPU self time) of `calls` fpgrad training steps."""
    run = training_step(case, mode, plain=False)
    run()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        for _ in range(calls):
            run()
    text = out.getvalue() + "\n" + tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print(text)
    return text


def save(args, results: dict, targets: list[dict], started: float) -> Path:
    from fpgrad.report import atomic_write_text
    info = C.machine_info(args.threads)
    info["load_average_end"] = C.load_average()
    payload = {"benchmark": "recipe_overhead",
               "command": "python -m benchmarks.recipe_overhead " + " ".join(sys.argv[1:]),
               "quick": bool(args.quick), "seed": args.seed, "dtype": "float32", "threads": args.threads,
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(time.perf_counter() - started, 1), "machine": info, "targets": targets,
               "results": results}
    out = Path(args.out) if args.out else C.REPORTS / "recipe_overhead.json"
    atomic_write_text(out, json.dumps(jsonable(payload), indent=1) + "\n")
    print(f"wrote {out} ({payload['seconds']} s, load average {info['load_average_start']} -> "
          f"{info['load_average_end']})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser("recipe_overhead", __doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=3, help="applications of the step (the module's default 3)")
    p.add_argument("--profile", action="store_true", help="also print cProfile and torch.profiler tables")
    args = p.parse_args(argv)
    started = time.perf_counter()
    C.setup(args.threads)
    reps = C.repeats(args, full=21, quick=3)
    sizes = QUICK_SIZES if args.quick else SIZES
    rows, profiles = [], {}
    for B, N, D, K in sizes:
        case = make_case(B, N, D, K, args.iters, args.seed)
        with torch.random.fork_rng():
            rows += measure(case, reps)
        if args.profile:
            profiles[case.label] = {mode: profile(case, mode) for mode in MODES}
    C.table([{**r, "plain ms": C.fmt(r["plain_ms"]), "fpgrad ms": C.fmt(r["fpgrad_ms"]),
              "ratio": C.fmt(r["ratio"]), "CPU-time ratio": C.fmt(r["cpu_ratio"])} for r in rows],
            ["size", "mode", "plain ms", "fpgrad ms", "ratio", "CPU-time ratio"],
            f"fpgrad / plain loop, training step (forward + backward), float32, {args.threads} thread(s), "
            f"iters={args.iters}, median of {reps}")
    targets = [C.target(f"recipe overhead {r['mode']} {r['size']}", r["ratio"] <= RATIO_LIMIT, r["ratio"],
                        f"<= {RATIO_LIMIT}", f"fpgrad {C.fmt(r['fpgrad_ms'])} ms vs plain {C.fmt(r['plain_ms'])} ms")
               for r in rows]
    save(args, {"iters": args.iters, "repeats": reps, "ratio_limit": RATIO_LIMIT, "rows": rows,
                "profiles": profiles}, targets, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
