"""fpgrad: gradients of maps iterated to a fixed point (slot attention and friends), and their diagnostics."""

from . import compare, contraction, errors, estimators, forward, linsolve, maps, nn, results, spectral
from ._gradient import gradient
from .autograd import fixed_point
from .forward import FixedPoint, solve
from .results import Status

__version__ = "0.1.0"


def __getattr__(name):
    # fpgrad.report pulls in matplotlib/seaborn: imported on first use
    if name == "report":
        import importlib
        return importlib.import_module(".report", __name__)
    raise AttributeError(f"module 'fpgrad' has no attribute {name!r}")


__all__ = ["FixedPoint", "Status", "compare", "contraction", "errors", "estimators", "fixed_point", "forward",
           "gradient", "linsolve", "maps", "nn", "report", "results", "solve", "spectral", "__version__"]
