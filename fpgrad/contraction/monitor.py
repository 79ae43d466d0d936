"""`GradientMonitor`: inside a training loop, every N steps, the training gradient against the exact one.

On the current batch (the caller's Map, inputs and loss), it measures the training estimator's gradient
against the exact implicit gradient at a converged z* (cosine, relative error), rho(J) at the training
iterate and at z*, the forward residual, the adjoint residual and its VJPs, and its own cost as a fraction of
a training step. It works on fresh copies of the parameters (fpgrad.gradient): the optimiser and the
model's .grad are untouched. Rows go to a JSON Lines file (one fsync'd append each) and, when
torch.utils.tensorboard imports, to TensorBoard.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import Tensor

from .._io import append_jsonl
from .spectral import SpectralState, spectral_estimate


class MonitorWarning(UserWarning):
    """The monitor saw a training gradient far from the exact one, or a map that stopped contracting."""


@dataclass
class AdaptiveWeight:
    """A penalty weight the monitor raises while rho(J) at z* is above `target`; the caller reads `.value`.

    Each check: rho > target -> value * factor (at most `maximum`); else value * decay (at least `minimum`;
    decay=1 keeps it).
    """

    value: float = 0.1
    target: float = 0.9
    factor: float = 2.0
    maximum: float = 100.0
    decay: float = 1.0
    minimum: float = 0.0
    history: list = field(default_factory=list)

    def update(self, rho: float) -> float:
        if rho > self.target:
            self.value = min(self.value * self.factor, self.maximum)
        else:
            self.value = max(self.value * self.decay, self.minimum)
        self.history.append(self.value)
        return self.value


@dataclass
class EstimatorSwitch:
    """Switch the backward estimator to `fallback` after `patience` consecutive checks with cosine < `below`.
    The monitor's `estimator(current)` then returns the fallback (and the row records it)."""

    fallback: Any = "implicit"
    below: float = 0.5
    patience: int = 1
    strikes: int = 0
    switched_at: int | None = None

    def update(self, step: int, cosine: float) -> bool:
        if self.switched_at is not None:
            return True
        self.strikes = self.strikes + 1 if cosine < self.below else 0
        if self.strikes >= self.patience:
            self.switched_at = step
        return self.switched_at is not None


def _est_name(est: Any) -> str:
    return est if isinstance(est, str) else repr(est)


def _largest(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, Tensor):
        return float(t.detach().reshape(-1).double().max()) if t.numel() else None
    return float(t)


def _final_relative_residual(fp: Any) -> float | None:
    """Largest final relative residual of a forward solve (None when the estimator ran none)."""
    trace = getattr(fp, "relative_residuals", None)
    return None if trace is None or trace.numel() == 0 else _largest(trace[-1])


def _all(flags: Any) -> bool | None:
    return None if flags is None else bool(flags.all())


