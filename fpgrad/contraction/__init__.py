"""Contraction control: penalties a training loss adds to keep the map contractive, and a monitor that runs
inside the training loop.

    penalty = frobenius_penalty(step, params, z_star, x, generator=g)            # ||J||_F^2 / n (Hutchinson)
    penalty = spectral_penalty(step, params, z_star, x, state=state, target=0.9)  # max(0, rho(J) - 0.9)
    loss = fixed_point_correction(step, params, x, z0, [6, 12, 18, 24], loss_fn)  # loss on iterates
    row = monitor.step(i, m, x, loss_fn, estimator)                               # every N steps

z_star is the state the backward linearises at (e.g. fpgrad.fixed_point's output): penalties take J at it
(detached) and are differentiable in params. Products with J are counted (ProductCount or a CostRecord).
"""

from .._io import append_jsonl, read_jsonl
from ._products import ProductCount
from .correction import correction_weights, fixed_point_correction
from .frobenius import draw_probes, frobenius_exact, frobenius_penalty
from .monitor import AdaptiveWeight, EstimatorSwitch, GradientMonitor, MonitorWarning
from .spectral import SpectralEstimate, SpectralState, dense_radius, spectral_estimate, spectral_penalty

__all__ = [
    "AdaptiveWeight",
    "EstimatorSwitch",
    "GradientMonitor",
    "MonitorWarning",
    "ProductCount",
    "SpectralEstimate",
    "SpectralState",
    "append_jsonl",
    "correction_weights",
    "dense_radius",
    "draw_probes",
    "fixed_point_correction",
    "frobenius_exact",
    "frobenius_penalty",
    "read_jsonl",
    "spectral_estimate",
    "spectral_penalty",
]
