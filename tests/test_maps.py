"""Maps: slot attention equals an independent nn.Module; toy maps behave as constructed."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fpgrad


class ReferenceSlotAttention(nn.Module):
    """Locatello et al. 2020, Algorithm 1, written directly with nn layers (independent of fpgrad)."""

    def __init__(self, dim, input_dim, hidden, eps):
        super().__init__()
        self.eps, self.scale = eps, dim ** -0.5
        self.norm_input, self.norm_slots, self.norm_mlp = nn.LayerNorm(input_dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, slots, inputs):
        b, k, d = slots.shape
        inputs = self.norm_input(inputs)
        keys, values = self.to_k(inputs), self.to_v(inputs)
        prev = slots
        q = self.to_q(self.norm_slots(slots))
        dots = torch.bmm(q, keys.transpose(1, 2)) * self.scale
        attn = dots.softmax(dim=1) + self.eps
        attn = attn / attn.sum(dim=-1, keepdim=True)
        updates = torch.bmm(attn, values)
        slots = self.gru(updates.reshape(-1, d), prev.reshape(-1, d)).reshape(b, k, d)
        return slots + self.mlp(self.norm_mlp(slots))


@pytest.mark.parametrize("dim,input_dim,hidden", [(8, 8, 16), (6, 10, 32)])
def test_slot_attention_step_equals_reference_module(dim, input_dim, hidden):
    m = fpgrad.maps.slot_attention(dim=dim, num_slots=4, seed=3, input_dim=input_dim, hidden_dim=hidden,
                                   dtype=torch.float64)
    ref = ReferenceSlotAttention(dim, input_dim, hidden, eps=1e-8).double()
    # perturb the LayerNorm affine parameters so that they are exercised too
    g = torch.Generator().manual_seed(1)
    params = {k: v + (0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) if "norm" in k else 0)
              for k, v in m.params.items()}
    state = {k: v for k, v in params.items() if not k.startswith("slots_")}
    ref.load_state_dict(state, strict=True)
    x = torch.randn(3, 7, input_dim, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, dim, generator=g, dtype=torch.float64)
    out = m.step(params, z, x)
    expected = ref(z, x)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


def test_slot_attention_init_samples_learned_gaussian():
    m = fpgrad.maps.slot_attention(dim=5, num_slots=3, seed=0, dtype=torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    z1 = m.init_state(x, generator=torch.Generator().manual_seed(7))
    z2 = m.init_state(x, generator=torch.Generator().manual_seed(7))
    assert z1.shape == (2, 3, 5) and torch.equal(z1, z2)
    noise = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = m.params["slots_mu"] + m.params["slots_log_sigma"].exp() * noise
    assert torch.allclose(z1, expected)


def test_slot_attention_init_is_differentiable_in_mu_and_sigma():
    m = fpgrad.maps.slot_attention(dim=4, num_slots=2, seed=0, dtype=torch.float64)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    grads = torch.func.grad(lambda p: m.init_state(x, torch.Generator().manual_seed(0), params=p).sum())(m.params)
    assert grads["slots_mu"].abs().sum() > 0 and grads["slots_log_sigma"].abs().sum() > 0


def test_slot_attention_handles_unbatched_state():
    m = fpgrad.maps.slot_attention(dim=4, num_slots=2, seed=0, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    z = m.init_state(x, torch.Generator().manual_seed(0))
    batched = m.step(m.params, z, x)
    single = m.step(m.params, z[1], x[1])
    assert torch.allclose(batched[1], single, atol=1e-12)


def test_linear_map_is_affine_with_batched_and_unbatched_inputs():
    A = torch.randn(4, 4, dtype=torch.float64)
    B = torch.randn(4, 2, dtype=torch.float64)
    m = fpgrad.maps.linear(A, B)
    z, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(m.step(m.params, z, x), z @ A.T + x @ B.T)
    assert torch.allclose(m.step(m.params, z[0], x[0]), A @ z[0] + B @ x[0])


def test_linear_map_rejects_bad_shapes():
    with pytest.raises(fpgrad.errors.ShapeError, match="square"):
        fpgrad.maps.linear(torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(fpgrad.errors.ShapeError, match="B must be"):
        fpgrad.maps.linear(torch.randn(3, 3), torch.randn(4, 2))


@given(n=st.integers(2, 30), rho=st.floats(0.05, 1.5), seed=st.integers(0, 1000))
def test_tanh_rnn_weight_has_requested_spectral_radius(n, rho, seed):
    m = fpgrad.maps.tanh_rnn(n=n, spectral_radius=rho, seed=seed)
    assert math.isclose(float(torch.linalg.eigvals(m.params["W"]).abs().max()), rho, rel_tol=1e-8)


@given(n=st.integers(2, 20), rho=st.floats(0.05, 0.99), seed=st.integers(0, 1000))
def test_gradient_step_jacobian_is_symmetric_with_bounded_spectrum(n, rho, seed):
    m = fpgrad.maps.gradient_step(n=n, spectral_radius=rho, seed=seed)
    z = torch.randn(n, dtype=torch.float64)
    x = torch.randn(n, dtype=torch.float64)
    J = torch.func.jacrev(lambda zz: m.step(m.params, zz, x))(z)
    assert torch.allclose(J, J.T, atol=1e-12)
    assert float(torch.linalg.eigvalsh(J).abs().max()) <= rho + 1e-10


def test_from_module_gives_the_modules_step_and_uses_buffers():
    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("shift", torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x) + self.shift

    mod = Step()
    m = fpgrad.maps.from_module(mod)
    assert set(m.params) == {"lin.weight", "lin.bias"}
    z, x = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(m.step(m.params, z, x), mod(z, x))
    new = {k: torch.zeros_like(v) for k, v in m.params.items()}
    assert torch.allclose(m.step(new, z, x), torch.tanh(x) + mod.shift)


def test_map_without_init_asks_for_z0():
    class Step(nn.Linear):                      # forward(z, x): one step (a bare nn.Linear is refused)
        def forward(self, z, x):
            return super().forward(z) + x

    m = fpgrad.maps.from_module(Step(2, 2).double(), name="lin")
    with pytest.raises(ValueError, match="pass z0"):
        m.init_state(torch.zeros(1, 2))


@given(seed=st.integers(0, 2 ** 16), K=st.integers(2, 5))
def test_the_slot_step_is_permutation_equivariant_unless_slots_are_embedded(seed, K):
    """Permuting the slots permutes the step's output (why a unique fixed point has identical slots); with a
    per-slot embedding it does not, and the gradient reaches the embedding."""
    g = torch.Generator().manual_seed(seed)
    layer = fpgrad.nn.ImplicitSlotAttention(8, K, seed=seed)
    embedded = fpgrad.nn.ImplicitSlotAttention(8, K, seed=seed, slot_embedding=True)
    z = torch.randn(2, K, 8, generator=g, dtype=torch.float32)
    x = torch.randn(2, 6, 8, generator=g)
    perm = torch.roll(torch.arange(K), 1)
    step = fpgrad.maps.slot_attention_step
    plain = layer.functional_params()
    torch.testing.assert_close(step(plain, z[:, perm], x), step(plain, z, x)[:, perm], rtol=1e-5, atol=1e-6)
    params = embedded.functional_params()
    assert not torch.allclose(step(params, z[:, perm], x), step(params, z, x)[:, perm], atol=1e-4)
    step(params, z, x).sum().backward()
    assert embedded.slot_embedding.grad is not None and embedded.slot_embedding.grad.abs().sum() > 0


def test_a_slot_embedding_is_saved_with_the_module_and_must_match_the_slot_count(tmp_path):
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3, seed=0, slot_embedding=True)
    assert layer.config()["slot_embedding"] is True and layer.slot_embedding.shape == (3, 8)
    layer.save_checkpoint(tmp_path / "layer.pt")
    again = fpgrad.nn.ImplicitSlotAttention.load_checkpoint(tmp_path / "layer.pt")
    torch.testing.assert_close(again.slot_embedding, layer.slot_embedding)
    assert fpgrad.nn.ImplicitSlotAttention(8, 3, seed=0).config()["slot_embedding"] is False
    with pytest.raises(fpgrad.errors.ShapeError, match="one row per slot"):
        layer(torch.randn(2, 5, 8), slots=torch.randn(2, 4, 8))