class GradientMonitor:
    """Every `every` steps, measure the training gradient against the exact implicit gradient (see module doc).

    path: JSON Lines file the rows are appended to (None: rows are only kept in `.rows`).
    cosine_threshold: warn (once, then counted) when the cosine falls under it; rho_threshold: likewise when
        rho(J) at the training iterate or at z* reaches it (default 1: the map stopped contracting).
    exact: the reference estimator (default fpgrad.estimators.Implicit(): GMRES to the dtype's tolerance);
        exact_forward: the forward solver of the reference (default: fpgrad's Anderson to 1e-10 / 1e-5).
    radius_iters: warm-started power steps per check for each rho (the first check runs 60).
    adaptive: an AdaptiveWeight updated with rho(J) at z* on every check; switch: an EstimatorSwitch.
    tensorboard: a log folder; used when torch.utils.tensorboard imports, else skipped (reason in
        `.tensorboard_skipped`, warned once).
    """

    def __init__(self, path: Union[str, Path, None] = None, *, every: int = 50, cosine_threshold: float = 0.9,
                 rho_threshold: float = 1.0, exact: Any = None, exact_forward: Any = None, radius_iters: int = 10,
                 adaptive: AdaptiveWeight | None = None, switch: EstimatorSwitch | None = None,
                 tensorboard: Union[str, Path, None] = None, seed: int = 0):
        if int(every) < 1:
            raise ValueError(f"GradientMonitor: every must be >= 1, got {every}")
        self.path = None if path is None else Path(path)
        self.every = int(every)
        self.cosine_threshold = float(cosine_threshold)
        self.rho_threshold = float(rho_threshold)
        self.exact = exact
        self.exact_forward = exact_forward
        self.radius_iters = int(radius_iters)
        self.adaptive = adaptive
        self.switch = switch
        self.rows: list[dict] = []
        self.counts = {"low_cosine": 0, "rho": 0}
        gen = torch.Generator().manual_seed(int(seed))
        self._radius_states = {"train": SpectralState(generator=gen, cold_iters=60),
                               "star": SpectralState(generator=gen, cold_iters=60)}
        self._last_end: float | None = None
        self._last_step: int | None = None
        self.writer = None
        self.tensorboard_skipped: str | None = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(tensorboard))
            except ImportError as e:   # tensorboard is an optional dependency
                self.tensorboard_skipped = f"torch.utils.tensorboard does not import ({e}); pip install tensorboard"
                warnings.warn(f"GradientMonitor: TensorBoard logging skipped: {self.tensorboard_skipped}",
                              MonitorWarning, stacklevel=2)

    def due(self, i: int) -> bool:
        """Whether step i is a checking step (i % every == 0)."""
        return int(i) % self.every == 0

    def estimator(self, current: Any) -> Any:
        """The estimator to train with next: `current`, or the switch's fallback once it has switched."""
        if self.switch is not None and self.switch.switched_at is not None:
            return self.switch.fallback
        return current

    def _warn(self, key: str, message: str) -> None:
        self.counts[key] += 1
        if self.counts[key] == 1:
            warnings.warn(message + " (warned once; later cases are counted in the rows)", MonitorWarning,
                          stacklevel=3)

    def _radius(self, which: str, m, x: Tensor, z: Tensor) -> tuple[float, float]:
        state = self._radius_states[which]
        B = z.shape[0]
        stored = state.right is not None and state.right.shape[0] >= B and state.right.shape[1] == z[0].numel()
        iters = self.radius_iters if stored else state.cold_iters
        params = {k: v.detach() for k, v in m.params.items()}
        est = spectral_estimate(m.step, params, z.detach(), x.detach(), kind="radius", iters=iters,
                                right=state.right[:B] if stored else None, left=state.left[:B] if stored else None,
                                generator=state.generator, batched=True)
        state.right, state.left = est.right, est.left
        state.products.vjps += est.vjps
        state.products.jvps += est.jvps
        return float(est.value.max()), float(est.residual.max())

    def step(self, i: int, m, x: Tensor, loss_fn: Callable[[Tensor], Tensor], estimator: Any, *,
             z0: Tensor | None = None, forward: Any = None, step_seconds: float | None = None) -> dict | None:
        """Check at step i (when `due(i)`; otherwise return None at once).

        m: the Map with the current parameters (e.g. `fpgrad.maps.from_module(model)` or `map.with_params`),
        x: the current batch's inputs [B, ...], loss_fn(z*) -> scalar, estimator: the one training uses,
        z0 / forward: as the training step passes them to fpgrad.gradient / fixed_point.
        step_seconds: the training step's time; None: measured as the time between checks (less the
        monitor's own) divided by the steps between them (unknown at the first check).
        Returns the row (also appended to `path` and kept in `.rows`).
        """
        now = time.perf_counter()
        if not self.due(i):
            return None
        if step_seconds is None and self._last_end is not None and self._last_step is not None and i > self._last_step:
            step_seconds = (now - self._last_end) / (i - self._last_step)
        import fpgrad
        from fpgrad.estimators import Implicit

        t0 = time.perf_counter()
        exact = Implicit() if self.exact is None else self.exact
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g_train = fpgrad.gradient(m, x, loss_fn, estimator=estimator, z0=z0, forward=forward)
            g_exact = fpgrad.gradient(m, x, loss_fn, estimator=exact, z0=z0, forward=self.exact_forward)
        a, b = g_train.flat().double(), g_exact.flat().double()
        cosine = float((a @ b) / (a.norm() * b.norm()).clamp_min(torch.finfo(torch.float64).tiny))
        rel_error = float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))
        rho_train, rho_train_res = self._radius("train", m, x, g_train.z)
        rho_star, rho_star_res = self._radius("star", m, x, g_exact.z)
        fw, fw_exact, solve = g_train.forward, g_exact.forward, g_exact.solve
        row = {
            "step": int(i),
            "estimator": _est_name(estimator),
            "loss": float(g_train.loss),
            "cosine": cosine,
            "rel_error": rel_error,
            "rho_train": rho_train,
            "rho_train_residual": rho_train_res,
            "rho_star": rho_star,
            "rho_star_residual": rho_star_res,
            "forward_residual": _final_relative_residual(fw),
            "forward_converged": _all(getattr(fw, "converged", None)),
            "exact_forward_residual": _final_relative_residual(fw_exact),
            "exact_forward_converged": _all(getattr(fw_exact, "converged", None)),
            "adjoint_residual": _largest(getattr(solve, "residual", None)),
            "adjoint_converged": _all(getattr(solve, "converged", None)),
            "adjoint_vjps": int(g_exact.cost.vjps),
            "train_vjps": int(g_train.cost.vjps),
            "solver_warnings": len(caught),
        }
        if cosine < self.cosine_threshold:
            self._warn("low_cosine", f"GradientMonitor: at step {i} the {row['estimator']} gradient has cosine "
                       f"{cosine:.3f} to the exact implicit gradient (threshold {self.cosine_threshold}); "
                       f"rho(J) at z* is {rho_star:.3f}. Try an exact backward (Implicit) or a spectral penalty")
        rho_max = max(rho_train, rho_star)
        if rho_max >= self.rho_threshold:
            self._warn("rho", f"GradientMonitor: at step {i} rho(J) reached {rho_max:.3f} (training iterate "
                       f"{rho_train:.3f}, z* {rho_star:.3f}; threshold {self.rho_threshold}): the map no longer "
                       "contracts; add fpgrad.contraction.spectral_penalty or raise its weight")
        row["warnings_low_cosine"] = self.counts["low_cosine"]
        row["warnings_rho"] = self.counts["rho"]
        if self.adaptive is not None:
            row["penalty_weight"] = self.adaptive.update(rho_star)
        if self.switch is not None:
            self.switch.update(int(i), cosine)
        row["next_estimator"] = _est_name(self.estimator(estimator))
        seconds = time.perf_counter() - t0
        row["monitor_seconds"] = seconds
        row["step_seconds"] = step_seconds
        row["fraction_of_step"] = None if not step_seconds else seconds / step_seconds
        row["amortised_fraction"] = None if not step_seconds else seconds / (self.every * step_seconds)
        self.rows.append(row)
        if self.path is not None:
            append_jsonl(self.path, row)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(f"fpgrad/{key}", value, int(i))
        self._last_end = time.perf_counter()
        self._last_step = int(i)
        return row
