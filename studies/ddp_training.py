"""Data-parallel training of the slot attention autoencoder with torchrun (DDP, gloo on CPU): an example.

    torchrun --standalone --nproc_per_node 2 -m studies.ddp_training --steps 20 --backward one_step
    torchrun --standalone --nproc_per_node 2 -m studies.ddp_training --backward implicit --tol 1e-4 --iters 100 \
        --compile-step

Every step draws one batch of procedural scenes (`fpgrad.data.MultiShapes`) from a generator that all ranks
share, and each rank trains on its shard of it, so the shards' union is the single-process batch; DDP
averages the gradients. Rank 0 prints the loss (mean over ranks) and the backward's cost (VJPs with the
step; for the implicit backward the adjoint solve's matvecs and residual; the forward solve's residual;
worst over ranks).
--compile-step runs the slot attention step as a torch.compile'd function. Not a study (no STUDY):
`fpgrad study` does not list it.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fpgrad.data import MultiShapes
from fpgrad.errors import ConvergenceWarning
from fpgrad.models import SlotAutoencoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --standalone --nproc_per_node N -m studies.ddp_training",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="global batch, split over the ranks")
    p.add_argument("--backward", default="one_step", help="unrolled | one_step | implicit | ... (estimator name)")
    p.add_argument("--iters", type=int, default=3, help="slot attention steps (the cap when --tol is given)")
    p.add_argument("--tol", type=float, default=None, help="solve the slots to this relative residual")
    p.add_argument("--forward", default="anderson", help="forward solver with --tol: iterate | anderson | broyden")
    p.add_argument("--size", type=int, default=16, help="image side in pixels")
    p.add_argument("--num-slots", type=int, default=3)
    p.add_argument("--slot-dim", type=int, default=16)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--compile-step", action="store_true", help="run the slot attention step compiled")
    args = p.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        p.error("--steps and --log-every must be >= 1")
    return args


def backward_cost(record) -> list[float]:
    """One step's record (this rank): [VJPs with the step, the adjoint solve's matvecs and worst relative
    residual, the forward solve's worst relative residual] (NaN where there is no such solve)."""
    solve = record.solves[-1] if record.solves else None
    fp = record.forward[-1] if record.forward else None
    nan = float("nan")
    return [float(record.vjps), float(solve.matvecs) if solve else nan, float(solve.residual.max()) if solve else nan,
            float(fp.relative_residuals[-1].max()) if fp else nan]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("studies.ddp_training: run it with torchrun, e.g. "
                         "torchrun --standalone --nproc_per_node 2 -m studies.ddp_training --steps 20")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        train(args, dist.get_rank(), dist.get_world_size())
        # DDP's reducer (kept alive by reference cycles) must go before its process group: freed at exit instead,
        # it aborts the process ("terminate called without an active exception") in about one run in five
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    if args.batch % world:
        raise SystemExit(f"studies.ddp_training: --batch {args.batch} must be a multiple of the {world} ranks")
    model = SlotAutoencoder(resolution=args.size, num_slots=args.num_slots, slot_dim=args.slot_dim,
                            channels=args.channels, iters=args.iters, backward=args.backward, seed=args.seed)
    slot_attention = model.slot_attention
    slot_attention.compile_step = args.compile_step
    if args.tol is not None:
        slot_attention.tol, slot_attention.forward_method = args.tol, args.forward
    # parameters that backward never reaches (the slot initialisation under one_step) need DDP to look for them
    unused = slot_attention.parameters_without_grad()
    ddp = DistributedDataParallel(model, find_unused_parameters=bool(unused))
    optimiser = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    data = MultiShapes(size=args.size, min_objects=1, max_objects=max(1, args.num_slots - 1))
    data_gen = torch.Generator().manual_seed(args.seed)                      # the same on every rank
    noise_gen = torch.Generator().manual_seed(1000 * args.seed + 1 + rank)   # initial slots: one per rank
    shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    if rank == 0:
        print(f"DDP on {world} rank(s) (gloo, CPU): backward={args.backward}, iters={args.iters}, "
              f"tol={args.tol}, batch {args.batch} ({args.batch // world} per rank), compile_step={args.compile_step}, "
              f"find_unused_parameters={bool(unused)}", flush=True)
    t0 = time.perf_counter()
    for step in range(args.steps):
        images = data.sample(args.batch, data_gen).images[shard]
        with warnings.catch_warnings():
            # a few plain iterations are not a fixed point: the adjoint estimators would warn at every step;
            # the residuals are printed instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            out = ddp(images, generator=noise_gen)
            loss = out.loss(images)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
        optimiser.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            loss_sum = torch.tensor([float(loss.detach())], dtype=torch.float64)
            worst = torch.tensor(backward_cost(out.record), dtype=torch.float64)
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if rank == 0:
                vjps, matvecs, adjoint_res, forward_res = worst.tolist()
                line = f"step {step:4d}  loss {loss_sum.item() / world:.5f}  backward VJPs {int(vjps)}"
                if out.record.solves:
                    line += f" (adjoint solve: {int(matvecs)} matvecs, residual {adjoint_res:.1e})"
                if out.record.forward:
                    line += f"  forward residual {forward_res:.1e}"
                print(f"{line}  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
