"""The training study's runs: its grid of configurations and what one configuration does (train one slot
attention autoencoder, probing its gradients and spectrum along the way, then evaluate it), returning one row."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Any

import torch

import fpgrad
from fpgrad.compare import cosine
from fpgrad.data import MultiShapes
from fpgrad.errors import ConvergenceWarning, FPGradError
from fpgrad.estimators import Estimator, Implicit, get_estimator
from fpgrad.jacobian import relative_residual
from fpgrad.metrics import foreground_ari
from fpgrad.models import SlotAutoencoder
from fpgrad.setting import BASE_RUN, autoencoder_settings, build_autoencoder
from fpgrad.setting import scenes as scene_generator
from fpgrad.spectral import spectral_radius
from fpgrad.study_tools import torch_threads

ESTIMATORS = ("unrolled", "one_step", "implicit")
LABELS = {"unrolled": "unrolled (BPTT)", "one_step": "one-step (Chang et al.)", "implicit": "implicit (GMRES)"}
ABLATIONS = ("base", "clip", "warmup", "iters7")
ABLATION_TEXT = {"base": "no clipping, no warm-up, 3 iterations", "clip": "gradient clipping",
                 "warmup": "learning-rate warm-up", "iters7": "7 training iterations"}
SPIKE_FACTOR = 5.0           # a step whose gradient norm exceeds 5x the running median is a spike
SPIKE_WINDOW = 100           # the running median is over the previous 100 steps
SPIKE_MIN_HISTORY = 20       # and is only trusted after 20 steps
TEST_SEED = 2 ** 31 - 1      # the test scenes are the same for every configuration
EXAMPLES = 4                 # test scenes kept (as uint8) in the seed-0 rows for the example figure


# ---- the grid ---------------------------------------------------------------------------------------

def settings(quick: bool) -> dict[str, Any]:
    """Hyperparameters shared by every configuration (stored in each config, so they key the rows): the
    setting's (fpgrad.setting.autoencoder_settings, shared with benchmarks/reuse.py)."""
    return autoencoder_settings(quick)


