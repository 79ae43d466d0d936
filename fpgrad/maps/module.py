"""Any nn.Module whose forward(z, x) is one refinement step becomes a Map."""

from __future__ import annotations

import inspect
import re

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import DTypeError, FPGradError, ShapeError
from ._map import InitFn, Map

# torch's messages for a state or input of the wrong size or dtype, raised inside the user's forward
_DTYPE = re.compile(r"scalar type|dtype|not implemented for '(Long|Int|Short|Byte|Bool)'")
_SHAPE_OR_DTYPE = re.compile(r"shape|size|mat1|mat2|dimension|must match|expand|" + _DTYPE.pattern)


class NotAStepError(FPGradError, TypeError):
    """A module given to `from_module` is not one step: its forward does not take (z, x)."""


class BufferMutationError(FPGradError, RuntimeError):
    """A step changed a buffer of its module (a BatchNorm in train mode updates its running statistics)."""


_WRAP_ONE_ITERATION = """\
fpgrad iterates the step itself, so forward must run ONE iteration: wrap the module, e.g.

    class OneStep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
        def forward(self, z, x):          # z: the state (e.g. slots [B, K, D]), x: the inputs
            return <one iteration of inner's loop, from z, given x>

    m = fpgrad.maps.from_module(OneStep(inner), init=lambda params, x, generator: <initial z>)"""


def _check_takes_state_and_input(module: nn.Module) -> None:
    """forward's first two positional arguments are required (z, x): `forward(inputs)` or `forward(inputs,
    num_slots=None)` (a module that runs its own loop) is refused before it fails deep inside."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or C forward: cannot tell, let the first call speak
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in signature.parameters.values() if p.kind in kinds]
    takes_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())
    required = [p for p in positional[:2] if p.default is inspect.Parameter.empty]
    if len(required) < 2 and not takes_varargs:
        shown = ", ".join(str(p) for p in signature.parameters.values())
        raise NotAStepError(
            f"from_module({type(module).__name__}): its forward({shown}) does not take (z, x) as two required "
            "arguments; fpgrad needs a module whose forward(z, x) is one refinement step z -> f(z, x). A module "
            "that runs its own loop (e.g. a slot attention's forward(inputs)) cannot be iterated to a fixed "
            "point as it is.\n" + _WRAP_ONE_ITERATION) from None


class _ModuleStep:
    """step(params, z, x) = functional_call(module, (params, buffers), (z, x)), with the module's buffers held
    fixed: a BatchNorm in train mode (which would update its running statistics at every step) is refused, and
    any other in-place change of a buffer raises BufferMutationError naming it."""

    def __init__(self, module: nn.Module, buffers: dict[str, Tensor], name: str):
        self.module, self.buffers, self.name = module, buffers, name
        self._norms = [(n, sub) for n, sub in module.named_modules()
                       if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats]

    def with_buffers(self, buffers: dict[str, Tensor]) -> _ModuleStep:
        """The same step with other buffer tensors (Map.to)."""
        return _ModuleStep(self.module, buffers, self.name)

    def __call__(self, params, z: Tensor, x: Tensor) -> Tensor:
        for name, sub in self._norms:
            if sub.training:
                raise BufferMutationError(
                    f"{self.name}: {name or 'the module'} ({type(sub).__name__}) is in train mode, so every step "
                    f"would update its running statistics (buffers {name + '.' if name else ''}running_mean, "
                    "running_var, num_batches_tracked) and couple the samples of a batch; call module.eval() "
                    "before building or solving the map (fpgrad holds buffers fixed)")
        versions = {k: b._version for k, b in self.buffers.items()}
        try:
            out = functional_call(self.module, (dict(params), self.buffers), (z, x))
        except RuntimeError as e:
            if not _SHAPE_OR_DTYPE.search(str(e)):
                raise
            error = DTypeError if _DTYPE.search(str(e)) else ShapeError
            raise error(
                f"{self.name}: the module's forward(z, x) failed on z of shape {tuple(z.shape)} ({z.dtype}) and x "
                f"of shape {tuple(getattr(x, 'shape', ()))} ({getattr(x, 'dtype', type(x).__name__)}): {e}. "
                "Check that z is the state the module expects (its feature size and dtype) and x its inputs"
            ) from e
        changed = [k for k, b in self.buffers.items() if b._version != versions[k]]
        if changed:
            raise BufferMutationError(
                f"{self.name}: the step changed buffer(s) {', '.join(changed)} in place; fpgrad holds buffers "
                "fixed during solves and gradients: call module.eval() or make forward(z, x) leave them alone")
        return out


def from_module(module: nn.Module, init: InitFn | None = None, event_ndim: int | None = None,
                name: str | None = None) -> Map:
    """Map with step(params, z, x) = functional_call(module, (params, buffers), (z, x)).

    params: the module's own Parameters (live: `fpgrad.fixed_point(m.step, m.params, x, z0)` followed by
    `loss.backward()` fills the module's `.grad`, so `torch.optim` trains it; `fpgrad.gradient` and the solvers
    detach them). Buffers are held fixed: a BatchNorm in train mode, or a forward that changes a buffer, raises
    BufferMutationError (call `module.eval()`). `Map.to(dtype=, device=)` moves params and buffers.
    event_ndim: dims of one sample's state; None (default) infers it from each state: z [B, ...] with 2 or
    more dims is a batch along dim 0, z [n] one sample.
    init: init(params, x, generator) -> z0; defaults to `module.init_state(x, generator)` if the
    module defines it.
    A module whose forward does not take (z, x) (one that runs its own loop) raises NotAStepError, which shows
    how to wrap one iteration.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module: expected an nn.Module, got {type(module).__name__}")
    if event_ndim is not None and (not isinstance(event_ndim, int) or event_ndim < 0):
        raise ValueError(f"from_module(event_ndim={event_ndim!r}): give the number of dims of one sample's state "
                         "(a non-negative int), or leave it unset to infer it")
    _check_takes_state_and_input(module)
    name = name or type(module).__name__
    params = dict(module.named_parameters())
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    step = _ModuleStep(module, buffers, name)

    if init is None and hasattr(module, "init_state"):
        def init(p, x, generator=None):  # noqa: F811
            with torch.no_grad():
                return module.init_state(x, generator)
    info = {} if event_ndim is None else {"event_ndim_from": "from_module(event_ndim=...)"}
    return Map(step, params, init, event_ndim=event_ndim, name=name, info=info, buffers=buffers)
