"""Errors and warnings raised by fpgrad. Every message names the tensor or solver and the fix."""

from __future__ import annotations


class FPGradError(Exception):
    """Base class of every fpgrad error."""


class ShapeError(FPGradError, ValueError):
    """A tensor has the wrong shape (or a step changed the state's shape)."""


class DTypeError(FPGradError, TypeError):
    """Tensors that must share a floating dtype do not."""


class DeviceError(FPGradError, ValueError):
    """Tensors that must live on one device do not."""


class NonFiniteError(FPGradError, FloatingPointError):
    """NaN or Inf in an input, or appearing during an iteration."""


class ConvergenceError(FPGradError, RuntimeError):
    """A forward or linear solve stopped before reaching its tolerance (raised with throw=True)."""


class DivergenceError(ConvergenceError):
    """An iteration's residual grew without bound (e.g. Neumann series with spectral radius >= 1)."""


class SingularSystemError(ConvergenceError):
    """I - M is singular (J has an eigenvalue 1), so (I - M) u = b has no unique solution."""


class NonSymmetricError(FPGradError, ValueError):
    """Conjugate gradient was given an operator that is not symmetric."""


class NotAMapError(FPGradError, TypeError):
    """Something other than an fpgrad.maps.Map was passed where a map is expected (e.g. a (Map, x) tuple)."""


class ConfigError(FPGradError, ValueError):
    """An argument of a solver, estimator or call is out of range (a negative or NaN tolerance, Unrolled(T=0))."""


class ConvergenceWarning(UserWarning):
    """A solve did not reach its tolerance; the result carries converged=False."""


__all__ = [
    "FPGradError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "NonFiniteError",
    "ConvergenceError",
    "DivergenceError",
    "SingularSystemError",
    "NonSymmetricError",
    "ConfigError",
    "NotAMapError",
    "ConvergenceWarning",
]
