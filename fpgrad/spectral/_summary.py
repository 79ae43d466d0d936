"""SpectralSummary: every number a spectral analysis produced, as plain JSON-serialisable data."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._io import from_jsonable, jsonable


def spread(values: list[float]) -> dict[str, float]:
    """min / median / mean / max / std of a list of finite floats (NaN-free; empty -> NaNs)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        nan = float("nan")
        return {"min": nan, "median": nan, "mean": nan, "max": nan, "std": nan, "count": 0}
    return {"min": min(vals), "median": statistics.median(vals), "mean": statistics.fmean(vals),
            "max": max(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "count": len(vals)}


@dataclass
class SpectralSummary:
    """Spectral analysis of a map's Jacobian J = df/dz at its fixed point, per sample.

    Lists indexed [sample] hold one value per sample of the batch (J is block-diagonal over samples).
    Eigenvalues are stored as [real, imag] pairs, sorted by decreasing modulus; `eigenvalues_complete`
    says whether they are all n of them (dense) or only the top k (Arnoldi).
    """

    map_name: str
    n: int                                    # state entries per sample (K * D for slots)
    batch: int
    method: str                               # "dense" | "arnoldi" | "power"
    dtype: str
    device: str
    seed: int | None = None
    eigenvalues: list[list[list[float]]] = field(default_factory=list)      # [sample][i] = [re, im]
    eigenvalues_complete: bool = False
    spectral_radius: list[float] = field(default_factory=list)              # [sample]
    spectral_radius_uncertainty: list[float] = field(default_factory=list)  # [sample] abs. error estimate
    singular_values: list[list[float]] = field(default_factory=list)        # [sample] top-k of J, decreasing
    singular_values_I_minus_J: list[list[float]] = field(default_factory=list)  # [sample] smallest-k, increasing
    lipschitz: list[float] = field(default_factory=list)                    # [sample] sigma_max(J) = ||J||_2
    sigma_min_I_minus_J: list[float] = field(default_factory=list)          # [sample]
    condition_I_minus_J: list[float] = field(default_factory=list)          # [sample] sigma_max / sigma_min of I - J
    frobenius: list[float] = field(default_factory=list)                    # [sample] ||J||_F (Hutchinson or exact)
    frobenius_interval: list[list[float]] = field(default_factory=list)     # [sample] [lo, hi] at `confidence`
    confidence: float = 0.95
    forward: dict[str, Any] = field(default_factory=dict)                   # method, tol, steps[], converged[]
    residuals: list[list[float]] = field(default_factory=list)              # [sample][t] forward residual trace
    contraction_rate: list[float] = field(default_factory=list)             # [sample] geometric fit of the trace
    cost: dict[str, Any] = field(default_factory=dict)                      # jvps, vjps, seconds per measurement
    estimators: list[dict[str, Any]] = field(default_factory=list)          # optional gradient-estimator rows
    notes: list[str] = field(default_factory=list)
    # added with fpgrad.spectral.analyze
    batched: bool = True                                                    # False: z was one sample's state
    eigenvalue_method: str = ""                                             # what produced `eigenvalues`
    fixed_point_residual: list[float] = field(default_factory=list)         # [sample] ||f(z) - z|| at the z used
    contraction_rate_stderr: list[float] = field(default_factory=list)      # [sample] std. error of the fit
    complex_pair: list[bool] = field(default_factory=list)                  # [sample] dominant eigenvalue non-real

    # ---- derived numbers (computed from the stored ones; no Jacobian access) ----------------------
    def spread(self, name: str) -> dict[str, float]:
        """Spread over samples of a per-sample field, e.g. summary.spread('spectral_radius')."""
        return spread(getattr(self, name))

    @property
    def contractive(self) -> bool:
        """Every sample's spectral radius is below one."""
        return bool(self.spectral_radius) and max(self.spectral_radius) < 1.0

    # ---- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = {k: self.spread(k) for k in ("spectral_radius", "lipschitz", "sigma_min_I_minus_J",
                                                    "condition_I_minus_J", "frobenius", "contraction_rate")}
        return jsonable(d)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpectralSummary:
        names = {f.name for f in fields(cls)}
        return cls(**{k: from_jsonable(v) for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> SpectralSummary:
        return cls.from_dict(json.loads(text))
