"""The penalties take an ImplicitSlotAttention (or a model holding one) directly: `module.last` records the
step, params, x and z of its forward, and the one-line form gives the explicit form's value and gradient."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fpgrad
from fpgrad.contraction import SpectralState, frobenius_exact, frobenius_penalty, spectral_penalty
from fpgrad.maps import slot_attention_step
from fpgrad.models import SlotAutoencoder
from fpgrad.nn import ImplicitSlotAttention


def _module(backward="implicit", **kw):
    torch.manual_seed(0)
    m = ImplicitSlotAttention(6, 3, iters=4, backward=backward, seed=0, **kw).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return m, x


def _explicit_z(m, x, seed):
    """The slots the module returns, recomputed independently: 4 plain steps of the map from the same init."""
    params = {k: v.detach() for k, v in m.named_parameters()}
    z = fpgrad.maps.sample_slots(params, x.shape[0], m.num_slots, torch.Generator().manual_seed(seed))
    for _ in range(m.iters):
        z = slot_attention_step(params, z, x)
    return z


def _grads(loss, m):
    named = list(m.named_parameters())
    gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(named, gs)}


def _step(params, z, x):
    return slot_attention_step(params, z, x)


@pytest.mark.parametrize("backward", ["implicit", "one_step", "unrolled"])
def test_last_records_the_solve(backward):
    m, x = _module(backward)
    z = m(x, generator=torch.Generator().manual_seed(2))
    last = m.last
    assert last.x is x
    assert not last.z.requires_grad
    torch.testing.assert_close(last.z, z.detach())
    torch.testing.assert_close(last.z, _explicit_z(m, x, 2), rtol=1e-10, atol=1e-12)
    assert set(last.params) == {k for k, _ in m.named_parameters()}
    assert all(last.params[k] is p for k, p in m.named_parameters())


def test_frobenius_penalty_of_the_module_matches_the_explicit_form_and_the_dense_value():
    m, x = _module()
    m(x, generator=torch.Generator().manual_seed(2))
    z = _explicit_z(m, x, 2)
    params = dict(m.named_parameters())
    probes = torch.randn(5, *z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    one_line = frobenius_penalty(m, vectors=probes)
    explicit = frobenius_penalty(_step, params, z, x, vectors=probes)
    torch.testing.assert_close(one_line, explicit, rtol=1e-9, atol=0)
    g1, g2 = _grads(one_line, m), _grads(explicit, m)
    assert any(float(g.abs().max()) > 0 for g in g1.values())
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-8, atol=1e-12, msg=k)
    # and the estimate targets the dense ||J||_F^2 / n (many probes: a loose, seeded check)
    many = frobenius_penalty(m, probes=400, generator=torch.Generator().manual_seed(4))
    exact = frobenius_exact(_step, {k: v.detach() for k, v in params.items()}, z, x).mean()
    assert abs(float(many.detach()) - float(exact.detach())) < 0.15 * float(exact)


def test_spectral_penalty_of_the_module_matches_the_explicit_form():
    m, x = _module()
    m(x, generator=torch.Generator().manual_seed(2))
    z = _explicit_z(m, x, 2)
    params = dict(m.named_parameters())
    s1 = SpectralState(generator=torch.Generator().manual_seed(5), cold_iters=30)
    s2 = SpectralState(generator=torch.Generator().manual_seed(5), cold_iters=30)
    one_line = spectral_penalty(m, state=s1, target=0.0)
    explicit = spectral_penalty(_step, params, z, x, state=s2, target=0.0)
    torch.testing.assert_close(one_line, explicit, rtol=1e-8, atol=0)
    assert float(one_line) > 0
    g1, g2 = _grads(one_line, m), _grads(explicit, m)
    assert any(float(g.abs().max()) > 0 for g in g1.values())
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-6, atol=1e-10, msg=k)


def test_a_model_holding_the_module_is_accepted_and_the_inputs_stay_on_the_tape():
    torch.manual_seed(0)
    model = SlotAutoencoder(resolution=16, num_slots=3, slot_dim=16, channels=8, iters=3, backward="implicit",
                            seed=0)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model(images, generator=torch.Generator().manual_seed(1))
    pen = frobenius_penalty(model, generator=torch.Generator().manual_seed(2))
    (out.loss(images) + pen).backward()
    # the penalty reaches the encoder through x (J depends on the inputs) and slot attention's own params
    enc = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert enc and any(float(g.abs().max()) > 0 for g in enc)
    assert float(model.slot_attention.to_q.weight.grad.abs().max()) > 0


def test_vmap_over_samples_gives_the_batched_penalty():
    m, x = _module()
    m(x, generator=torch.Generator().manual_seed(2))
    z = m.last.z
    params = {k: v.detach() for k, v in m.named_parameters()}
    probes = torch.randn(2, *z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    batched = frobenius_penalty(m, vectors=probes, reduction="none")
    per = torch.func.vmap(lambda zz, xx, vv: frobenius_penalty(_step, params, zz, xx, vectors=vv, batched=False),
                          in_dims=(0, 0, 1))(z, x, probes)
    torch.testing.assert_close(per, batched.detach(), rtol=1e-9, atol=1e-12)
    # the module under vmap does not record (its tensors cannot leave the transform)
    torch.func.functional_call(m, dict(m.named_parameters()), (x,), {"slots": z})
    assert m.last is not None
    noise = torch.randn(3, 1, 3, 6, dtype=torch.float64)
    torch.func.vmap(lambda xx, nn_: m(xx, noise=nn_))(x[:, None], noise)
    assert m.last is None


def test_errors_name_the_fix():
    m, x = _module()
    with pytest.raises(ValueError, match="call the model on a batch first"):
        frobenius_penalty(m)
    m(x)
    with pytest.raises(TypeError, match="not a part of them"):
        spectral_penalty(m, dict(m.named_parameters()))
    with pytest.raises(TypeError, match="exactly one module"):
        frobenius_penalty(torch.nn.Sequential(m, copy.deepcopy(m)))
    with pytest.raises(TypeError, match="step function"):
        frobenius_penalty(3)


def test_deepcopy_after_a_forward_drops_last():
    m, x = _module()
    m(x.requires_grad_() * 2.0)             # inputs with a graph: a non-leaf tensor cannot be deep-copied
    c = copy.deepcopy(m)
    assert c.last is None and m.last is not None


def test_unconverged_warning_names_the_module_knobs():
    m, x = _module(tol=1e-12)
    m.iters = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(x)
    texts = [str(w.message) for w in caught if issubclass(w.category, fpgrad.errors.ConvergenceWarning)]
    mine = [t for t in texts if t.startswith("ImplicitSlotAttention")]
    assert mine and "raise iters" in mine[0] and "max_iter" not in mine[0]
    assert not any("did not converge in" in t and "raise max_iter" in t for t in texts)
