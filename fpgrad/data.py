"""Procedural multi-object scenes with ground-truth masks: coloured circles, squares and triangles on a
plain background, made in code from a `torch.Generator` (nothing to download).

    scenes = fpgrad.data.MultiShapes(size=32).sample(32, generator=torch.Generator().manual_seed(0))
    scenes.images [B, 3, H, W] in [0, 1]; scenes.labels [B, H, W] (0 = background, i = object i);
    scenes.masks [B, 1 + max_objects, H, W] (a partition: every pixel in exactly one mask)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes.

    images: [B, 3, H, W] float32 in [0, 1].
    labels: [B, H, W] int64; 0 = background, i in 1..max_objects = the i-th object's visible pixels.
    masks: [B, 1 + max_objects, H, W] bool, one-hot of `labels` (channel 0 = background); every pixel
        is in exactly one mask; an absent object's mask is empty.
    num_objects: [B] int64, objects in each scene (each has at least `min_visible` visible pixels).
    shapes: [B, max_objects] int64 index into SHAPES (-1 for an absent object).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    num_objects: Tensor
    shapes: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class MultiShapes:
    """Scenes of `min_objects`..`max_objects` shapes (circle, square, triangle; random position, size,
    rotation and colour) painted in order on a plain background; later shapes occlude earlier ones.

    size: image side in pixels. scale: range of a shape's half-extent as a fraction of the side.
    min_visible: fraction of the image each object must keep visible after occlusion (scenes that
    miss it are redrawn, from the same generator, so a seed still fixes the batch).
    Object colours are saturated and bright (HSV s in [0.6, 1], v in [0.75, 1]); the background is
    dark (v in [0, 0.35]), so every object differs from the background.
    background: None (default) for that random dark colour per scene, or an RGB triple in [0, 1] for a
    plain background of that one colour in every scene (the random draws are unchanged, so a seed gives the
    same objects with either background).
    """

    size: int = 32
    min_objects: int = 2
    max_objects: int = 4
    scale: tuple[float, float] = (0.12, 0.24)
    min_visible: float = 0.01
    max_redraws: int = 100
    background: tuple[float, float, float] | None = None

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"MultiShapes: need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                             f"{self.max_objects}")
        if self.size < 8:
            raise ValueError(f"MultiShapes: size must be >= 8 pixels, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi < 0.5:
            raise ValueError(f"MultiShapes: scale must satisfy 0 < lo <= hi < 0.5, got {self.scale}")
        if self.background is not None and (len(self.background) != 3
                                            or not all(0.0 <= float(c) <= 1.0 for c in self.background)):
            raise ValueError(f"MultiShapes: background must be None or an RGB triple in [0, 1], got {self.background}")

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Scenes:
        """`batch` scenes drawn from `generator` (CPU tensors)."""
        if batch < 1:
            raise ValueError(f"MultiShapes.sample: batch must be >= 1, got {batch}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        H = self.size
        min_pixels = max(1, math.ceil(self.min_visible * H * H))
        params = self._draw(batch, g)
        labels = self._labels(params)
        for _ in range(self.max_redraws):
            bad = self._too_hidden(labels, params["count"], min_pixels)
            if not bool(bad.any()):
                break
            idx = bad.nonzero().reshape(-1)
            fresh = self._draw(len(idx), g)
            for k in params:
                params[k][idx] = fresh[k]
            labels[idx] = self._labels(fresh)
        else:
            raise RuntimeError(f"MultiShapes: could not place {self.max_objects} objects with {min_pixels} visible "
                               f"pixels each in {self.max_redraws} redraws; lower max_objects or scale, or raise size")
        images = self._paint(labels, params)
        M = self.max_objects
        masks = labels[:, None] == torch.arange(M + 1)[None, :, None, None]
        present = torch.arange(M)[None, :] < params["count"][:, None]
        shapes = torch.where(present, params["shape"], torch.full_like(params["shape"], -1))
        return Scenes(images, labels, masks, params["count"].clone(), shapes)

    # ---- pieces -------------------------------------------------------------------------------------
    def _draw(self, batch: int, g: torch.Generator) -> dict[str, Tensor]:
        M = self.max_objects
        lo, hi = self.scale

        def rand(*shape):
            return torch.rand(*shape, generator=g, dtype=torch.float64)
        count = torch.randint(self.min_objects, M + 1, (batch,), generator=g)
        radius = lo + (hi - lo) * rand(batch, M)
        centre = radius[..., None] + (1 - 2 * radius[..., None]) * rand(batch, M, 2)   # inside the image
        return {
            "count": count,
            "shape": torch.randint(0, len(SHAPES), (batch, M), generator=g),
            "radius": radius,
            "centre": centre,
            "angle": 2 * math.pi * rand(batch, M),
            "hsv": torch.stack([rand(batch, M), 0.6 + 0.4 * rand(batch, M), 0.75 + 0.25 * rand(batch, M)], -1),
            "background": torch.stack([rand(batch), 0.5 * rand(batch), 0.35 * rand(batch)], -1),
        }

    def _labels(self, p: dict[str, Tensor]) -> Tensor:
        """[B, H, W]: index of the topmost object covering each pixel (0 = background)."""
        B, M = p["radius"].shape
        H = self.size
        t = (torch.arange(H, dtype=torch.float32) + 0.5) / H
        yy, xx = torch.meshgrid(t, t, indexing="ij")                                    # [H, W]
        centre, angle = p["centre"].float(), p["angle"].float()
        dx = xx[None, None] - centre[..., 0, None, None]                                 # [B, M, H, W]
        dy = yy[None, None] - centre[..., 1, None, None]
        cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy                                # rotated frame
        r = p["radius"].float()[..., None, None]
        circle = u ** 2 + v ** 2 <= r ** 2
        square = (u.abs() <= r * 0.85) & (v.abs() <= r * 0.85)                           # similar area to the circle
        # equilateral triangle with circumradius r: three half-planes u . n_k <= r / 2
        tri = torch.ones_like(circle)
        for k in range(3):
            a = 2 * math.pi * k / 3
            tri &= u * math.cos(a) + v * math.sin(a) <= r / 2
        inside = torch.stack([circle, square, tri], 0)                                   # [3, B, M, H, W]
        cover = inside.gather(0, p["shape"][None, ..., None, None].expand(1, B, M, H, H))[0]
        cover &= (torch.arange(M)[None, :] < p["count"][:, None])[..., None, None]
        labels = torch.zeros(B, H, H, dtype=torch.long)
        for i in range(M):                                                              # painter's order
            labels = torch.where(cover[:, i], torch.full_like(labels, i + 1), labels)
        return labels

    def _too_hidden(self, labels: Tensor, count: Tensor, min_pixels: int) -> Tensor:
        M = self.max_objects
        visible = (labels[:, None] == torch.arange(1, M + 1)[None, :, None, None]).sum((-1, -2))   # [B, M]
        present = torch.arange(M)[None, :] < count[:, None]
        return ((visible < min_pixels) & present).any(1)

    def _paint(self, labels: Tensor, p: dict[str, Tensor]) -> Tensor:
        colours = torch.cat([p["background"][:, None], p["hsv"]], 1)                     # [B, 1 + M, 3]
        rgb = hsv_to_rgb(colours)
        if self.background is not None:
            rgb[:, 0] = torch.tensor([float(c) for c in self.background], dtype=rgb.dtype)
        B, H, W = labels.shape
        idx = labels.reshape(B, H * W, 1).expand(B, H * W, 3)
        image = rgb.gather(1, idx).reshape(B, H, W, 3).permute(0, 3, 1, 2)
        return image.clamp(0, 1).to(torch.float32).contiguous()


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """[..., 3] HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = hsv.unbind(-1)
    k = torch.stack([(5 + 6 * h) % 6, (3 + 6 * h) % 6, (1 + 6 * h) % 6], -1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[..., None] - v[..., None] * s[..., None] * f


__all__ = ["SHAPES", "MultiShapes", "Scenes", "hsv_to_rgb"]
