"""The slot attention autoencoder (Locatello et al. 2020) with `fpgrad.nn.ImplicitSlotAttention` inside.

    model = SlotAutoencoder(resolution=32, num_slots=5, slot_dim=64, iters=3, backward="implicit", seed=0)
    out = model(images, generator=g)           # images [B, 3, H, W] in [0, 1]
    loss = out.loss(images)                    # MSE of out.reconstruction; out.masks [B, K, H, W]

CNN encoder + soft position embedding -> tokens [B, N, slot_dim] -> slot attention to a fixed point ->
spatial broadcast decoder: per slot an RGB image and an alpha logit; alphas softmaxed over slots;
reconstruction = sum_k mask_k * rgb_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .estimators import CostRecord, Estimator
from .forward import Iterate
from .nn import ImplicitSlotAttention


def position_grid(height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[H, W, 4] coordinates (y, x, 1 - y, 1 - x) in [0, 1], as in Locatello et al."""
    ys = torch.linspace(0.0, 1.0, height, dtype=dtype)
    xs = torch.linspace(0.0, 1.0, width, dtype=dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy, xx, 1.0 - yy, 1.0 - xx], -1)


class SoftPositionEmbedding(nn.Module):
    """Adds a learned linear projection of the coordinate grid to a feature map [B, C, H, W]."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.proj = nn.Linear(4, channels)
        self.register_buffer("grid", position_grid(height, width), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        return features + self.proj(self.grid).permute(2, 0, 1)[None]


class Encoder(nn.Module):
    """images [B, 3, H, W] -> tokens [B, N, dim]: 5x5 convolutions (the second with stride 2, so
    N = (H/2)(W/2)), soft position embedding, LayerNorm, a two-layer MLP."""

    def __init__(self, resolution: int, channels: int, dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, channels, 5, padding=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 5, padding=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 5, padding=2), nn.ReLU(),
        )
        side = (resolution + 1) // 2
        self.position = SoftPositionEmbedding(channels, side, side)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, images: Tensor) -> Tensor:
        h = self.position(self.convs(images))
        h = h.flatten(2).transpose(1, 2)                                              # [B, N, C]
        return self.mlp(self.norm(h))


class SpatialBroadcastDecoder(nn.Module):
    """slots [B, K, dim] -> (rgb [B, K, 3, H, W], alpha logits [B, K, H, W]).

    Each slot is tiled on a `broadcast` x `broadcast` grid with a soft position embedding, mixed by a 3x3
    convolution, upsampled by stride-2 transposed convolutions (4x4) to the image resolution and mapped to
    RGB + alpha by a 1x1 convolution (a lighter variant of Locatello et al.'s CLEVR decoder).
    broadcast = resolution gives the full-resolution decoder (no upsampling) that Locatello et al. use on the
    small synthetic data sets (Multi-dSprites, Tetrominoes). layers: extra `kernel` x `kernel` convolutions
    (stride 1, ReLU) at the image resolution before the 1x1 output convolution (default 0: none).
    first_kernel: the first convolution's kernel (default 3); 1 makes it a per-pixel linear map of slot +
    position embedding, as in Watters et al.'s decoder, and about 9x cheaper at full resolution.
    """

    def __init__(self, resolution: int, dim: int, channels: int, broadcast: int = 8, *, layers: int = 0,
                 kernel: int = 3, first_kernel: int = 3):
        super().__init__()
        if layers < 0 or any(k < 1 or k % 2 == 0 for k in (kernel, first_kernel)):
            raise ValueError(f"SpatialBroadcastDecoder: need layers >= 0 and odd kernels >= 1, got layers={layers}, "
                             f"kernel={kernel}, first_kernel={first_kernel}")
        ups = int(round(math.log2(resolution / broadcast))) if resolution >= broadcast else -1
        if ups < 0 or broadcast * 2 ** ups != resolution:
            raise ValueError(f"SpatialBroadcastDecoder: resolution {resolution} must be broadcast ({broadcast}) "
                             "times a power of two")
        self.broadcast = broadcast
        self.position = SoftPositionEmbedding(dim, broadcast, broadcast)
        net: list[nn.Module] = [nn.Conv2d(dim, channels, first_kernel, padding=first_kernel // 2), nn.ReLU()]
        cin = channels
        for i in range(ups):
            cout = channels if i < ups - 1 else max(4, channels // 2)
            net += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            cin = cout
        for _ in range(layers):
            net += [nn.Conv2d(cin, cin, kernel, padding=kernel // 2), nn.ReLU()]
        net += [nn.Conv2d(cin, 4, 1)]
        self.net = nn.Sequential(*net)

    def forward(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        B, K, D = slots.shape
        h = slots.reshape(B * K, D, 1, 1).expand(B * K, D, self.broadcast, self.broadcast)
        out = self.net(self.position(h))
        out = out.reshape(B, K, 4, *out.shape[-2:])
        return torch.sigmoid(out[:, :, :3]), out[:, :, 3]


@dataclass
class AutoencoderOutput:
    """What `SlotAutoencoder.forward` returns.

    reconstruction: [B, 3, H, W]; masks: [B, K, H, W] (softmax over slots: they sum to one);
    rgb: [B, K, 3, H, W] per-slot images; slots: [B, K, dim]; tokens: [B, N, dim] encoder output;
    record: the CostRecord of the slot attention solve (`record.forward`: FixedPoint results, empty
    for the unrolled estimator, which runs its iterations on the tape).
    """

    reconstruction: Tensor
    masks: Tensor
    rgb: Tensor
    slots: Tensor
    tokens: Tensor
    record: CostRecord

    def loss(self, images: Tensor) -> Tensor:
        """Mean squared reconstruction error (scalar)."""
        return F.mse_loss(self.reconstruction, images)

    def segmentation(self) -> Tensor:
        """[B, H, W] the slot with the largest alpha mask at each pixel."""
        return self.masks.argmax(1)


class SlotAutoencoder(nn.Module):
    """Encoder -> ImplicitSlotAttention -> spatial broadcast decoder; trained on reconstruction.

    backward: the slot attention gradient ("unrolled", "one_step", "implicit", ... or an Estimator);
    iters: applications of the slot attention step that make the slots, in training and evaluation
    (unless `forward(iters=...)`), the same for every estimator so that only the gradient differs: the
    one-step estimator runs iters - 1 of them without the tape and the last on it.
    seed: every parameter is drawn from a torch.Generator seeded with it (no global RNG).
    broadcast, decoder_channels (default `channels`), decoder_layers, decoder_kernel, decoder_first_kernel: the
    decoder's grid side, width, extra full-resolution convolutions, their kernel and the first convolution's
    kernel (see SpatialBroadcastDecoder).
    tol, forward: the slot attention's forward (ImplicitSlotAttention): None (default) applies the step exactly
    `iters` times; a tolerance solves per sample to it with `forward` ("iterate" | "anderson" | "broyden"),
    `iters` being the cap (the exact implicit gradient at a converged z*).
    slot_embedding: ImplicitSlotAttention's learned per-slot query offsets (slots no longer interchangeable).
    """

    def __init__(self, *, resolution: int = 32, num_slots: int = 5, slot_dim: int = 64, channels: int = 32,
                 iters: int = 3, backward: Union[str, Estimator] = "one_step", hidden_dim: int | None = None,
                 broadcast: int = 8, seed: int = 0, decoder_channels: int | None = None, decoder_layers: int = 0,
                 decoder_kernel: int = 3, decoder_first_kernel: int = 3, tol: float | None = None,
                 forward: str = "iterate", slot_embedding: bool = False):
        super().__init__()
        self.resolution, self.num_slots, self.slot_dim = resolution, num_slots, slot_dim
        if iters < 1:
            raise ValueError(f"SlotAutoencoder: iters must be >= 1, got {iters}")
        self.encoder = Encoder(resolution, channels, slot_dim)
        self._iters = iters
        module_iters = iters      # ImplicitSlotAttention applies the step `iters` times for every estimator
        self.slot_attention = ImplicitSlotAttention(slot_dim, num_slots, module_iters, backward=backward,
                                                    hidden_dim=hidden_dim or 2 * slot_dim, seed=seed, tol=tol,
                                                    forward=forward, slot_embedding=slot_embedding)
        self.decoder = SpatialBroadcastDecoder(resolution, slot_dim, decoder_channels or channels, broadcast,
                                               layers=decoder_layers, kernel=decoder_kernel,
                                               first_kernel=decoder_first_kernel)
        generator = torch.Generator().manual_seed(int(seed) + 1)
        for module in (self.encoder, self.decoder):
            reset_parameters(module, generator)

    @property
    def iters(self) -> int:
        """Applications of the slot attention step per forward pass."""
        return self._iters

    def decode(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """slots [B, K, D] -> (reconstruction [B, 3, H, W], masks [B, K, H, W], rgb [B, K, 3, H, W])."""
        rgb, logits = self.decoder(slots)
        masks = logits.softmax(dim=1)
        return (masks[:, :, None] * rgb).sum(1), masks, rgb

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None,
                iters: int | None = None) -> AutoencoderOutput:
        """images [B, 3, H, W]. generator: for the initial slots.

        iters=None: the slot attention module as configured (differentiable by its `backward`).
        iters=T: exactly T plain iterations without a gradient through the slots (evaluation with more,
        or fewer, test-time iterations than in training).
        """
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.resolution:
            raise ValueError(f"SlotAutoencoder: images must be [B, 3, {self.resolution}, {self.resolution}], "
                             f"got {tuple(images.shape)}")
        tokens = self.encoder(images)
        if iters is None:
            slots, record = self.slot_attention(tokens, generator=generator, return_info=True)
        else:
            m = self.slot_attention.as_map()
            with torch.no_grad():
                z0 = m.init_state(tokens, generator)
                solver = Iterate.exactly(iters)
                fp = solver.solve(m.step, m.params, tokens.detach(), z0)
            record = CostRecord(forward_steps=fp.evaluations, forward=[fp])
            slots = fp.z
        reconstruction, masks, rgb = self.decode(slots)
        return AutoencoderOutput(reconstruction, masks, rgb, slots, tokens, record)


def reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """torch's default init for Linear / Conv / ConvTranspose (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight
    and bias), drawn from `generator`; LayerNorm to (1, 0)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(sub.weight)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                sub.weight.uniform_(-bound, bound, generator=generator)
                if sub.bias is not None:
                    sub.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(sub, nn.LayerNorm):
            with torch.no_grad():
                sub.weight.fill_(1.0)
                sub.bias.zero_()


__all__ = ["AutoencoderOutput", "Encoder", "SlotAutoencoder", "SoftPositionEmbedding", "SpatialBroadcastDecoder",
           "position_grid", "reset_parameters"]
