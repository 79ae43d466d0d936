"""Boundary checks: shapes, dtypes, devices and finiteness, with messages that name the tensor and the fix."""

from __future__ import annotations

import contextlib
import math
from typing import Mapping

import torch
from torch import Tensor

from .errors import ConfigError, DeviceError, DTypeError, NonFiniteError, NotAMapError, ShapeError
from .results import warn


def check_map(m: object, where: str) -> None:
    """Raise NotAMapError unless m looks like an fpgrad.maps.Map (it has step, params and init_state)."""
    if all(hasattr(m, name) for name in ("step", "params", "init_state")):
        return
    if isinstance(m, tuple):
        kinds = ", ".join(type(v).__name__ for v in m)
        raise NotAMapError(f"{where}: pass the map, not a tuple ({kinds}); e.g. for `m, x = make()` call "
                           f"{where}(m, x, ...); a module becomes a map with fpgrad.maps.from_module(module)")
    raise NotAMapError(f"{where}: expected an fpgrad.maps.Map, got {type(m).__name__}; build one with "
                       "fpgrad.maps.from_module(module) or fpgrad.maps.linear / tanh_rnn / slot_attention")


def check_tolerance(where: str, tol: float | None, atol: float | None = 0.0) -> None:
    """Raise ConfigError for a negative or NaN tolerance; warn on a relative tol >= 1 (the stopping test then
    holds at the start: a solve returns its initial guess, flagged converged). None means "the default"."""
    for name, value in (("tol", tol), ("atol", atol)):
        try:
            ok = value is None or float(value) >= 0          # False for NaN
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{where}: {name} must be a number >= 0, got {name}={value!r} (a negative or NaN "
                              f"tolerance can never be met); use e.g. tol=1e-6, atol=0")
    if tol is not None and tol >= 1:
        warn(f"{where}: relative tol={tol:g} >= 1 is met before the first iteration: the solve returns its "
             "initial guess (z0, or a zero adjoint and so a zero gradient) flagged converged; use tol < 1 "
             "(e.g. 1e-6)", UserWarning)


def sum_is_finite(t: Tensor, dim: int | None = None) -> Tensor:
    """A cheap test that proves t finite: a NaN or Inf entry makes the sum non-finite, so a finite sum means
    every entry is finite (one read of t, ~12x faster than isfinite(t).all() on a large tensor). A non-finite
    sum may also be an overflow of finite entries: confirm with torch.isfinite before reporting."""
    t = t.detach()
    return torch.isfinite(t.sum() if dim is None else t.sum(dim=dim))


CUDA_CHECK_PERIOD = 8     # iterations between host checks on CUDA when a solver's check_every is None
_EMULATE_CUDA = [False]   # set by emulate_cuda_checks: the CUDA defaults on any device


@contextlib.contextmanager
def emulate_cuda_checks():
    """Within the block, solver loops whose check_every is None use the CUDA default (CUDA_CHECK_PERIOD) on any
    device: a CPU run then dispatches the operations a GPU run would (benchmarks/dispatch.py counts them)."""
    previous = _EMULATE_CUDA[0]
    _EMULATE_CUDA[0] = True
    try:
        yield
    finally:
        _EMULATE_CUDA[0] = previous


def check_period(check_every: int | None, device: torch.device | str, where: str) -> int:
    """Iterations between a solver loop's host checks (each a device -> host sync): `check_every`, validated, or
    its default, 1 on the CPU (where nothing syncs) and CUDA_CHECK_PERIOD on CUDA."""
    if check_every is None:
        cuda = _EMULATE_CUDA[0] or torch.device(device).type == "cuda"
        return CUDA_CHECK_PERIOD if cuda else 1
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"{where}: check_every must be an int >= 1 (iterations between host checks) or None "
                         f"(1 on the CPU, {CUDA_CHECK_PERIOD} on CUDA), got {check_every!r}")
    return check_every


