"""A researcher's own module as a map: any state rank, a training loop that fills .grad for every estimator,
buffers held fixed, and a module that runs its own loop refused with how to wrap one iteration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import ShapeError
from fpgrad.estimators import Implicit, Neumann, OneStep, Phantom, Truncated, Unrolled
from fpgrad.maps.module import BufferMutationError, NotAStepError


class Cell(nn.Module):
    """A DEQ cell z -> tanh(W z + U x + b), contractive (||W|| = 0.5): z [B, ..., n], x [B, ..., m]."""

    def __init__(self, n=6, m=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(n, m, generator=g, dtype=torch.float64) / m ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


# ---- 1. any event rank ------------------------------------------------------------------------------

def test_state_rank_is_inferred_leading_dim_is_the_batch():
    m = fpgrad.maps.from_module(Cell())
    assert m.event_ndim is None
    assert m.is_batched(torch.zeros(2, 3, 6)) and m.is_batched(torch.zeros(2, 6))
    assert not m.is_batched(torch.zeros(6))


def test_explicit_event_ndim_that_contradicts_the_state_names_the_argument():
    m = fpgrad.maps.from_module(Cell(), event_ndim=1)
    with pytest.raises(ShapeError, match=r"from_module\(event_ndim=\.\.\.\) is 1.*pass event_ndim=2"):
        m.is_batched(torch.zeros(2, 3, 6))


def test_slots_state_solves_per_sample_like_each_sample_alone():
    """[B, K, D] state (slots): the solve of the batch equals each sample solved on its own."""
    m = fpgrad.maps.from_module(Cell())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    z0 = torch.zeros(2, 3, 6, dtype=torch.float64)
    sol = fpgrad.solve(m, x, z0=z0, tol=1e-12)
    assert bool(sol.converged.all())
    for i in range(2):
        alone = fpgrad.solve(m, x[i:i + 1], z0=z0[i:i + 1], tol=1e-12)
        torch.testing.assert_close(sol.z[i], alone.z[0], rtol=1e-9, atol=1e-10)


# ---- 2. training the module -------------------------------------------------------------------------

ESTIMATORS = [Unrolled(60), Truncated(T=60, k=10), OneStep(), Neumann(5), Phantom(5, 0.5), Implicit(solver="gmres"),
              Implicit(solver="dense")]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: repr(e)[:40])
def test_training_loop_fills_the_modules_grad_with_the_functional_gradient(estimator):
    cell = Cell()
    m = fpgrad.maps.from_module(cell, event_ndim=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    target = torch.randn(5, 6, generator=g, dtype=torch.float64)
    z0 = torch.zeros(5, 6, dtype=torch.float64)

    def loss_fn(z):
        return ((z - target) ** 2).mean()

    reference = fpgrad.gradient(m, x, loss_fn, estimator=estimator, z0=z0).params
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in cell.named_parameters()}
    optimizer.zero_grad()
    z = fpgrad.fixed_point(m.step, m.params, x, z0, backward=estimator)
    loss_fn(z).backward()
    for k, p in cell.named_parameters():
        assert p.grad is not None, k
        torch.testing.assert_close(p.grad, reference[k], rtol=1e-6, atol=1e-9)
    optimizer.step()
    assert all(not torch.equal(p.detach(), before[k]) for k, p in cell.named_parameters())


# ---- 3. buffers -------------------------------------------------------------------------------------

class NormCell(Cell):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(6, dtype=torch.float64)

    def forward(self, z, x):
        return torch.tanh(self.norm(z @ self.W.T) + x @ self.U.T)


def test_batchnorm_in_train_mode_is_refused_naming_eval_and_its_buffers_stay_unchanged():
    cell = NormCell()
    m = fpgrad.maps.from_module(cell)
    x = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(BufferMutationError, match=r"norm \(BatchNorm1d\) is in train mode.*module.eval\(\)"):
        fpgrad.fixed_point(m.step, m.params, x, torch.zeros(4, 6, dtype=torch.float64))
    assert int(cell.norm.num_batches_tracked) == 0
    cell.eval()
    z = fpgrad.fixed_point(m.step, m.params, x, torch.zeros(4, 6, dtype=torch.float64))
    assert z.shape == (4, 6) and int(cell.norm.num_batches_tracked) == 0


def test_a_step_that_changes_a_buffer_is_named():
    class Counting(Cell):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, z, x):
            self.calls += 1
            return super().forward(z, x)

    m = fpgrad.maps.from_module(Counting())
    with pytest.raises(BufferMutationError, match="changed buffer.*calls"):
        m(torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))


def test_map_to_casts_params_and_buffers():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("shift", torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, z, x):
            return 0.5 * torch.tanh(self.lin(z) + x) + self.shift

    m = fpgrad.maps.from_module(Shifted()).to(dtype=torch.float64)
    assert {v.dtype for v in m.params.values()} == {torch.float64} and m.buffers["shift"].dtype == torch.float64
    z = torch.zeros(2, 3, dtype=torch.float64)
    assert m(z, z).dtype == torch.float64


def test_cli_dtype_float64_casts_a_user_modules_buffers(tmp_path):
    from fpgrad.cli import main
    (tmp_path / "bufmap.py").write_text(
        "import torch, fpgrad\n"
        "class Step(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(3, 3)\n"
        "        self.register_buffer('shift', torch.ones(3))\n"
        "    def forward(self, z, x):\n"
        "        return 0.3 * torch.tanh(self.lin(z) + x) + self.shift\n"
        "def build():\n"
        "    m = fpgrad.maps.from_module(Step(), init=lambda p, x, g: torch.zeros_like(x), event_ndim=1)\n"
        "    return m, torch.ones(2, 3)\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["report", "spectral", "--map", "bufmap:build", "--dtype", "float64", "--no-gradients",
                     "--quiet", "--out", str(tmp_path / "rep")]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert (tmp_path / "rep" / "summary.json").exists()


# ---- 4. a module that runs its own loop ---------------------------------------------------------------

def test_a_forward_that_does_not_take_state_and_input_says_how_to_wrap_one_iteration():
    class OwnLoop(nn.Module):
        def forward(self, inputs, num_slots=None):
            return inputs

    with pytest.raises(NotAStepError, match=r"forward\(inputs, num_slots=None\) does not take \(z, x\)"
                                            r"(.|\n)*ONE iteration"):
        fpgrad.maps.from_module(OwnLoop())


try:                # (a module-level importorskip would skip this file's other tests too)
    import slot_attention
except ImportError:
    slot_attention = None
needs_slot_attention = pytest.mark.skipif(slot_attention is None,
                                          reason="the PyPI slot-attention package (dev extra) is not installed")


class OneSlotAttentionIteration(nn.Module):
    """ONE iteration of the PyPI package's SlotAttention loop, as a step: forward(slots [B, K, D], inputs [B, N, D])."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, slots, inputs):
        from slot_attention.slot_attention import l1norm
        sa = self.inner
        b, _, d = inputs.shape
        inputs = sa.norm_input(inputs)
        k, v = sa.to_k(inputs), sa.to_v(inputs)
        q = sa.to_q(sa.norm_slots(slots))
        attn = l1norm((torch.einsum("bid,bjd->bij", q, k) * sa.scale).softmax(dim=1), eps=sa.eps)
        updates = torch.einsum("bjd,bij->bid", v, attn)
        new = sa.gru(updates.reshape(-1, d), slots.reshape(-1, d)).reshape(b, -1, d)
        return new + sa.mlp(sa.norm_pre_ff(new))


