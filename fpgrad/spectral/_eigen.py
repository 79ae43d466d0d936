"""Eigenvalues of J: all of them from the materialised J (dense), or the top k by modulus (Arnoldi)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from ..errors import ConvergenceWarning
from ..results import warn
from ._operator import JacobianOperator, Meter, make_generator, resolve_method, resolve_operator, work_dtype

DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
DEFAULT_MAX_ITER = 300          # ARPACK restarts (scipy's default, 10 n, can run for hours on clustered spectra)


@dataclass(frozen=True)
class Eigenvalues:
    """Eigenvalues of each sample's block of J, sorted by decreasing modulus.

    values: complex [B, k] ([k] for an unbatched state); NaN where Arnoldi found fewer than k.
    residuals: [B, k] ||J u - lambda u|| for unit eigenvectors u (each lambda is an exact eigenvalue of
        J + E with ||E||_2 = residual; for a normal J, |lambda - true| <= residual).
    converged: [B] bool. complete: True when values holds all n eigenvalues (dense).
    jvps / vjps / seconds: work done. notes: fallbacks and failures, in words.
    """

    values: Tensor
    residuals: Tensor
    converged: Tensor
    complete: bool
    method: str
    jvps: int = 0
    vjps: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def spectral_radius(self) -> Tensor:
        """max |lambda| per sample: [B] (NaN-safe: ignores missing values)."""
        mod = torch.nan_to_num(self.values.abs(), nan=-1.0)
        return mod.amax(dim=-1)


def dense_eigenvalues(J: JacobianOperator, k: int | None = None) -> tuple[Tensor, Tensor]:
    """All eigenvalues of every block (sorted by modulus) and their residuals, from the materialised J."""
    D = J._dense_all(None).to(work_dtype(J.device))                         # [B, n, n]
    values, vectors = torch.linalg.eig(D)
    order = torch.nan_to_num(values.abs(), nan=-1.0).argsort(dim=-1, descending=True)
    values = values.gather(-1, order)
    vectors = vectors.gather(-1, order[:, None, :].expand_as(vectors))
    resid = (D.to(vectors.dtype) @ vectors - vectors * values[:, None, :]).norm(dim=1)
    resid = resid / vectors.norm(dim=1).clamp_min(torch.finfo(D.dtype).tiny)
    # entries of J carry the step's rounding: a backward error of at least eps(dtype) ||J||
    floor = torch.finfo(J.dtype).eps * torch.linalg.matrix_norm(D).to(resid.dtype)
    resid = torch.maximum(resid, floor[:, None])
    if k is not None:
        values, resid = values[:, :k], resid[:, :k]
    return values, resid


def arnoldi_sample(J: JacobianOperator, sample: int, k: int, *, tol: float, max_iter: int | None,
                   ncv: int | None, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool, str]:
    """Top-k eigenpairs (which='LM') of one sample's block by ARPACK (scipy eigs).

    If ARPACK does not converge, one retry asks for more eigenvalues in a larger Krylov space
    (k' = max(2k, 10), ncv' = max(2 ncv, 2k' + 1, 40)) and keeps the top k: a cluster of near-equal moduli
    (identical slots at z* give many) is locked as a whole instead of fought over.
    Returns (values [k] complex, NaN where missing; vectors [n, k]; converged; message)."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigs

    A = J.to_scipy(sample)
    n = J.n
    values = np.full(k, np.nan + 0j)
    vectors = np.zeros((n, k), dtype=complex)
    ncv0 = ncv or min(n, max(2 * k + 1, 20))
    k1 = max(k, min(n - 2, max(2 * k, 10)))
    attempts = [(k, ncv0), (k1, min(n, max(2 * ncv0, 2 * k1 + 1, 40)))]
    maxiter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    messages = []
    w = np.zeros(0, dtype=complex)
    U = np.zeros((n, 0), dtype=complex)
    for ka, ncva in attempts:
        try:
            w, U = eigs(A, k=ka, which="LM", tol=tol, maxiter=maxiter, ncv=ncva, v0=v0)
        except ArpackNoConvergence as e:
            w, U = e.eigenvalues, e.eigenvectors
            messages.append(f"ARPACK converged {len(w)} of {ka} eigenvalues (k={ka}, ncv={ncva}, "
                            f"maxiter={maxiter}, tol={tol:g})")
            continue
        except ArpackError as e:
            w, U = np.zeros(0, dtype=complex), np.zeros((n, 0), dtype=complex)
            messages.append(f"ARPACK failed (k={ka}, ncv={ncva}): {e}")
            continue
        order = np.argsort(-np.abs(w), kind="stable")[:k]
        values[:], vectors[:] = w[order], U[:, order]
        return values, vectors, True, ""
    order = np.argsort(-np.abs(w), kind="stable")[:k]       # what the last attempt did converge
    values[:len(order)], vectors[:, :len(order)] = w[order], U[:, order]
    return values, vectors, False, "; then ".join(messages)


def arnoldi_eigenvalues(J: JacobianOperator, k: int, *, tol: float, max_iter: int | None, ncv: int | None,
                        generator: torch.Generator, notes: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k eigenvalues of every block by Arnoldi, their residuals (2k batched JVPs), converged flags
    and the JVPs ARPACK spent on each sample."""
    B, n = J.batch, J.n
    V0 = torch.randn(B, n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()
    values = np.full((B, k), np.nan + 0j)
    vectors = np.zeros((B, n, k), dtype=complex)
    converged = np.zeros(B, dtype=bool)
    products = np.zeros(B, dtype=np.int64)
    for b in range(B):
        before = J.count.jvps
        w, U, ok, msg = arnoldi_sample(J, b, k, tol=tol, max_iter=max_iter, ncv=ncv, v0=V0[b])
        products[b] = J.count.jvps - before
        order = np.argsort(-np.nan_to_num(np.abs(w), nan=-1.0), kind="stable")
        values[b], vectors[b], converged[b] = w[order], U[:, order], ok
        if not ok:
            notes.append(f"sample {b}: {msg}")
    wdt = work_dtype(J.device)
    vals = torch.as_tensor(values).to(J.device)
    # residual ||J u - lambda u|| of every Ritz pair, all samples at once: J (Re U) and J (Im U)
    Ut = torch.as_tensor(vectors).to(J.device)                                      # [B, n, k]
    parts = torch.cat([Ut.real, Ut.imag], dim=2).permute(2, 0, 1).to(J.dtype)       # [2k, B, n]
    JU = J._apply(parts.contiguous(), transpose=False).to(wdt)
    JU = torch.complex(JU[:k], JU[k:]).permute(1, 2, 0)                             # [B, n, k]
    Uc = Ut.to(JU.dtype)
    resid = (JU - Uc * vals.to(JU.dtype)[:, None, :]).norm(dim=1)
    resid = resid / Uc.norm(dim=1).clamp_min(torch.finfo(wdt).tiny)
    resid = torch.where(torch.isnan(vals.real), torch.full_like(resid, float("nan")), resid)
    return (vals, resid, torch.as_tensor(converged, device=J.device),
            torch.as_tensor(products, device=J.device))


def eigenvalues(m, x: Tensor | None = None, z: Tensor | None = None, k: int | None = 6, *,
                method: str = "auto", tol: float | None = None, max_iter: int | None = None,
                ncv: int | None = None, params: Mapping[str, Tensor] | None = None,
                generator: torch.Generator | None = None, seed: int = 0, dense_max_n: int = 512,
                jvp: str = "auto", check_fixed_point: bool = True) -> Eigenvalues:
    """Top-k eigenvalues of J = df/dz at z by modulus, per sample.   method: "dense" | "arnoldi" | "auto".

    m: a Map (with x, z) or a JacobianOperator. dense: torch.linalg.eig of the materialised J (n VJPs);
    k=None keeps all n. arnoldi: scipy eigs (ARPACK, which='LM') on each sample's block, matrix-free
    (needs k < n - 1: smaller blocks fall back to dense, with a note). "auto": dense when n <= dense_max_n.
    tol: ARPACK's relative accuracy (default 1e-8 in float64, 1e-5 in float32); max_iter: its restarts
    (default 300); ncv: its Krylov dimension (default max(2k + 1, 20)). A cluster of equal-modulus
    eigenvalues (e.g. identical slots at z*) converges much faster with k above its size.
    """
    J = resolve_operator(m, x, z, params, "fpgrad.spectral.eigenvalues", jvp=jvp,
                         check_fixed_point=check_fixed_point)
    method = resolve_method(method, ("dense", "arnoldi"), J.n, dense_max_n, "fpgrad.spectral.eigenvalues")
    meter = Meter(J)
    notes: list[str] = []
    if method == "arnoldi" and k is None:
        raise ValueError("fpgrad.spectral.eigenvalues: method='arnoldi' finds the top k; pass k (or use 'dense')")
    if method == "arnoldi" and not 1 <= k < J.n - 1:
        notes.append(f"Arnoldi needs 1 <= k < n - 1 (k={k}, n={J.n}): used the dense eigendecomposition")
        method = "dense"
    if method == "dense":
        values, resid = dense_eigenvalues(J, k)
        converged = torch.ones(J.batch, dtype=torch.bool, device=J.device)
        complete = k is None or k >= J.n
    else:
        tol = DEFAULT_TOL.get(J.dtype, 1e-6) if tol is None else tol
        values, resid, converged, _ = arnoldi_eigenvalues(J, k, tol=tol, max_iter=max_iter, ncv=ncv,
                                                          generator=make_generator(generator, seed), notes=notes)
        complete = False
        if not bool(converged.all()):
            warn("fpgrad.spectral.eigenvalues: Arnoldi did not converge for every sample: "
                          + "; ".join(notes) + ". Raise max_iter or ncv, loosen tol, or use method='dense'",
                          ConvergenceWarning)
    jvps, vjps, seconds = meter.done()
    return Eigenvalues(J._out(values), J._out(resid), J._out(converged), complete, method, jvps, vjps, seconds, notes)
