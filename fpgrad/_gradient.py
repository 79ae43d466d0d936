"""`fpgrad.gradient`: forward solve + estimator, returning gradients for params and x with their cost."""

from __future__ import annotations

import time
from typing import Callable, Union

import torch
from torch import Tensor

from ._checks import check_inputs, check_map
from .autograd import _default_forward, fixed_point, warn_ignored_forward
from .errors import ShapeError
from .estimators import CostRecord, Estimator, Gradient, Implicit, get_estimator
from .forward import ForwardSolver, get_forward, is_batched
from .maps import Map
from .results import report


class SavedBytes:
    """Counts the bytes autograd saves for backward (unique storages), via saved_tensors_hooks."""

    def __init__(self):
        self.bytes = 0
        self._seen: set = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), t.device)
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):   # functorch wrappers have no storage
            key, size = (id(t),), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += size
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def gradient(m: Map, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
             estimator: Union[Estimator, str, None] = None, z0: Tensor | None = None,
             forward: Union[str, ForwardSolver, None] = None, *,
             generator: torch.Generator | None = None, throw: bool = False) -> Gradient:
    """Gradients of loss_fn(z*) for the map's params and x, by `estimator` (default Implicit()).

    z* solves z = m.step(m.params, z, x) from z0 (default m.init_state(x, generator), built inside the
    differentiated function so that estimators that reach the initial state, such as Unrolled or the
    straight-through OneStep, give the initialisation parameters their gradient).
    loss_fn(z) -> scalar. Returns Gradient(params, x, z, loss, cost, ...). A reference estimator
    (`estimator.is_reference`, FiniteDifference) computes the whole Gradient itself (`estimator.compute`).
    throw: raise ConvergenceError (DivergenceError, SingularSystemError) when the forward solve, the adjoint
    solve or the series did not succeed, instead of the warning (the result carries `.status` either way).
    Works under torch.no_grad() and torch.inference_mode() too: it enables gradients inside (a Gradient holds
    detached tensors, so nothing leaks out of the caller's mode).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _gradient(m, x, loss_fn, estimator, z0, forward, generator=generator, throw=throw)


def _leaf(t: Tensor) -> Tensor:
    """A detached leaf of t that may require grad (a copy when t is an inference tensor)."""
    t = t.detach()
    if t.is_inference():
        t = t.clone()
    return t.requires_grad_(t.is_floating_point())


def _gradient(m: Map, x: Tensor, loss_fn: Callable[[Tensor], Tensor], estimator, z0, forward, *, generator,
              throw: bool) -> Gradient:
    check_map(m, "fpgrad.gradient")
    est = Implicit() if estimator is None else get_estimator(estimator)
    if est.is_reference:                 # a reference (FiniteDifference) computes the whole gradient itself
        return est.compute(m, x, loss_fn, z0, generator)
    warn_ignored_forward(est, forward, "fpgrad.gradient", depth=3)       # (called from _gradient, from gradient)
    solver = _default_forward(m.dtype) if forward is None else get_forward(forward)
    params = {k: _leaf(v) for k, v in m.params.items()}
    x_leaf = _leaf(x)
    record = CostRecord()
    t0 = time.perf_counter()
    with SavedBytes() as saved:
        if z0 is None:
            z0_ = m.init(params, x_leaf, generator) if m.init is not None else m.init_state(x, generator)
        else:
            z0_ = z0
        check_inputs(params, z0_.detach(), x_leaf.detach(), where="fpgrad.gradient")
        z = fixed_point(m.step, params, x_leaf, z0_, forward=solver, backward=est, record=record,
                        batched=is_batched(m, z0_), check=False)
        loss = loss_fn(z)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ShapeError(f"fpgrad.gradient: loss_fn must return a scalar tensor, got "
                         f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}")
    inputs = [params[k] for k in params] + [x_leaf]
    grads = torch.autograd.grad(loss.reshape(()), [t for t in inputs if t.requires_grad], allow_unused=True)
    it = iter(grads)
    out = [next(it) if t.requires_grad else None for t in inputs]
    out = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, out)]
    record.bytes_saved = saved.bytes
    record.seconds = time.perf_counter() - t0
    grad_params = {k: g.detach() for k, g in zip(params, out[:-1])}
    fp = record.forward[-1] if record.forward else None
    sol = record.solves[-1] if record.solves else None
    series = record.series[-1] if record.series else None
    result = Gradient(grad_params, out[-1].detach(), z.detach(), loss.detach(), record.snapshot(), est.name,
                      forward=fp, solve=sol, z0=z0_.detach(), series=series)
    return report(result, throw=True, warn=False) if throw else result
