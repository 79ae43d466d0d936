"""The slot attention autoencoder setting that the training study (`studies/training`) and the reuse benchmark
(`benchmarks/reuse.py`) share: hyperparameters, model and scenes. Both import it from here, so a change to the
study never silently changes the benchmark (and a benchmark never imports a study).

    config = {**autoencoder_settings(quick=False), **BASE_RUN, "seed": 0}
    model = build_autoencoder(config, backward="one_step")
    images = scenes(config).sample(16, torch.Generator().manual_seed(0)).images     # [16, 3, 32, 32]
"""

from __future__ import annotations

from typing import Any, Union

from .data import MultiShapes
from .estimators import Estimator
from .models import SlotAutoencoder

# the base run of the study: no gradient clipping, no learning-rate warm-up, 3 slot attention iterations
BASE_RUN: dict[str, Any] = {"clip": None, "warmup": 0, "iters": 3}


def autoencoder_settings(quick: bool) -> dict[str, Any]:
    """Hyperparameters of the setting: scenes (size, objects), model (slots, dims), training (batch, steps, lr),
    what is logged and probed and how often, evaluation, the adjoint solve of the implicit arm, and threads.
    quick: a smoke-test size (seconds, not a result)."""
    if quick:
        return dict(size=16, min_objects=1, max_objects=2, num_slots=3, slot_dim=16, channels=8, batch=4,
                    steps=6, lr=1e-3, log_every=2, probe_every=3, spectral_every=3, spectral_batch=2,
                    spectral_max_iter=20, test_scenes=8, eval_iters=[1, 3, 7], adjoint_tol=1e-4,
                    adjoint_max_iter=20, threads=1)
    return dict(size=32, min_objects=2, max_objects=3, num_slots=4, slot_dim=64, channels=32, batch=16,
                steps=1000, lr=2e-3, log_every=10, probe_every=100, spectral_every=200, spectral_batch=4,
                spectral_max_iter=100, test_scenes=128, eval_iters=[1, 2, 3, 5, 7, 10, 15], adjoint_tol=1e-4,
                adjoint_max_iter=60, threads=1)


def build_autoencoder(config: dict[str, Any], backward: Union[str, Estimator]) -> SlotAutoencoder:
    """The slot attention autoencoder of `config` (size, num_slots, slot_dim, channels, iters, seed), its slot
    attention differentiated by `backward`; deterministic given config["seed"]."""
    return SlotAutoencoder(resolution=config["size"], num_slots=config["num_slots"], slot_dim=config["slot_dim"],
                           channels=config["channels"], iters=config["iters"], backward=backward,
                           seed=config["seed"])


def scenes(config: dict[str, Any]) -> MultiShapes:
    """The scene generator of `config` (size, min_objects, max_objects)."""
    return MultiShapes(size=config["size"], min_objects=config["min_objects"], max_objects=config["max_objects"])
