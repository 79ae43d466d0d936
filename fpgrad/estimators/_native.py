"""Estimators differentiated by the autograd tape: unrolled, truncated and one-step backprop.

Each implements `apply` (the one entry point of fpgrad.estimators.Estimator) itself and answers the properties
callers ask (taped steps after the solve, whether the initial state gets a gradient, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._checks import check_step_output
from ..errors import ConfigError
from ..forward import Iterate, solve_detached
from ._base import CostRecord, Estimator


def _taped_steps(step, params, x, z: Tensor, steps: int, damping: float, record: CostRecord) -> Tensor:
    for i in range(steps):
        f = step(params, z, x)
        if not isinstance(f, Tensor) or f.shape != z.shape:       # shape only (autocast may change the dtype)
            check_step_output(z, f, "fpgrad.fixed_point (taped steps)", call=i + 1)
        z = f if damping == 0.0 else damping * z + (1.0 - damping) * f
    record.backward_steps += steps
    record.vjps += steps
    return z


@dataclass(frozen=True)
class Unrolled(Estimator):
    """Backprop through T plain iterations from z0: the usual way slot attention is trained.

    The state is z_T (not the forward solver's z*, which it does not use); memory and time grow with T; the
    gradient also reaches z0 (and the slot initialisation). damping d: z <- d z + (1 - d) f(z).
    """

    T: int = 50
    damping: float = 0.0

    name = "unrolled"

    def __post_init__(self):
        if not (isinstance(self.T, int) and self.T >= 1):
            raise ConfigError(f"Unrolled: T (the number of taped iterations) must be an int >= 1, got T={self.T!r}; "
                              "with no iteration there is nothing to differentiate")

    def apply(self, step, params, x, z0, forward, record):
        return _taped_steps(step, params, x, z0, self.T, self.damping, record)

    @property
    def runs_solver_loop(self) -> bool:
        return False

    @property
    def uses_forward(self) -> bool:
        return False

    def describe(self) -> str:
        return f"Unrolled({self.T})"


@dataclass(frozen=True)
class Truncated(Estimator):
    """Backprop through the last k of T plain iterations (T - k iterations run without the tape).

    T=None: the first phase is the forward solver (to its tolerance) instead of T - k iterations.
    Truncated(T, T) equals Unrolled(T).
    """

    k: int = 1
    T: int | None = None
    damping: float = 0.0

    name = "truncated"

    def __post_init__(self):
        if self.k < 1 or (self.T is not None and self.T < self.k):
            raise ConfigError(f"Truncated: need 1 <= k <= T, got k={self.k}, T={self.T}")

    def apply(self, step, params, x, z0, forward, record):
        if self.T is None:
            z = solve_detached(step, params, x, z0, forward, record)
        elif self.T > self.k:
            # the taped steps evaluate f(z_{T-k}): the solve need not evaluate it once more to measure it
            first = Iterate.exactly(self.T - self.k, self.damping, measure_last=False)
            z = solve_detached(step, params, x, z0, first, record)
        else:
            z = z0
        return _taped_steps(step, params, x, z, self.k, self.damping, record)

    @property
    def taped_steps_after_solve(self) -> int:
        return self.k if self.T is None else 0

    @property
    def reaches_initial_state(self) -> bool:
        return self.T == self.k          # all T steps on the tape (= Unrolled(T)); otherwise z0 is detached

    @property
    def runs_solver_loop(self) -> bool:
        return self.T != self.k

    @property
    def uses_forward(self) -> bool:
        return self.T is None

    def describe(self) -> str:
        return f"Truncated({self.k})" if self.T is None else f"Truncated({self.k}/{self.T})"


@dataclass(frozen=True)
class OneStep(Estimator):
    """The seed paper's recipe (Chang et al. 2022, Fig. 2): solve without the tape, then apply the step
    once more to the detached state, with params and inputs attached.

    Gradient = (df/dparams)^T g at z*: the first term of the Neumann series, so OneStep() equals
    Neumann(0). The slot initialisation gets zero gradient; straight_through=True feeds
    z*.detach() + z0 - z0.detach() to the last step (BO-QSA, Jia et al. 2023), which passes the
    gradient to z0 unchanged.
    """

    straight_through: bool = False

    name = "one_step"

    def apply(self, step, params, x, z0, forward, record):
        z = solve_detached(step, params, x, z0, forward, record)
        if self.straight_through:
            z = z + z0 - z0.detach()
        return _taped_steps(step, params, x, z, 1, 0.0, record)

    @property
    def taped_steps_after_solve(self) -> int:
        return 1

    @property
    def reaches_initial_state(self) -> bool:
        return self.straight_through

    def describe(self) -> str:
        return "OneStep(ST)" if self.straight_through else "OneStep"