def host_check(active: Tensor, period: int = 1, now: Tensor | None = None, before: Tensor | None = None,
               gap: int = 0, threshold: Tensor | float = 0.0, count: bool = True) -> tuple[int, int]:
    """A solver loop's host check in one device -> host transfer: (samples still active, iterations until the
    next check).

    period 1 (the CPU default): (active count, 1). period > 1 with a residual history (now: [B] residuals after
    the last iteration; before: the same `gap` >= 1 iterations earlier; threshold: where a sample stops, [B] or a
    number): the next check comes when the slowest active sample is predicted to stop, at the geometric rate its
    residual fell over those iterations: at least 1 and at most `period` iterations ahead (a period where a
    sample's residual did not fall, or the prediction is not finite). A loop whose last sample stops between
    checks runs until the next one (each idle iteration launches as many kernels as a working one); the
    prediction cuts those iterations for the price of an extra check near the end. The result is unchanged:
    convergence is still decided on the device at every iteration.
    count=False: the first number is only 0 (none active) or 1 (some), without the cast a count needs.
    """
    if period <= 1 or now is None or before is None or gap < 1:
        return (int(active.sum()) if count else int(bool(active.any()))), max(period, 1)
    now_, before_ = now.float(), before.float()
    threshold_ = torch.as_tensor(threshold, device=now.device).float()
    tiny = torch.finfo(torch.float32).tiny
    rate = ((now_ + tiny) / (before_ + tiny)) ** (1.0 / gap)
    need = torch.log((threshold_ + tiny) / (now_ + tiny)) / torch.log(rate)
    need = torch.where(rate < 1, need, math.inf)                  # not falling: no prediction
    need = torch.where(now_ <= threshold_, 0.0, torch.nan_to_num(need, nan=math.inf))
    worst = torch.where(active, need, 0.0).amax() if active.numel() else need.new_zeros(())
    count, ahead = torch.stack([active.sum().float(), worst]).tolist()
    if not math.isfinite(ahead):
        return int(count), period
    # float32 logs put an exact prediction a rounding above its integer (4.0000005 steps): that is 4, not 5
    return int(count), min(period, max(1, math.ceil(ahead - 1e-3)))


def check_finite(t: Tensor, name: str) -> None:
    """Raise NonFiniteError if `t` holds NaN or Inf."""
    if t.is_floating_point() or t.is_complex():
        if not bool(sum_is_finite(t)) and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            raise NonFiniteError(f"{name} contains {nan} NaN and {inf} Inf entries (shape {tuple(t.shape)}); "
                                 "fpgrad needs finite inputs")


