"""The slot attention autoencoder: shapes, masks that sum to one, training reduces the loss, every backward."""

from __future__ import annotations

import pytest
import torch

from fpgrad.data import MultiShapes
from fpgrad.models import SlotAutoencoder, SpatialBroadcastDecoder, position_grid

BACKWARDS = ["unrolled", "one_step", "implicit"]


def batch(size=16, n=4, seed=0):
    return MultiShapes(size=size, max_objects=2).sample(n, torch.Generator().manual_seed(seed)).images


def small(backward="one_step", seed=0, **kw):
    return SlotAutoencoder(resolution=16, num_slots=3, slot_dim=16, channels=8, backward=backward, seed=seed, **kw)


def test_output_shapes():
    model = small()
    out = model(batch(), generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == (4, 3, 16, 16)
    assert out.masks.shape == (4, 3, 16, 16)
    assert out.rgb.shape == (4, 3, 3, 16, 16)
    assert out.slots.shape == (4, 3, 16)
    assert out.tokens.shape == (4, 64, 16)                  # encoder halves the side: 8 x 8 tokens
    assert out.segmentation().shape == (4, 16, 16)


def test_masks_sum_to_one_over_slots_and_reconstruction_is_their_mixture():
    model = small()
    out = model(batch(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.masks.sum(1), torch.ones(4, 16, 16))
    torch.testing.assert_close(out.reconstruction, (out.masks[:, :, None] * out.rgb).sum(1))


def test_same_seed_same_model_and_output():
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    for (ka, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), ka
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    x = batch()
    ya = a(x, generator=torch.Generator().manual_seed(0)).reconstruction
    yb = b(x, generator=torch.Generator().manual_seed(0)).reconstruction
    assert torch.equal(ya, yb)


@pytest.mark.filterwarnings("ignore::fpgrad.errors.ConvergenceWarning")   # z_T after 3 steps is not a fixed point
@pytest.mark.parametrize("backward", BACKWARDS)
def test_every_parameter_used_gets_a_gradient(backward):
    model = small(backward)
    x = batch()
    model(x, generator=torch.Generator().manual_seed(0)).loss(x).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("slot_attention.slots_")]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.filterwarnings("ignore::fpgrad.errors.ConvergenceWarning")   # z_T is not a fixed point
@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_few_adam_steps_reduce_the_loss_on_a_fixed_batch(backward):
    model = small(backward)
    x = batch(n=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss():
        return model(x, generator=torch.Generator().manual_seed(0)).loss(x)
    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.7 * first


def test_test_time_iterations_run_exactly_that_many_steps_without_gradient():
    model = small(iters=3)
    x = batch()
    out = model(x, generator=torch.Generator().manual_seed(0), iters=7)
    assert out.record.forward[0].evaluations == 8           # z_0 .. z_7, each with its residual
    assert not out.slots.requires_grad


@pytest.mark.parametrize("backward", BACKWARDS)
def test_trained_iteration_count_matches_the_module(backward):
    model = small(backward, iters=3).eval()
    x = batch()
    a = model(x, generator=torch.Generator().manual_seed(0)).slots
    b = model(x, generator=torch.Generator().manual_seed(0), iters=3).slots
    torch.testing.assert_close(a, b)


def test_position_grid_corners():
    g = position_grid(4, 5)
    assert g.shape == (4, 5, 4)
    torch.testing.assert_close(g[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(g[-1, -1], torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_bad_image_shape_raises():
    with pytest.raises(ValueError):
        small()(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_every_estimator_sees_the_same_forward(backward):
    reference = small("unrolled", iters=3).eval()
    model = small(backward, iters=3).eval()
    x = batch()
    a = reference(x, generator=torch.Generator().manual_seed(0)).slots
    b = model(x, generator=torch.Generator().manual_seed(0)).slots
    torch.testing.assert_close(a, b)


def test_full_resolution_decoder_broadcasts_at_the_image_side_without_upsampling():
    model = small("unrolled", broadcast=16, decoder_channels=6, decoder_layers=2, decoder_kernel=5)
    convs = [m for m in model.decoder.net if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder.net)
    assert [(c.kernel_size[0], c.out_channels) for c in convs] == [(3, 6), (5, 6), (5, 6), (1, 4)]
    assert model.encoder.convs[0].out_channels == 8                 # the encoder keeps `channels`
    out = model(batch(), generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == (4, 3, 16, 16) and out.masks.shape == (4, 3, 16, 16)
    torch.testing.assert_close(out.masks.sum(1), torch.ones(4, 16, 16))


def test_decoder_defaults_are_the_previous_network():
    model = small()
    kinds = [type(m).__name__ for m in model.decoder.net]
    assert kinds == ["Conv2d", "ReLU", "ConvTranspose2d", "ReLU", "Conv2d"]     # 8 -> 16: one upsampling
    assert model.decoder.net[2].out_channels == 4                               # max(4, channels // 2)


def test_extra_decoder_layers_follow_the_upsampling_at_full_resolution():
    decoder = SpatialBroadcastDecoder(16, 8, 6, broadcast=8, layers=1)
    kinds = [type(m).__name__ for m in decoder.net]
    assert kinds == ["Conv2d", "ReLU", "ConvTranspose2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]
    rgb, logits = decoder(torch.randn(2, 3, 8))
    assert rgb.shape == (2, 3, 3, 16, 16) and logits.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("kw", [{"layers": -1}, {"kernel": 4}, {"kernel": 0}, {"first_kernel": 2}])
def test_bad_decoder_options_raise(kw):
    with pytest.raises(ValueError, match="SpatialBroadcastDecoder"):
        SpatialBroadcastDecoder(16, 8, 6, broadcast=16, **kw)


def test_a_few_adam_steps_reduce_the_loss_with_the_full_resolution_decoder():
    model = small("unrolled", broadcast=16, decoder_layers=1)
    x = batch(n=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss():
        return model(x, generator=torch.Generator().manual_seed(0)).loss(x)
    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.7 * first


def test_first_kernel_one_makes_the_first_decoder_layer_per_pixel():
    decoder = SpatialBroadcastDecoder(16, 8, 6, broadcast=16, layers=0, first_kernel=1)
    assert decoder.net[0].kernel_size == (1, 1)
    slots = torch.randn(1, 2, 8)
    with torch.no_grad():                                  # no spatial mixing: a pixel depends on its own position only
        rgb, logits = decoder(slots)
        grid = decoder.position(slots.reshape(2, 8, 1, 1).expand(2, 8, 16, 16))
        by_pixel = decoder.net(grid[:, :, 5:6, 7:8])
    torch.testing.assert_close(logits[0, :, 5, 7], by_pixel[:, 3, 0, 0])