@needs_slot_attention
def test_third_party_slot_attention_is_refused_then_wrapped_one_iteration_and_trained():
    torch.manual_seed(0)
    inner = slot_attention.SlotAttention(num_slots=3, dim=8, iters=1).double()
    with pytest.raises(NotAStepError, match="ONE iteration"):
        fpgrad.maps.from_module(inner)
    m = fpgrad.maps.from_module(OneSlotAttentionIteration(inner))
    inputs = torch.randn(2, 10, 8, dtype=torch.float64)
    # the step is one iteration of the package's own loop: replay its random initial slots and compare
    torch.manual_seed(1)
    reference = inner(inputs)
    torch.manual_seed(1)
    mu = inner.slots_mu.expand(2, 3, -1)
    slots0 = (mu + inner.slots_logsigma.exp().expand(2, 3, -1) * torch.randn(mu.shape, dtype=torch.float64)).detach()
    torch.testing.assert_close(m(slots0, inputs), reference, rtol=1e-10, atol=1e-12)
    # and it trains: every parameter of the third-party module the step uses gets a .grad
    z = fpgrad.fixed_point(m.step, m.params, inputs, slots0, backward=OneStep())
    z.pow(2).mean().backward()
    used = [k for k in m.params if not k.startswith("inner.slots_")]
    assert all(m.params[k].grad is not None for k in used)