def ablation_settings(ablation: str, base: dict) -> dict[str, Any]:
    """clip: max gradient norm (None = off); warmup: linear warm-up steps; iters: training iterations."""
    out = dict(BASE_RUN)
    if ablation == "clip":
        out["clip"] = 0.05
    elif ablation == "warmup":
        out["warmup"] = max(1, base["steps"] // 5)
    elif ablation == "iters7":
        out["iters"] = 7
    elif ablation != "base":
        raise ValueError(f"training: unknown ablation {ablation!r}; choose one of {ABLATIONS}")
    return out


def grid(quick: bool) -> list[dict]:
    """estimator x seed (3 seeds) in the base setting; on seed 0 the ablations `clip`, `warmup` and `iters7`
    for the unrolled and one-step estimators (the paper's vanilla vs implicit comparison).
    quick: one seed, the ablations on the one-step estimator only."""
    base = settings(quick)
    seeds = [0] if quick else [0, 1, 2]
    ablated = {"base": ESTIMATORS, "clip": ("unrolled", "one_step"), "warmup": ("unrolled", "one_step"),
               "iters7": ("unrolled", "one_step")}
    configs = []
    for ablation in ABLATIONS:
        for estimator in ablated[ablation]:
            if quick and ablation != "base" and estimator != "one_step":
                continue
            for seed in (seeds if ablation == "base" else [0]):
                configs.append({"estimator": estimator, "ablation": ablation, "seed": seed, **base,
                                **ablation_settings(ablation, base)})
    return configs


# ---- one run ----------------------------------------------------------------------------------------

def backward_of(config: dict) -> Estimator:
    """The training estimator of a configuration (the implicit one with the configured GMRES budget)."""
    if config["estimator"] == "implicit":
        return exact_estimator(config)
    return get_estimator(config["estimator"], iters=config["iters"])


def exact_estimator(config: dict) -> Implicit:
    """Implicit(GMRES) with one unrestarted cycle of `adjoint_max_iter` steps to relative residual `adjoint_tol`."""
    return Implicit(solver="gmres", tol=config["adjoint_tol"], max_iter=config["adjoint_max_iter"],
                    options={"restart": config["adjoint_max_iter"]})


def build_model(config: dict, backward: Estimator | str | None = None) -> SlotAutoencoder:
    """The setting's autoencoder (fpgrad.setting.build_autoencoder), trained with the configuration's estimator
    unless `backward` is given."""
    return build_autoencoder(config, backward_of(config) if backward is None else backward)


def dataset(config: dict) -> MultiShapes:
    return scene_generator(config)


def learning_rate(config: dict, step: int) -> float:
    warm = config["warmup"]
    return config["lr"] * (min(1.0, (step + 1) / warm) if warm else 1.0)


def grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def relative_residual_at_output(model: SlotAutoencoder, out) -> float:
    """Mean relative forward residual ||f(z_T) - z_T|| / ||f(z_T)|| at the slots the decoder saw, z_T.

    From the CostRecord's FixedPoint when its last iterate is z_T (adjoint estimators: implicit). The one-step
    estimator's solve stops at z_{T-1} (its T-th step is on the tape) and the unrolled estimator iterates on the
    tape without a FixedPoint, so for them f(z_T) is evaluated here once.
    """
    if out.record.forward and model.slot_attention.estimator().adjoint:
        return float(out.record.forward[-1].relative_residuals[-1].mean())
    m = model.slot_attention.as_map()
    with torch.no_grad():
        z = out.slots.detach()
        fz = m.step(m.params, z, out.tokens.detach())
    return float(relative_residual(z, fz).mean())


def probe_gradients(model: SlotAutoencoder, probes: dict[str, SlotAutoencoder], images: torch.Tensor,
                    noise_seed: int) -> dict[str, float]:
    """Gradients of the same batch's loss by one-step, unrolled and implicit (same slot init), without
    stepping: their cosines to the implicit gradient, over all parameters and over slot attention's."""
    grads = {}
    extra = {}
    for name, probe in probes.items():
        probe.load_state_dict(model.state_dict())
        probe.train()
        out = probe(images, generator=torch.Generator().manual_seed(noise_seed))
        params = [p for p in probe.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            g = torch.autograd.grad(out.loss(images), params, allow_unused=True)
        flat = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True)]
        names = [n for n, _ in probe.named_parameters()]
        in_slot_attention = [t.reshape(-1) for n, t in zip(names, flat, strict=True) if n.startswith("slot_attention.")]
        grads[name] = (torch.cat([t.reshape(-1) for t in flat]), torch.cat(in_slot_attention))
        if name == "implicit" and out.record.solves:
            extra["probe_adjoint_converged"] = float(out.record.solves[-1].converged.float().mean())
    ref_all, ref_sa = grads["implicit"]
    result = {}
    for name in ("one_step", "unrolled"):
        result[f"cosine_{name}_all"] = cosine(grads[name][0], ref_all)
        result[f"cosine_{name}_slot_attention"] = cosine(grads[name][1], ref_sa)
        result[f"norm_ratio_{name}"] = float(grads[name][0].norm() / ref_all.norm().clamp_min(1e-30))
    result.update(extra)
    return result


