"""Singular values of J (its largest = the step's Lipschitz constant in z) and of I - J (the smallest
sets the conditioning of the adjoint solve (I - J^T) u = g)."""

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
DEFAULT_MAX_ITER = 300
OPERATORS = ("J", "I-J")
WHICH = ("largest", "smallest")


@dataclass(frozen=True)
class SingularValues:
    """k singular values of J or I - J per sample.

    values: [B, k] ([k] unbatched): decreasing for which="largest", increasing for which="smallest";
    NaN where Lanczos did not find them. of: "J" | "I-J". converged: [B].
    """

    values: Tensor
    of: str
    which: str
    converged: Tensor
    method: str
    jvps: int = 0
    vjps: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def dense_singular_values(J: JacobianOperator, of: str) -> Tensor:
    """All singular values of every block of J (or I - J), decreasing: [B, n]."""
    D = J._dense_all(None).to(work_dtype(J.device))
    if of == "I-J":
        D = torch.eye(J.n, dtype=D.dtype, device=D.device) - D
    return torch.linalg.svdvals(D)


def _gram_operator(J: JacobianOperator, sample: int, of: str):
    """A^T A for A = J or I - J of one sample, as a scipy LinearOperator (1 JVP + 1 VJP per product)."""
    from scipy.sparse.linalg import LinearOperator

    A = J.to_scipy(sample)
    if of == "J":
        def mv(v):
            return A.rmatvec(A.matvec(v))
    else:
        def mv(v):
            v = np.asarray(v).reshape(-1)
            w = v - A.matvec(v)
            return w - A.rmatvec(w)
    return LinearOperator((J.n, J.n), matvec=mv, dtype=np.float64)


def lanczos_singular_values(J: JacobianOperator, k: int, of: str, which: str, *, tol: float,
                            max_iter: int | None, ncv: int | None, generator: torch.Generator,
                            notes: list[str]) -> tuple[Tensor, Tensor]:
    """sigma = sqrt(lambda(A^T A)) by ARPACK's Lanczos (eigsh) per sample, which='LA' or 'SA'.

    The smallest singular values come from the smallest eigenvalues of A^T A (Lanczos finds both ends
    of a symmetric spectrum), not from svds(which='SM'), whose convergence is unreliable; no shift-invert,
    so no inner solves. Their absolute accuracy is ~ eps sigma_max^2 / sigma_min."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh

    B, n = J.batch, J.n
    V0 = torch.randn(B, n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()
    out = np.full((B, k), np.nan)
    converged = np.zeros(B, dtype=bool)
    ncv0 = ncv or min(n, max(2 * k + 1, 40 if which == "smallest" else 20))
    for b in range(B):
        G = _gram_operator(J, b, of)
        msg = ""
        for attempt in range(2):
            ncv_a = min(n, ncv0 * 2 ** attempt)
            maxiter = DEFAULT_MAX_ITER if max_iter is None else max_iter
            try:
                lam = eigsh(G, k=k, which="LA" if which == "largest" else "SA", tol=tol, maxiter=maxiter,
                            ncv=ncv_a, v0=V0[b], return_eigenvectors=False)
            except ArpackNoConvergence as e:
                lam = e.eigenvalues
                msg = f"sample {b}: ARPACK (eigsh) found {len(lam)} of {k} (ncv={ncv_a}, maxiter={maxiter})"
                if attempt == 0:
                    continue
            except ArpackError as e:
                lam, msg = np.array([]), f"sample {b}: ARPACK (eigsh) failed: {e}"
                if attempt == 0:
                    continue
            else:
                msg = ""
            break
        sig = np.sqrt(np.clip(np.asarray(lam, dtype=float), 0.0, None))
        sig = np.sort(sig)[::-1] if which == "largest" else np.sort(sig)
        out[b, :len(sig)] = sig[:k]
        converged[b] = not msg
        if msg:
            notes.append(msg)
    return torch.as_tensor(out, device=J.device), torch.as_tensor(converged, device=J.device)


def singular_values(m, x: Tensor | None = None, z: Tensor | None = None, k: int = 1, *, of: str = "J",
                    which: str = "largest", method: str = "auto", tol: float | None = None,
                    max_iter: int | None = None, ncv: int | None = None,
                    params: Mapping[str, Tensor] | None = None, generator: torch.Generator | None = None,
                    seed: int = 0, dense_max_n: int = 512, jvp: str = "auto",
                    check_fixed_point: bool = True) -> SingularValues:
    """k largest or smallest singular values of A = J or A = I - J at z, per sample.

    sigma_max(J) = ||J||_2 is the Lipschitz constant of the step in z; sigma_min(I - J) =
    sigma_min(I - J^T) bounds the adjoint solve: ||u - u*|| <= ||r|| / sigma_min (adjoint_error_bound).
    method: "dense" (svdvals of the materialised A) | "lanczos" (ARPACK eigsh on A^T A per sample: one
    JVP and one VJP per product; "arnoldi" is accepted as a synonym) | "auto" (dense when n <= dense_max_n).
    """
    where = "fpgrad.spectral.singular_values"
    if of not in OPERATORS:
        raise ValueError(f"{where}: of must be one of {OPERATORS}, got {of!r}")
    if which not in WHICH:
        raise ValueError(f"{where}: which must be one of {WHICH}, got {which!r}")
    if method == "arnoldi":
        method = "lanczos"
    J = resolve_operator(m, x, z, params, where, jvp=jvp, check_fixed_point=check_fixed_point)
    method = resolve_method(method, ("dense", "lanczos"), J.n, dense_max_n, where)
    if not 1 <= k <= J.n:
        raise ValueError(f"{where}: k must be in [1, n={J.n}], got {k}")
    meter = Meter(J)
    notes: list[str] = []
    if method == "lanczos" and k >= J.n:
        notes.append(f"Lanczos needs k < n (k={k}, n={J.n}): used the dense SVD")
        method = "dense"
    if method == "dense":
        s = dense_singular_values(J, of)
        values = s[:, :k] if which == "largest" else s.flip(-1)[:, :k]
        converged = torch.ones(J.batch, dtype=torch.bool, device=J.device)
    else:
        tol = DEFAULT_TOL.get(J.dtype, 1e-6) if tol is None else tol
        values, converged = lanczos_singular_values(J, k, of, which, tol=tol, max_iter=max_iter, ncv=ncv,
                                                    generator=make_generator(generator, seed), notes=notes)
        if not bool(converged.all()):
            warn(f"{where}: Lanczos did not converge for every sample: " + "; ".join(notes)
                          + ". Raise max_iter or ncv, loosen tol, or use method='dense'",
                          ConvergenceWarning)
    jvps, vjps, seconds = meter.done()
    return SingularValues(J._out(values), of, which, J._out(converged), method, jvps, vjps, seconds, notes)
