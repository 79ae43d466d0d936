"""DistributedDataParallel (gloo, two CPU processes) with a contraction penalty in the loss: the all-reduced
gradient of loss + penalty, each rank holding half of the batch (and half of the fixed probes / start vectors),
equals the single-process gradient on the whole batch. The penalty runs outside DDP's forward, on the module's
own record (`spectral_penalty(ddp_model, ...)`), and its gradient joins the same all-reduce."""

from __future__ import annotations

import gc
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
from fpgrad.contraction import frobenius_penalty, spectral_penalty

WORLD = 2
BATCH = 4
RTOL = 1e-8
TIMEOUT = 120


def _slot_attention() -> nn.Module:
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3, iters=100, backward="implicit", tol=1e-12, forward="anderson",
                                            seed=0).double()
    with torch.no_grad():
        for p in (layer.gru.weight_hh, layer.to_q.weight, layer.mlp[2].weight):
            p.mul_(0.3)
    return layer


class TanhFixedPoint(nn.Module):
    """A bare module around fpgrad.fixed_point (the explicit form of the penalties)."""

    def __init__(self):
        super().__init__()
        self.map = contractive_tanh(6, 0.5, seed=0, input_dim=3)
        self.params = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in self.map.params.items()})

    def forward(self, x):
        z0 = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        return fpgrad.fixed_point(self.map.step, dict(self.params), x, z0, backward="implicit",
                                  forward=fpgrad.forward.get_forward("anderson", tol=1e-13, max_iter=200))


CASES = ("slot_attention-frobenius", "slot_attention-spectral", "fixed_point-frobenius", "fixed_point-spectral")


def _build(case: str) -> nn.Module:
    return _slot_attention() if case.startswith("slot") else TanhFixedPoint()


def _batch(case: str) -> dict[str, torch.Tensor]:
    """The whole batch's inputs, slot noise, probes [2, B, *event] and spectral start vectors [B, n, 2]."""
    g = torch.Generator().manual_seed(1)
    if case.startswith("fixed_point"):
        x, noise, event = torch.randn(BATCH, 3, generator=g, dtype=torch.float64), None, (6,)
    else:
        x = torch.randn(BATCH, 10, 8, generator=g, dtype=torch.float64)
        noise, event = torch.randn(BATCH, 3, 8, generator=g, dtype=torch.float64), (3, 8)
    n = 1
    for e in event:
        n *= e
    return {"x": x, "noise": noise, "probes": torch.randn(2, BATCH, *event, generator=g, dtype=torch.float64),
            "right": torch.randn(BATCH, n, 2, generator=g, dtype=torch.float64),
            "left": torch.randn(BATCH, n, 2, generator=g, dtype=torch.float64)}


def _shard(batch: dict, s: slice) -> dict:
    return {k: None if v is None else (v[:, s] if k == "probes" else v[s]) for k, v in batch.items()}


def _loss(case: str, model: nn.Module, inner: nn.Module, b: dict) -> torch.Tensor:
    """Task loss (mean over the samples) + 3 * penalty (mean over the samples); target 0 keeps the hinge active."""
    z = model(b["x"]) if b["noise"] is None else model(b["x"], noise=b["noise"])
    task = z.pow(2).flatten(1).sum(1).mean()
    if case.startswith("slot"):
        args = (model,)                                   # the one-line form: the (DDP-wrapped) module
    else:
        args = (inner.map.step, dict(inner.params), z, b["x"])
    if case.endswith("frobenius"):
        pen = frobenius_penalty(*args, vectors=b["probes"])
    else:
        pen = spectral_penalty(*args, target=0.0, right=b["right"], left=b["left"], iters=3)
    return task + 3.0 * pen


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.detach().clone() for k, p in module.named_parameters()}


def _rank_main(rank: int, init_file: str, out: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for case in CASES:
            module = _build(case)
            ddp = DistributedDataParallel(module)
            b = _shard(_batch(case), shard)
            for _ in range(2):
                ddp.zero_grad(set_to_none=True)
                _loss(case, ddp, module, b).backward()
            torch.save(_grads(module), Path(out) / f"{case}.rank{rank}.pt")
        del ddp
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_penalty")
    run_ranks(_rank_main, out, WORLD, TIMEOUT)
    return out


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradient_of_loss_plus_penalty_equals_single_process_gradient(ddp_gradients, case):
    module = _build(case)
    _loss(case, module, module, _batch(case)).backward()
    expected = _grads(module)
    # the penalty matters: without it the gradient differs
    bare = _build(case)
    b = _batch(case)
    z = bare(b["x"]) if b["noise"] is None else bare(b["x"], noise=b["noise"])
    z.pow(2).flatten(1).sum(1).mean().backward()
    task_only = _grads(bare)
    scale = max(g.abs().max() for g in expected.values() if g is not None)
    assert max(float((expected[k] - task_only[k]).abs().max()) for k in expected
               if expected[k] is not None and task_only[k] is not None) > 1e-3 * float(scale)
    ranks = [torch.load(ddp_gradients / f"{case}.rank{r}.pt") for r in range(WORLD)]
    for name, want in expected.items():
        for r, got in enumerate(ranks):
            if want is None:
                assert got[name] is None, (name, r)
                continue
            torch.testing.assert_close(got[name], want, rtol=RTOL, atol=RTOL * float(scale), msg=f"{name} rank {r}")