def spectral_probe(model: SlotAutoencoder, images: torch.Tensor, config: dict) -> dict[str, float]:
    """rho(J) at the T-th iterate z_T (where the estimators linearise) and at the fixed point z* found by
    Anderson acceleration from z_T (float64, tol 1e-6, 200 steps), by the batched power method; mean and
    max over the probe batch, with the fraction of samples whose z* converged."""
    model.eval()
    with torch.no_grad():
        out = model(images, generator=torch.Generator().manual_seed(TEST_SEED), iters=config["iters"])
    m = model.slot_attention.as_map()
    m = m.with_params({k: v.double() for k, v in m.params.items()})
    x, z_T = out.tokens.detach().double(), out.slots.double()
    options = dict(method="power", tol=1e-3, max_iter=config["spectral_max_iter"], check_fixed_point=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        rho_T = spectral_radius(m, x, z_T, **options)
        try:
            sol = fpgrad.solve(m, x, z0=z_T, method="anderson", tol=1e-6, max_iter=200)
            rho_star = spectral_radius(m, x, sol.z, **options)
            converged = float(sol.converged.float().mean())
        except (FPGradError, RuntimeError):      # a failed solve is recorded as NaN, not hidden
            rho_star, converged = torch.full_like(rho_T, math.nan), math.nan
    model.train()
    return {"rho_T": float(rho_T.mean()), "rho_T_max": float(rho_T.max()), "rho_star": float(rho_star.mean()),
            "rho_star_max": float(rho_star.max()), "fixed_point_converged": converged}


def evaluate(model: SlotAutoencoder, scenes, iters_list: list[int], batch: int = 64) -> dict[str, list[float]]:
    """FG-ARI (argmax of the alpha masks over slots vs the true objects) and reconstruction MSE on the test
    scenes, per test-time iteration count."""
    model.eval()
    fg_ari, mse = [], []
    for iters in iters_list:
        aris, errs = [], []
        noise = torch.Generator().manual_seed(TEST_SEED)
        with torch.no_grad():
            for i in range(0, len(scenes), batch):
                images = scenes.images[i:i + batch]
                out = model(images, generator=noise, iters=iters)
                aris.append(foreground_ari(scenes.labels[i:i + batch], out.segmentation()))
                errs.append(((out.reconstruction - images) ** 2).mean((1, 2, 3)).double())
        fg_ari.append(float(torch.cat(aris).nanmean()))
        mse.append(float(torch.cat(errs).mean()))
    model.train()
    return {"fg_ari": fg_ari, "mse": mse}


def examples(model: SlotAutoencoder, scenes, iters_list: list[int]) -> dict[str, Any]:
    """The first EXAMPLES test scenes as uint8: image, true labels and, per iteration count, the
    reconstruction and the alpha masks (kept in the row so the figure needs no model)."""
    model.eval()
    images = scenes.images[:EXAMPLES]
    out = {"image": (images * 255).round().to(torch.uint8).tolist(), "labels": scenes.labels[:EXAMPLES].tolist(),
           "iters": list(iters_list), "reconstruction": [], "masks": []}
    with torch.no_grad():
        for iters in iters_list:
            res = model(images, generator=torch.Generator().manual_seed(TEST_SEED), iters=iters)
            out["reconstruction"].append((res.reconstruction.clamp(0, 1) * 255).round().to(torch.uint8).tolist())
            out["masks"].append((res.masks * 255).round().to(torch.uint8).tolist())
    model.train()
    return out


def train(config: dict) -> dict[str, Any]:
    """Train one model and return its row: curves and evaluation (see the package docstring)."""
    with torch_threads(config.get("threads") or torch.get_num_threads()):
        return _train(config)


def _train(config: dict) -> dict[str, Any]:
    t_start, started_at = time.perf_counter(), time.time()
    seed = int(config["seed"])
    data = dataset(config)
    data_gen = torch.Generator().manual_seed(1000 * seed + 1)
    noise_gen = torch.Generator().manual_seed(1000 * seed + 2)
    test = data.sample(config["test_scenes"], torch.Generator().manual_seed(TEST_SEED))
    probe_images = test.images[:config["spectral_batch"]]
    model = build_model(config)
    probes = {name: build_model(config, exact_estimator(config) if name == "implicit" else name)
              for name in ESTIMATORS}
    optimiser = torch.optim.Adam(model.parameters(), lr=config["lr"])
    steps, clip = config["steps"], config["clip"]
    series: dict[str, list] = {k: [] for k in ("log_step", "loss", "grad_norm_logged", "residual", "adjoint_converged",
                                                "adjoint_matvecs", "step_seconds")}
    probes_log: dict[str, list] = {"probe_step": []}
    spectral_log: dict[str, list] = {"spectral_step": []}
    all_grad_norms: list[float] = []
    losses: list[float] = []
    spikes, clipped, failed, unconverged = [], 0, 0, 0
    diverged_at = None
    seconds_train = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        images = data.sample(config["batch"], data_gen).images
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config, step)
        with warnings.catch_warnings(record=True):      # convergence is read from the record below
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                out = model(images, generator=noise_gen)
                loss = out.loss(images)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
            except FPGradError as e:            # e.g. a diverged adjoint solve: skip this step, never hide it
                failed += 1
                optimiser.zero_grad(set_to_none=True)
                errors = series.setdefault("errors", [])
                if len(errors) < 20:
                    errors.append(f"step {step}: {type(e).__name__}: {e}")
                if failed > max(5, steps // 10):
                    diverged_at = step
                    break
                continue
        # adjoint solves that stopped short of their tolerance (other ConvergenceWarnings, e.g. "z_T is not a
        # fixed point", hold at every step by construction and are documented in the README)
        unconverged += any(not bool(sol.converged.all()) for sol in out.record.solves)
        norm = grad_norm(model)
        loss_value = float(loss.detach())
        if not (math.isfinite(norm) and math.isfinite(loss_value)):
            diverged_at = step
            losses.append(loss_value)
            all_grad_norms.append(norm)
            break
        history = all_grad_norms[-SPIKE_WINDOW:]
        if len(history) >= SPIKE_MIN_HISTORY and norm > SPIKE_FACTOR * statistics.median(history):
            spikes.append(step)
        all_grad_norms.append(norm)
        losses.append(loss_value)
        if clip is not None:
            clipped += norm > clip
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimiser.step()
        seconds_train += time.perf_counter() - t0
        if step % config["log_every"] == 0 or step == steps - 1:
            series["log_step"].append(step)
            series["loss"].append(loss_value)
            series["grad_norm_logged"].append(norm)
            series["residual"].append(relative_residual_at_output(model, out))
            solves = out.record.solves
            series["adjoint_converged"].append(float(solves[-1].converged.float().mean()) if solves else math.nan)
            series["adjoint_matvecs"].append(int(solves[-1].matvecs) if solves else 0)
            series["step_seconds"].append(time.perf_counter() - t0)
        if step % config["probe_every"] == 0 or step == steps - 1:
            probe = probe_gradients(model, probes, images, 10_000 + step)
            probes_log["probe_step"].append(step)
            for k, v in probe.items():
                probes_log.setdefault(k, []).append(v)
        if step % config["spectral_every"] == 0 or step == steps - 1:
            spec = spectral_probe(model, probe_images, config)
            spectral_log["spectral_step"].append(step)
            for k, v in spec.items():
                spectral_log.setdefault(k, []).append(v)
    evaluation = evaluate(model, test, config["eval_iters"])
    row: dict[str, Any] = {
        "steps_done": len(losses), "diverged_at": diverged_at, "failed_steps": failed,
        "adjoint_unconverged_steps": unconverged, "clipped_steps": int(clipped),
        "spikes": len(spikes), "spike_steps": spikes, "losses": losses, "grad_norms": all_grad_norms,
        **series, **probes_log, **spectral_log,
        "eval_iters": list(config["eval_iters"]), **evaluation,
        "train_seconds": seconds_train, "seconds": time.perf_counter() - t_start,
        "started_at": started_at, "finished_at": time.time(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    if seed == 0 and config["ablation"] in ("base", "iters7"):
        row["examples"] = examples(model, test, sorted({config["iters"], max(config["eval_iters"])}))
    return row
