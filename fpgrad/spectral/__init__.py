"""Spectral diagnostics of J = df/dz at a fixed point z* = f(params, z*, x).

Whether implicit and one-step gradients can be trusted is decided by J: fixed-point iteration and
the Neumann series converge at rate ~ rho(J) and only when rho(J) < 1; the adjoint solve
(I - J^T) u = g is as hard as I - J is ill-conditioned. Everything here is matrix-free (JVPs / VJPs
through `JacobianOperator`, the spectral form of the one Jacobian object `fpgrad.jacobian.Jacobian` that the
estimators and benchmarks use too; any of them can be measured), with dense references for small n, per sample
of a batch.
"""

from ..jacobian import Jacobian
from ._analyze import analyze
from ._bound import adjoint_error_bound
from ._contraction import ContractionRate, contraction_rate
from ._eigen import Eigenvalues, eigenvalues
from ._hutchinson import FrobeniusNorm, frobenius_norm
from ._operator import JacobianOperator, ProductCount, jacobian_operator
from ._power import PowerIteration, power_iteration
from ._radius import SpectralRadius, spectral_radius, spectral_radius_estimate
from ._singular import SingularValues, singular_values
from ._summary import SpectralSummary, spread

METHODS = ("dense", "arnoldi", "power")

__all__ = [
    "METHODS",
    "ContractionRate",
    "Eigenvalues",
    "FrobeniusNorm",
    "Jacobian",
    "JacobianOperator",
    "PowerIteration",
    "ProductCount",
    "SingularValues",
    "SpectralRadius",
    "SpectralSummary",
    "adjoint_error_bound",
    "analyze",
    "contraction_rate",
    "eigenvalues",
    "frobenius_norm",
    "jacobian_operator",
    "power_iteration",
    "singular_values",
    "spectral_radius",
    "spectral_radius_estimate",
    "spread",
]
