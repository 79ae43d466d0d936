"""Dispatch: the operations one training step dispatches, counted on the CPU as a GPU would run them.

On a GPU a small map's training step is host-bound: each dispatched operation costs a few microseconds of host
time whatever its size, and the GPU waits. benchmarks/gpu.py measured fpgrad's end-to-end step on the tanh map
(n 4096, batch 64) at 1.98x TorchDEQ's time on an H200, with 14,922 aten operations against 8,795. The GPU is
lent only now and then; this benchmark counts the same quantity on any machine, so that work on the solver loops
can be judged between leases: one training step (forward to 1e-4 by Anderson, backward to 1e-4, loss
1/2 ||z* - t||^2, benchmarks.gpu's end-to-end runs; tanh n 512 and 4096, batch 64, and a small slot attention)
with the solver loops' host checks at their CUDA default period (fpgrad._checks.emulate_cuda_checks), under
torch.profiler:

- top-level aten operations (each one dispatch from Python: the host cost on a GPU),
- kernel-like operations (leaf aten operations that are not views, allocations or scalar reads: the kernels a
  GPU would launch),
- host synchronisations (the calls that would copy a device value to the host),

for fpgrad's Implicit (GMRES) and OneStep and TorchDEQ's implicit layer (Anderson forward and backward). Target
(a proxy for the GPU's end-to-end time target, not a replacement for it): fpgrad Implicit's top-level operations
per step <= TorchDEQ's on the tanh map. Counts, not times: the same on every machine and load.

    python -m benchmarks.dispatch [--quick]      (or: fpgrad bench dispatch)
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Callable

import torch

from benchmarks import _common as C

# leaf aten operations that launch no kernel on a GPU: views, allocations without a fill, scalar reads, no-op casts
NOT_KERNELS = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided", "aten::select",
    "aten::slice", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::transpose", "aten::t", "aten::alias", "aten::detach", "aten::detach_", "aten::unbind", "aten::split",
    "aten::chunk", "aten::narrow", "aten::diagonal", "aten::view_as", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::item",
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::result_type", "aten::to", "aten::resize_",
    "aten::flatten", "aten::contiguous"})
MAX_ITER = 300


def count(run: Callable[[], Any]) -> dict[str, Any]:
    """One call of `run` (after a warm-up call) under torch.profiler and the host-sync counter."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks._sync import SyncCounter
    run()
    with SyncCounter("cpu") as syncs, profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    leaf = [e for e in events if e.name not in NOT_KERNELS
            and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kinds = collections.Counter(e.name.replace("aten::", "") for e in leaf)
    return {"top_level_ops": len(top), "kernel_like_ops": len(leaf), "host_syncs": syncs.count,
            "top_kernels": dict(kinds.most_common(8))}


def measure(case, max_iter: int = MAX_ITER) -> list[dict]:
    from benchmarks.gpu import Settings, _end_to_end_runs
    from fpgrad._checks import emulate_cuda_checks
    s = Settings(device=torch.device("cpu"), dry_run=False, repeats=1, max_iter=max_iter, budgets=(), Ts=())
    rows = []
    with C.quiet(), emulate_cuda_checks():
        for name, run in _end_to_end_runs(case, s).items():
            if name.startswith("torchopt"):
                continue
            rows.append({"map": case.name, "method": name, "library": name.split(":")[0], **count(run)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = C.parser("dispatch", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    run = C.Run("dispatch", args)
    from benchmarks.gpu import slot_case, tanh_case
    cpu = torch.device("cpu")
    if args.quick:
        the_cases = [tanh_case(64, 8, cpu, args.seed), slot_case(4, 16, 16, 3, cpu, args.seed)]
    else:
        # n 4096 is benchmarks.gpu's tanh case (the one the GPU target is measured on): its iteration counts
        # differ from n 512's, and with them the ratio
        the_cases = [tanh_case(512, 64, cpu, args.seed), tanh_case(4096, 64, cpu, args.seed),
                     slot_case(16, 64, 32, 4, cpu, args.seed)]
    rows = [row for case in the_cases for row in measure(case)]
    C.table(rows, ["map", "method", "top_level_ops", "kernel_like_ops", "host_syncs"],
            title="operations dispatched by one training step (CUDA check periods emulated on the CPU)")
    targets = []
    for case in the_cases:
        ours = next((r for r in rows if r["map"] == case.name and "Implicit" in r["method"]), None)
        peer = next((r for r in rows if r["map"] == case.name and r["library"] == "torchdeq"), None)
        if ours is None or peer is None:
            targets.append(C.target(f"dispatch: top-level ops per step vs TorchDEQ, {case.name}", None, None,
                                    "<= 1.0", "TorchDEQ not installed"))
            continue
        ratio = ours["top_level_ops"] / peer["top_level_ops"]
        targets.append(C.target(
            f"dispatch: top-level ops per step vs TorchDEQ, {case.name}", ratio <= 1.0, ratio, "<= 1.0",
            f"fpgrad Implicit {ours['top_level_ops']} vs TorchDEQ {peer['top_level_ops']} (kernel-like "
            f"{ours['kernel_like_ops']} vs {peer['kernel_like_ops']}, syncs {ours['host_syncs']} vs "
            f"{peer['host_syncs']})", "a CPU proxy of the GPU end-to-end time target"))
    run.save({"max_iter": MAX_ITER, "rows": rows}, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
