"""DistributedDataParallel (gloo, two CPU processes): the gradient after DDP's all-reduce, each rank holding half
of the batch, equals the single-process gradient of the mean loss over the whole batch; and the torchrun example."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import contractive_tanh, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fpgrad

WORLD = 2
BATCH = 4                     # the whole batch; each rank holds BATCH // WORLD samples
RTOL = 1e-8                   # float64: the shards' all-reduced gradient equals the whole-batch one to rounding
TIMEOUT = 120                 # seconds for the two ranks together
ROOT = Path(__file__).resolve().parents[1]


# ---- the cases: each builds a module and its inputs deterministically, in any process -------------------

def _slot_attention(backward: str) -> nn.Module:
    if backward == "implicit":       # contractive (recurrent weights shrunk) and solved to a fixed point
        layer = fpgrad.nn.ImplicitSlotAttention(8, 3, iters=100, backward="implicit", tol=1e-12, forward="anderson",
                                                seed=0).double()
        with torch.no_grad():
            for p in (layer.gru.weight_hh, layer.to_q.weight, layer.mlp[2].weight):
                p.mul_(0.3)
        return layer
    return fpgrad.nn.ImplicitSlotAttention(8, 3, iters=3, backward=backward, seed=0).double()


class TanhFixedPoint(nn.Module):
    """A bare module around fpgrad.fixed_point: z* = tanh(W z* + U x + b) with ||W||_2 = 0.5."""

    def __init__(self, backward: str):
        super().__init__()
        m = contractive_tanh(6, 0.5, seed=0, input_dim=3)
        self.map, self.backward = m, backward
        self.params = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in m.params.items()})

    def forward(self, x):
        z0 = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        return fpgrad.fixed_point(self.map.step, dict(self.params), x, z0, backward=self.backward,
                                  forward=fpgrad.forward.get_forward("anderson", tol=1e-13, max_iter=200))


CASES = {
    "slot_attention-unrolled": lambda: _slot_attention("unrolled"),
    "slot_attention-one_step": lambda: _slot_attention("one_step"),
    "slot_attention-implicit": lambda: _slot_attention("implicit"),
    "fixed_point-implicit": lambda: TanhFixedPoint("implicit"),
    "fixed_point-one_step": lambda: TanhFixedPoint("one_step"),
}


def _batch(case: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, noise of the initial slots) of the whole batch."""
    g = torch.Generator().manual_seed(1)
    if case.startswith("fixed_point"):
        return torch.randn(BATCH, 3, generator=g, dtype=torch.float64), None
    return (torch.randn(BATCH, 10, 8, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 3, 8, generator=g, dtype=torch.float64))


def _mean_loss(module: nn.Module, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    z = module(x) if noise is None else module(x, noise=noise)
    return z.pow(2).flatten(1).sum(1).mean() + z.flatten(1)[:, 0].mean()


def _unused(module: nn.Module) -> bool:
    return bool(getattr(module, "parameters_without_grad", lambda: [])())


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.detach().clone() for k, p in module.named_parameters()}


# ---- the ranks ----------------------------------------------------------------------------------------

def _rank_main(rank: int, init_file: str, out: str) -> None:
    """One rank: every case wrapped in DDP, two iterations (DDP checks the first one's reduction at the second
    forward) on this rank's shard; the gradients are saved, a failure's traceback is written for the parent."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for case, build in CASES.items():
            module = build()
            ddp = DistributedDataParallel(module, find_unused_parameters=_unused(module))
            x, noise = _batch(case)
            for _ in range(2):
                ddp.zero_grad(set_to_none=True)
                _mean_loss(ddp, x[shard], None if noise is None else noise[shard]).backward()
            torch.save(_grads(module), Path(out) / f"{case}.rank{rank}.pt")
        del ddp
        gc.collect()            # DDP's reducer must go before its process group (else an abort at exit)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory) -> Path:
    """Runs both ranks once for every case; returns the directory of their saved gradients."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(_rank_main, out, WORLD, TIMEOUT)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradient_equals_single_process_gradient(ddp_gradients, case):
    module = CASES[case]()
    x, noise = _batch(case)
    _mean_loss(module, x, noise).backward()
    expected = _grads(module)
    scale = max(g.abs().max() for g in expected.values() if g is not None)
    ranks = [torch.load(ddp_gradients / f"{case}.rank{r}.pt") for r in range(WORLD)]
    for name, want in expected.items():
        for r, got in enumerate(ranks):
            if want is None:
                assert got[name] is None, (name, r)
                continue
            # atol relative to the largest gradient: some entries are zero analytically (norm_slots.bias)
            torch.testing.assert_close(got[name], want, rtol=RTOL, atol=RTOL * float(scale), msg=f"{name} rank {r}")
    if case.endswith("one_step") and case.startswith("slot"):
        assert expected["slots_mu"] is None            # the DDP run needed find_unused_parameters=True


# ---- what DDP needs from the module -------------------------------------------------------------------

@pytest.mark.parametrize("backward", ["unrolled", "one_step", "one_step_st", "truncated-2", "truncated-3",
                                      "implicit", "neumann-2"])
@pytest.mark.parametrize("slots_given", [False, True])
def test_parameters_without_grad_lists_exactly_those_left_without_grad(backward, slots_given):
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3, iters=3, backward=backward, seed=0)
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    slots = torch.randn(2, 3, 8) if slots_given else None
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")            # 3 steps are not a fixed point
        layer(x, slots, generator=torch.Generator().manual_seed(1)).sum().backward()
    without = [k for k, p in layer.named_parameters() if p.grad is None]
    assert without == layer.parameters_without_grad(slots_given=slots_given)


def test_noise_gives_the_slots_sampled_from_the_same_draw():
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3, iters=2, backward="unrolled", seed=0)
    x = torch.randn(4, 10, 8)
    noise = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(3))
    sampled = layer(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer(x, noise=noise), sampled)
    halves = torch.cat([layer(x[:2], noise=noise[:2]), layer(x[2:], noise=noise[2:])])
    torch.testing.assert_close(halves, sampled, rtol=1e-6, atol=1e-6)


def test_noise_of_the_wrong_shape_or_with_slots_is_refused():
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3)
    x = torch.randn(2, 10, 8)
    with pytest.raises(fpgrad.errors.ShapeError, match=r"noise must be \[B, K, dim\] = \[2, K, 8\]"):
        layer(x, noise=torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match="not both"):
        layer(x, torch.randn(2, 3, 8), noise=torch.randn(2, 3, 8))


# ---- the torchrun example -----------------------------------------------------------------------------

def test_torchrun_example_trains_two_steps():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "studies.ddp_training", "--steps", "2", "--log-every", "1", "--backward", "implicit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DDP on 2 rank(s)" in run.stdout
    lines = [line for line in run.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and all("adjoint solve" in line for line in lines), run.stdout


def test_example_is_not_a_study():
    import studies
    assert "studies.ddp_training" not in studies.available().values()
