"""Spectral radius rho(J) = max |lambda(J)| per sample: dense, Arnoldi or a batched power method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from ..errors import ConvergenceWarning
from ..results import warn
from ._eigen import DEFAULT_TOL, arnoldi_eigenvalues, dense_eigenvalues
from ._operator import Meter, make_generator, resolve_method, resolve_operator
from ._power import power_iteration

POWER_TOL = {torch.float64: 1e-7, torch.float32: 1e-5}


@dataclass(frozen=True)
class SpectralRadius:
    """rho(J) per sample with an uncertainty and the work it took.

    value: [B] (0-dim for an unbatched state). eigenvalue: the dominant eigenvalue found (complex).
    uncertainty: [B] residual ||J u - lambda u|| of its unit eigenvector u: lambda is an exact eigenvalue
        of J + E with ||E||_2 = uncertainty (for a normal J, |rho - value| <= uncertainty).
    complex_pair: [B] the dominant eigenvalue is non-real (a conjugate pair shares the modulus).
    ratio_spread: [B] (power only) relative spread of ||J v_k|| over the last iterations: what a plain
        power iteration would be reading; large when it oscillates. NaN for the other methods.
    products: [B] products spent on each sample (power: until it met tol; Arnoldi: ARPACK's matvecs).
    """

    value: Tensor
    uncertainty: Tensor
    eigenvalue: Tensor
    converged: Tensor
    complex_pair: Tensor
    ratio_spread: Tensor
    products: Tensor
    method: str
    jvps: int = 0
    vjps: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __float__(self) -> float:
        """The largest value over the batch."""
        return float(self.value.reshape(-1).max())


def spectral_radius_estimate(m, x: Tensor | None = None, z: Tensor | None = None, *, method: str = "auto",
                             tol: float | None = None, max_iter: int | None = None, k: int = 6,
                             window: int = 8, params: Mapping[str, Tensor] | None = None,
                             generator: torch.Generator | None = None, seed: int = 0, dense_max_n: int = 512,
                             jvp: str = "auto", check_fixed_point: bool = True) -> SpectralRadius:
    """rho(J) at z per sample, with its uncertainty and cost.   method: "arnoldi" | "dense" | "power" | "auto".

    m: a Map (with x, z) or a JacobianOperator.
    dense: eigenvalues of the materialised J (n VJPs per batch).
    arnoldi: ARPACK (scipy eigs, which='LM', top `k`) per sample; tol: its relative accuracy (default
        1e-8 in float64, 1e-5 in float32), max_iter: its restarts (300). k > 2 lets ARPACK lock a
        cluster of near-equal moduli instead of fighting it.
    power: one batched JVP per iteration for all samples, Rayleigh-Ritz over the last `window` (8) iterates
        (right for a complex-conjugate dominant pair); stops when the Ritz residual <= tol * rho
        (default 1e-7 in float64, 1e-5 in float32) or after max_iter (default 1000) iterations.
    "auto": dense when n <= dense_max_n, else arnoldi. Blocks too small for Arnoldi (n <= k + 1) use a
    smaller k, or dense (n <= 2). A block where Arnoldi fails takes the power method's estimate (noted,
    warned, `converged` then says whether the power method met its tol).
    """
    where = "fpgrad.spectral.spectral_radius"
    J = resolve_operator(m, x, z, params, where, jvp=jvp, check_fixed_point=check_fixed_point)
    method = resolve_method(method, ("dense", "arnoldi", "power"), J.n, dense_max_n, where)
    meter = Meter(J)
    notes: list[str] = []
    B = J.batch
    nan = torch.full((B,), float("nan"), dtype=torch.float64, device=J.device)
    if method == "arnoldi" and k >= J.n - 1 and J.n >= 3:
        notes.append(f"Arnoldi needs k < n - 1: used k={J.n - 2} instead of {k} (n={J.n})")
        k = J.n - 2
    if method == "arnoldi" and not 1 <= k < J.n - 1:
        notes.append(f"Arnoldi needs 1 <= k < n - 1 (k={k}, n={J.n}): used the dense eigendecomposition")
        method = "dense"
    if method == "dense":
        values, resid = dense_eigenvalues(J, 1)
        lam, unc = values[:, 0], resid[:, 0]
        converged = torch.ones(B, dtype=torch.bool, device=J.device)
        spread = nan
        products = torch.full((B,), J.n, dtype=torch.long, device=J.device)
    elif method == "arnoldi":
        tol = DEFAULT_TOL.get(J.dtype, 1e-6) if tol is None else tol
        gen = make_generator(generator, seed)
        vals, res, converged, products = arnoldi_eigenvalues(J, k, tol=tol, max_iter=max_iter, ncv=None,
                                                             generator=gen, notes=notes)
        top = torch.nan_to_num(vals.abs(), nan=-1.0).argmax(dim=1, keepdim=True)
        lam, unc = vals.gather(1, top)[:, 0], res.gather(1, top)[:, 0]
        spread = nan
        failed = (~converged).nonzero().reshape(-1).tolist()
        if failed:
            # the batched power method on each failed block: an estimate with its uncertainty, not a NaN
            for b in failed:
                blk = J.block(b)
                before = J.count.jvps
                p = power_iteration(blk, tol=POWER_TOL.get(J.dtype, 1e-5), max_iter=1000, window=window,
                                    generator=gen)
                lam[b], unc[b] = p.eigenvalue[0].to(lam.dtype), p.residual[0].to(unc.dtype)
                converged[b] = p.converged[0]
                products[b] += J.count.jvps - before
            notes.append(f"sample(s) {failed[:10]}: Arnoldi did not converge; their values come from the power "
                         "method (see uncertainty)")
            warn(f"{where}: Arnoldi did not converge for sample(s) {failed[:10]}: " + "; ".join(notes)
                          + ". Raise max_iter, loosen tol, or use method='dense' (small n)",
                          ConvergenceWarning)
    else:
        tol = POWER_TOL.get(J.dtype, 1e-5) if tol is None else tol
        max_iter = 1000 if max_iter is None else max_iter
        result = power_iteration(J, tol=tol, max_iter=max_iter, window=window,
                                 generator=make_generator(generator, seed))
        lam, unc, converged, spread = result.eigenvalue, result.residual, result.converged, result.ratio_spread
        products = result.iterations
        if not bool(converged.all()):
            bad = (~converged).nonzero().reshape(-1).tolist()
            notes.append(f"power iteration did not reach tol={tol:g} in {max_iter} iterations for sample(s) "
                         f"{bad[:10]}")
            warn(f"{where}: power iteration did not reach tol={tol:g} in {max_iter} iterations for "
                          f"sample(s) {bad[:10]} (the two largest |eigenvalues| may be close); the estimate "
                          "carries its uncertainty. Raise max_iter or window, or use method='arnoldi'",
                          ConvergenceWarning)
    value = lam.abs().to(torch.float64)
    scale = value.clamp_min(torch.finfo(torch.float64).tiny)
    complex_pair = lam.imag.abs() > 1e-6 * scale + unc.to(torch.float64)
    jvps, vjps, seconds = meter.done()
    return SpectralRadius(J._out(value), J._out(unc.to(torch.float64)), J._out(lam), J._out(converged),
                          J._out(complex_pair), J._out(spread.to(torch.float64)), J._out(products), method,
                          jvps, vjps, seconds, notes)


def spectral_radius(m, x: Tensor | None = None, z: Tensor | None = None, *, method: str = "auto",
                    tol: float | None = None, max_iter: int | None = None, **options) -> Tensor:
    """rho(J) = max |lambda| of J = df/dz at z, per sample: [B] float64 (0-dim for an unbatched state).

    method: "arnoldi" | "dense" | "power" | "auto". See `spectral_radius_estimate` for the options and
    for the result with uncertainty and cost.
    """
    return spectral_radius_estimate(m, x, z, method=method, tol=tol, max_iter=max_iter, **options).value
