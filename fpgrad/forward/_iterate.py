"""Plain fixed-point iteration z_{t+1} = f(z_t)."""

from __future__ import annotations

from dataclasses import dataclass

from ._common import ForwardSolver


@dataclass(frozen=True)
class Iterate(ForwardSolver):
    """Picard iteration z_{t+1} = f(z_t) (with optional damping); converges at rate ~ rho(J)."""

    name = "iterate"

    @classmethod
    def exactly(cls, steps: int, damping: float = 0.0) -> Iterate:
        """Exactly `steps` plain iterations from z0, returning the last iterate: no stopping test, no
        best-iterate selection, no warning (what unrolled training and "T iterations" mean)."""
        if int(steps) < 0:
            raise ValueError(f"Iterate.exactly: steps must be >= 0, got {steps}")
        return cls(tol=0.0, atol=0.0, max_iter=int(steps), damping=damping, warn=False, return_best=False)

    def _propose(self, state, z, fz):
        return fz