def check_inputs(params: Mapping[str, Tensor], z: Tensor, x: Tensor | None, *,
                 where: str = "fpgrad", check_values: bool = True, z_name: str = "z", x_name: str = "x") -> None:
    """Params, state and inputs share one floating dtype and one device, and hold finite values (checked with
    one reduction: one host sync, one graph break under torch.compile)."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{where}: z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise DTypeError(f"{where}: z has dtype {z.dtype}; the state must be a floating tensor "
                         "(use z.float() or z.double())")
    if z.device.type == "meta":
        raise DeviceError(f"{where}: {z_name} is a meta tensor (shape only, no values); fpgrad's solvers stop on "
                          "values, so give real tensors (e.g. torch.empty_like(z, device='cpu'))")
    if x is not None and not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    dev, dt = z.device, z.dtype
    if not check_values and (x is None or (x.device == dev and x.dtype == dt)) and all(
            isinstance(v, Tensor) and v.device == dev and v.dtype == dt for v in params.values()):
        return      # the common case, one pass without building names: every tensor shares z's dtype and device
    named = [(z_name, z)] + ([(x_name, x)] if x is not None else [])
    named += [(f"params['{k}']", v) for k, v in params.items()]
    for k, v in params.items():
        if isinstance(v, Tensor) and not (v.is_floating_point() or v.is_complex()):
            raise DTypeError(f"{where}: params['{k}'] has dtype {v.dtype}; parameters are differentiated, so they "
                             f"must be floating: cast it (params['{k}'].to({z.dtype})), or pass integer data "
                             "through x or close over it in the step")
    for name, t in named:
        if t.device != z.device:
            raise DeviceError(f"{where}: {name} is on {t.device} but z is on {z.device}; "
                              f"move them to one device (e.g. tensor.to('{z.device}'))")
        if t.is_floating_point() and t.dtype != z.dtype:
            raise DTypeError(f"{where}: {name} has dtype {t.dtype} but z has {z.dtype}; "
                             f"cast them to one dtype (e.g. tensor.to({z.dtype}))")
    if check_values:
        # values are checked where they can be read: a tensor under torch.func.vmap/grad is a wrapper whose values
        # would need data-dependent control flow (vmap refuses it); the unwrapped call checks them
        floats = [(name, t) for name, t in named
                  if (t.is_floating_point() or t.is_complex()) and not _is_transformed(t) and t.device.type != "meta"]
        if floats:
            # one sum of the tensors' sums: a NaN or Inf anywhere makes it non-finite (NaN propagates, inf - inf is
            # NaN), so a finite total proves every entry finite: one host sync for all of them
            total = torch.stack([t.detach().sum() for _, t in floats]).sum()
            if not bool(torch.isfinite(total)):        # a NaN/Inf, or sums that overflowed: look closer
                for name, t in floats:
                    check_finite(t, f"{where}: {name}")


def _is_transformed(t: Tensor) -> bool:
    """t is a torch.func (vmap / grad / jvp) wrapper, whose values cannot steer Python control flow (never asked
    while torch.compile traces: dynamo would skip the call and break the graph there)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_batch(z: Tensor, x: Tensor | None, where: str = "fpgrad") -> None:
    """The leading (batch) dimension of z and x agree."""
    if x is not None and (x.dim() == 0 or x.shape[0] != z.shape[0]):
        raise ShapeError(f"{where}: x has shape {tuple(x.shape)} but z has batch size {z.shape[0]} "
                         f"(z shape {tuple(z.shape)}); x and z need the same leading batch dimension")


_DTYPE_MESSAGE = ("scalar type", "same dtype", "dtype", "not implemented for")
_SHAPE_MESSAGE = ("shape", "size of tensor", "mat1", "mat2", "dimension", "must match", "expand")


def call_step(step, params: Mapping[str, Tensor], z: Tensor, x: Tensor | None, where: str = "fpgrad") -> Tensor:
    """step(params, z, x), with torch's shape and dtype errors from inside it named: which of z, x and the params
    have which shapes and dtypes, and what to check (use it for a solver's first evaluation)."""
    try:
        out = step(params, z, x)
    except RuntimeError as e:
        text = str(e)
        if any(s in text for s in _DTYPE_MESSAGE):
            error = DTypeError
        elif any(s in text for s in _SHAPE_MESSAGE):
            error = ShapeError
        else:
            raise
        shown = ", ".join(f"{name} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                          for name, t in [("z", z), ("x", x), *[(f"params['{k}']", v) for k, v in params.items()]]
                          if isinstance(t, Tensor))
        raise error(f"{where}: the step failed on its first call ({text.splitlines()[0]}); it was given {shown}. "
                    "Check that z has the state's feature size, x the inputs' and that all are one floating "
                    "dtype") from e
    check_step_output(z, out, where)
    return out


def check_step_output(z: Tensor, z_next: Tensor, where: str = "fpgrad", call: int | None = None) -> None:
    """A step must return a tensor of the state's shape and dtype (call: which evaluation, when not the first:
    a step whose output changes shape on a later call is named at that call, not by torch's reshape)."""
    if not isinstance(z_next, Tensor):
        raise TypeError(f"{where}: step returned {type(z_next).__name__}, expected a Tensor like z"
                        + (f" (on its call {call})" if call else ""))
    if z_next.shape != z.shape:
        later = f" on its call {call} (earlier calls kept it)" if call and call > 1 else ""
        raise ShapeError(f"{where}: step changed the state's shape from {tuple(z.shape)} to "
                         f"{tuple(z_next.shape)}{later}; a fixed-point step must return a state of the input's "
                         "shape on every call")
    if z_next.dtype != z.dtype:
        raise DTypeError(f"{where}: step returned dtype {z_next.dtype} for a state of dtype {z.dtype}")
