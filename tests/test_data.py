"""Procedural multi-object scenes: masks partition the image, counts in range, seeded, images in [0, 1]."""

from __future__ import annotations

import pytest
import torch

from fpgrad.data import SHAPES, MultiShapes, hsv_to_rgb


def scenes(seed=0, batch=16, **kw):
    return MultiShapes(**kw).sample(batch, torch.Generator().manual_seed(seed))


def test_every_pixel_is_in_exactly_one_mask():
    s = scenes()
    assert bool((s.masks.sum(1) == 1).all())


def test_masks_are_the_one_hot_of_labels():
    s = scenes()
    assert torch.equal(s.masks.float().argmax(1), s.labels)


def test_object_count_within_range_and_every_object_visible():
    ds = MultiShapes(min_objects=2, max_objects=4, min_visible=0.01)
    s = ds.sample(64, torch.Generator().manual_seed(1))
    assert int(s.num_objects.min()) >= 2 and int(s.num_objects.max()) <= 4
    visible = s.masks[:, 1:].sum((-1, -2))                                  # [B, max_objects]
    present = torch.arange(4)[None] < s.num_objects[:, None]
    assert bool((visible[present] >= 11).all())                            # ceil(0.01 * 32 * 32)
    assert bool((visible[~present] == 0).all())
    assert bool((s.shapes[present] >= 0).all()) and bool((s.shapes[present] < len(SHAPES)).all())
    assert bool((s.shapes[~present] == -1).all())


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b, c = scenes(seed=3), scenes(seed=3), scenes(seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_shapes_and_dtypes():
    s = scenes(batch=5, size=24, max_objects=3)
    assert s.images.shape == (5, 3, 24, 24) and s.images.dtype == torch.float32
    assert s.labels.shape == (5, 24, 24) and s.labels.dtype == torch.int64
    assert s.masks.shape == (5, 4, 24, 24) and s.masks.dtype == torch.bool
    assert s.num_objects.shape == (5,) and len(s) == 5


def test_images_in_unit_interval():
    s = scenes(batch=32)
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0


def test_objects_differ_in_colour_from_the_background():
    s = scenes(batch=32)
    bg = s.images.permute(0, 2, 3, 1)[~s.masks[:, 1:].any(1)]
    fg = s.images.permute(0, 2, 3, 1)[s.masks[:, 1:].any(1)]
    assert float(bg.max(1).values.max()) <= 0.35 + 1e-6 < 0.75 - 1e-6 <= float(fg.max(1).values.min())


def test_all_three_shapes_appear():
    s = scenes(batch=32)
    assert set(s.shapes[s.shapes >= 0].tolist()) == {0, 1, 2}


def test_hsv_to_rgb_primaries():
    hsv = torch.tensor([[0.0, 1.0, 1.0], [1 / 3, 1.0, 1.0], [2 / 3, 1.0, 1.0], [0.5, 0.0, 0.5]])
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb)


def test_plain_background_is_exactly_that_colour_outside_the_masks():
    colour = (0.1, 0.2, 0.3)
    s = scenes(batch=16, background=colour)
    bg = s.images.permute(0, 2, 3, 1)[~s.masks[:, 1:].any(1)]
    assert bg.shape[0] > 0
    assert torch.equal(bg, torch.tensor(colour, dtype=torch.float64).float().expand_as(bg))


def test_plain_background_keeps_the_objects_of_the_same_seed():
    random_bg, plain = scenes(seed=3), scenes(seed=3, background=(0.0, 0.0, 0.0))
    assert torch.equal(random_bg.labels, plain.labels)
    fg = random_bg.masks[:, 1:].any(1)[:, None].expand_as(plain.images)
    assert torch.equal(random_bg.images[fg], plain.images[fg])
    assert not torch.equal(random_bg.images, plain.images)


@pytest.mark.parametrize("kw", [{"min_objects": 0}, {"min_objects": 3, "max_objects": 2}, {"size": 4},
                                {"scale": (0.3, 0.6)}, {"background": (0.0, 0.0)}, {"background": (0.0, 0.0, 1.5)}])
def test_bad_configuration_raises(kw):
    with pytest.raises(ValueError):
        MultiShapes(**kw)
