"""Compare gradient estimators against an exact reference: relative error, cosine and cost per estimator."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from ._gradient import gradient
from .errors import FPGradError
from .estimators import Estimator, Gradient, Implicit, get_estimator
from .forward import ForwardSolver
from .maps import Map


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """||estimate - reference|| / ||reference||  (inf when the reference is zero and the estimate is not)."""
    den = float(reference.norm())
    num = float((estimate - reference).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def cosine(estimate: Tensor, reference: Tensor) -> float:
    """<estimate, reference> / (||estimate|| ||reference||); NaN if either is zero."""
    den = float(estimate.norm()) * float(reference.norm())
    return float((estimate * reference).sum()) / den if den > 0 else math.nan


def flat_gradient(g: Gradient, keys: Sequence[str] | None = None) -> Tensor:
    keys = sorted(g.params) if keys is None else list(keys)
    return torch.cat([g.params[k].reshape(-1) for k in keys])


def compare_estimators(m: Map, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
                       estimators: Sequence[Union[Estimator, str]], *,
                       reference: Union[Estimator, Gradient, None] = None, z0: Tensor | None = None,
                       forward: Union[str, ForwardSolver, None] = None, keys: Sequence[str] | None = None,
                       generator_seed: int = 0, labels: Sequence[str] | None = None) -> list[dict]:
    """One row per estimator: relative error and cosine of its parameter gradient (over `keys`, default
    all params) against `reference` (default Implicit(solver="gmres") at a tight tolerance), with its cost
    and `adjoint_residual` (the exact solve's, or what Neumann / Phantom leave; NaN for taped estimators).

    Every estimator sees the same z0 (default: m.init_state drawn with `generator_seed` inside each
    gradient call, so that estimators reaching the initialisation give its parameters a gradient). An
    estimator that raises (e.g. a divergent Neumann series) gives a row with its error message and
    NaN numbers, never a silently wrong number.
    """
    def gen():
        # a fresh generator per call: every estimator starts from the same initial state, built from the
        # params inside fpgrad.gradient so that the slot initialisation can receive a gradient
        return None if z0 is not None else torch.Generator(device="cpu").manual_seed(generator_seed)

    if isinstance(reference, Gradient):
        ref = reference
    else:
        tol = 1e-11 if m.dtype == torch.float64 else 1e-6
        ref_est = reference if reference is not None else Implicit(solver="gmres", tol=tol)
        ref = gradient(m, x, loss_fn, estimator=ref_est, z0=z0, forward=forward, generator=gen())
    ref_flat = flat_gradient(ref, keys)
    rows = []
    for i, spec in enumerate(estimators):
        est = get_estimator(spec)
        label = labels[i] if labels is not None else describe(est)
        row = {"estimator": label, "kind": est.name}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                g = gradient(m, x, loss_fn, estimator=est, z0=z0, forward=forward, generator=gen())
            flat = flat_gradient(g, keys)
            row.update(relative_error=relative_error(flat, ref_flat), cosine=cosine(flat, ref_flat),
                       relative_error_x=relative_error(g.x, ref.x) if ref.x is not None else math.nan,
                       **g.cost.to_dict(), converged=_converged(g), adjoint_residual=_adjoint_residual(g),
                       warnings=[str(w.message) for w in caught])
        except FPGradError as e:
            row.update(relative_error=math.nan, cosine=math.nan, relative_error_x=math.nan, vjps=0, jvps=0,
                       forward_steps=0, backward_steps=0, bytes_saved=0, seconds=0.0, converged=False,
                       adjoint_residual=math.nan, error=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows


def describe(est: Estimator) -> str:
    """A short readable label: 'Implicit(gmres)', 'Neumann(5)', 'OneStep', ... (the estimator's describe())."""
    return est.describe()


def _adjoint_residual(g: Gradient) -> float:
    """Worst relative residual of the adjoint u in (I - J^T) u = g: the exact solve's, or what a truncated series
    leaves (NaN for the taped estimators, which form no adjoint)."""
    result = g.solve if g.solve is not None else g.series
    return math.nan if result is None else float(torch.as_tensor(result.residual).max())


def _converged(g: Gradient) -> bool:
    ok = True
    if g.forward is not None:
        ok = ok and bool(torch.as_tensor(g.forward.converged).all())
    if g.solve is not None:
        ok = ok and bool(torch.as_tensor(g.solve.converged).all())
    return ok
