"""GCRO-DR(m, k), batched: restarted GMRES that deflates a recycled subspace (Parks, de Sturler et al. 2006)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

from ._common import DIVERGED_CODES, MAX_ITER, STAGNATED, LinearSolver, _Run, safe, small_dtype
from ._gmres import INITIAL_CAPACITY, formed_residual, givens_column, least_squares, orthogonalise
from ._recycle import RecycleSpace


@dataclass(frozen=True)
class GCRODR(LinearSolver):
    """GCRO-DR(restart, k) for (I - M) u = b, right preconditioned (A = (I - M) P, u = u0 + P y).

    Per sample U, C: [B, k, n] with A U = C and C orthonormal. A cycle projects the residual off range(C)
    (u += P U C^T r, r -= C C^T r), runs restart - k Arnoldi steps of (I - C C^T) A (restart steps in a first
    cycle with nothing to recycle: plain GMRES), minimises the residual over range(U) + that Krylov space, and
    replaces U, C by the harmonic Ritz vectors of its k harmonic Ritz values of smallest modulus (the slow
    modes, eigenvalues of J near 1), deflated in the next cycle and stored in `space` for the next solve.
    With a space holding U, a solve first computes C = A U: k matvecs (counted in `matvecs`), and its first
    iteration is the projection. max_iter counts iterations (Arnoldi steps and that projection); the residual
    checks at the end of each cycle and the k matvecs for C are matvecs outside it.
    space: a RecycleSpace(k) the caller owns (None: recycle only across the restarts of one solve); a handle,
    left out of equality and hash. `solve(..., state=space)` / `compute(..., state=space)` passes it per solve
    instead (and wins over the field).
    """

    restart: int = 30
    k: int = 10
    space: RecycleSpace | None = field(default=None, compare=False, hash=False)

    name: ClassVar[str] = "gcrodr"
    recycles: ClassVar[bool] = True
    fixes: ClassVar[dict] = {
        MAX_ITER: "raise max_iter, raise restart (now {restart}) or k (now {k}), or pass a preconditioner",
        STAGNATED: "raise restart (now {restart}) or k (now {k}) or pass a preconditioner; or {precision}",
    }

    def _check_config(self) -> None:
        super()._check_config()
        if self.k < 1:
            raise ValueError(f"gcrodr: k must be >= 1, got {self.k} (k = 0 is solver='gmres')")
        if self.restart <= self.k:
            raise ValueError(f"gcrodr: restart ({self.restart}) must exceed k ({self.k}): a cycle holds the k recycled "
                             f"directions and restart - k Arnoldi vectors")
        self._check_state(None)

    def _check_state(self, state):
        """The RecycleSpace of this solve: `state` if given, else the `space` handle (validated)."""
        space = self.space if state is None else state
        if space is not None:
            if not isinstance(space, RecycleSpace):
                raise TypeError(f"gcrodr: space must be a RecycleSpace, got {type(space).__name__}")
            if space.k != self.k:
                raise ValueError(f"gcrodr: the RecycleSpace holds k={space.k} directions but the solver recycles "
                                 f"k={self.k}: pass GCRODR(k={space.k}, ...) or RecycleSpace(k={self.k})")
        return space

    # --- the run -----------------------------------------------------------------------------------------------
    def _iterate(self, run: _Run) -> None:
        if run.state is not None:
            run.state.check(run.b, self.name)
        state = _Recycling.start(self, run)
        run.cache["recycle"] = state
        super()._iterate(run)
        notes = [state.note] if state.note else []
        if state.columns:
            notes.append(f"recycled {state.columns} directions ({state.matvecs} of the {run.matvecs} matvecs "
                         "computed (I - M) U)")
        if run.state is not None:
            diverged = torch.isin(run.status, torch.tensor(DIVERGED_CODES, device=run.status.device))
            keep = (run.iterations > 0) & ~diverged & torch.isfinite(state.U).all(2).all(1)
            B, n = run.b.shape
            run.state.store(state.U, keep, state.loaded,
                             {"batch": B, "n": n, "recycled": state.columns, "recycle_matvecs": state.matvecs,
                              "matvecs": run.matvecs, "iterations": int(run.iterations.max()), "note": state.note})
        run.cache["notes"] = notes

    def _cycle(self, run: _Run, members: Tensor) -> Tensor | None:
        state: _Recycling = run.cache["recycle"]
        B, n = run.b.shape
        k = self.k
        eps = torch.finfo(run.b.dtype).eps
        U, C = state.U, state.C
        # projection off range(C): A U = C, so u += P U c lowers r by C c
        c = torch.where(members.unsqueeze(1), torch.bmm(C, run.r.unsqueeze(2)).squeeze(2), 0)      # [B, k]
        t = torch.bmm(c.unsqueeze(1), U).squeeze(1)                  # correction of u before P
        r = run.r - torch.bmm(c.unsqueeze(1), C).squeeze(1)
        active = members
        plain = not state.recycled              # no recycled space: this cycle is plain GMRES
        if state.project_row:                   # the projection on a space from earlier solves is an iteration
            state.project_row = False
            rel = r.norm(dim=1) / run.scale
            active = run.record(rel, members) & ~(rel <= run.threshold)
        m = min(self.restart - k if state.recycled else self.restart, run.budget, n)
        beta = r.norm(dim=1)
        ws = _Workspace(C, min(m, INITIAL_CAPACITY))
        ws.W[:, k] = r / safe(beta).unsqueeze(1)
        steps = torch.zeros_like(run.status)
        s = 0
        for j in range(m):
            if not bool(active.any()):
                break
            if j == ws.capacity:
                ws = ws.grown(min(2 * j, m))
            W, Qt, R = ws.W, ws.Qt, ws.R
            w = run.A(run.precondition(W[:, k + j]), active)
            basis = W[:, : k + j + 1]                                # C, then the Arnoldi vectors
            coef, w, hn, not_lucky = orthogonalise(basis, w, eps)  # CGS2 against C and V
            h = coef[:, k:]
            keep = givens_column(Qt, R, h, hn, j, active.unsqueeze(1))     # (columns [B, 1])
            stepping, hn, not_lucky = keep.squeeze(1), hn.squeeze(1), not_lucky.squeeze(1)
            ws.H[:, : j + 1, j] = torch.where(keep, h, 0)
            ws.H[:, j + 1, j] = torch.where(stepping, hn, 0)
            ws.Bk[:, :, j] = torch.where(keep, coef[:, :k], 0)       # C^T A v_j
            extends = stepping & not_lucky       # (where not lucky hn > 0: dividing by it needs no guard)
            W[:, k + j + 1] = torch.where(extends.unsqueeze(1), w / torch.where(extends, hn, 1).unsqueeze(1), 0)
            steps += stepping
            rel = (beta * Qt[:, j + 1, 0].abs() / run.scale).to(run.rel.dtype)
            active = run.record(rel, active) & stepping & ~(rel <= run.threshold)
            s = j + 1
        if s > 0:
            # min ||beta e1 - Hbar y||, then the U part cancels C^T A V y:  du = V y - U (C^T A V) y
            y = least_squares(ws.Qt, ws.R, beta, steps, s).to(ws.W.dtype)
            if plain:
                # as GMRES: the residual of the update formed from the basis, which spares close() its matvec.
                # (With a recycled space it would also rest on A U = C, whose rounding the SVD that made C can
                # scale by up to 1 / sqrt(eps): there the true residual is computed.)
                # (r = beta W[:, k], the residual after the projection, is this cycle's starting residual)
                run.recurrence = formed_residual(r, ws.H[:, : s + 1, :s], y, ws.W[:, k : k + s + 1], beta, run.u,
                                                 eps)
            By = torch.bmm(ws.Bk[:, :, :s], y.unsqueeze(2)).squeeze(2)
            t = t + torch.bmm(y.unsqueeze(1), ws.W[:, k : k + s]).squeeze(1) - torch.bmm(By.unsqueeze(1), U).squeeze(1)
        run.u = torch.where(members.unsqueeze(1), run.u + run.precondition(t), run.u)
        if s > 0:
            state.U, state.C = _harmonic_ritz(U, ws, steps, s, members)
            state.recycled = True
        return None

    def _message(self, run: _Run, residuals: Tensor) -> str:
        plain = self if self.space is None else replace(self, space=None)    # asdict would deep-copy the space
        text = LinearSolver._message(plain, run, residuals)
        return "; ".join([text, *run.cache.get("notes", [])])


class _Recycling:
    """Per-run recycling state: U, C: [B, k, n] with (I - M) P U = C, C orthonormal (zero rows: unused)."""

    def __init__(self, U: Tensor, C: Tensor, loaded: Tensor | None, note: str | None, matvecs: int):
        self.U, self.C, self.loaded, self.note, self.matvecs = U, C, loaded, note, matvecs
        self.columns = int((C != 0).any(2).sum(1).max())        # recycled from the space (at most, per sample)
        self.recycled = self.columns > 0        # cycles run restart - k Arnoldi steps (the first: restart if not)
        self.project_row = self.recycled        # record the first projection as an iteration

    @classmethod
    def start(cls, solver: GCRODR, run: _Run) -> _Recycling:
        B, n = run.b.shape
        zeros = run.b.new_zeros(B, solver.k, n)
        loaded, note = (None, None) if run.state is None else run.state.load(run.b)
        if loaded is None:
            return cls(zeros, zeros.clone(), None, note, 0)
        members = run.running
        AU = zeros.clone()
        matvecs = 0
        for i in range(solver.k):
            if bool((loaded[:, i] != 0).any(1)[members].any()):
                AU[:, i] = run.A(run.precondition(loaded[:, i]), members)
                matvecs += 1
        U, C = _orthonormalise(loaded, AU)
        return cls(U, C, loaded, note, matvecs)


def _orthonormalise(U: Tensor, AU: Tensor) -> tuple[Tensor, Tensor]:
    """U, C: [B, k, n] with A U = C and C orthonormal, from U and AU = A U (SVD of AU per sample; directions
    with singular value below sqrt(eps) x the largest are dropped: zero rows)."""
    B, k, n = U.shape
    AU = torch.where(torch.isfinite(AU).all(2).all(1).view(B, 1, 1), AU, 0)  # a non-finite sample recycles nothing
    left, s, right = torch.linalg.svd(AU.transpose(1, 2).double(), full_matrices=False)   # [B,n,r] [B,r] [B,r,k]
    keep = s > torch.finfo(U.dtype).eps ** 0.5 * s[:, :1]
    inv = torch.where(keep, 1 / safe(s), 0)
    C = (left * keep.unsqueeze(1)).transpose(1, 2)
    Unew = torch.bmm(right * inv.unsqueeze(2), U.double())
    out_U, out_C = torch.zeros_like(U), torch.zeros_like(U)
    out_U[:, : s.shape[1]], out_C[:, : s.shape[1]] = Unew.to(U.dtype), C.to(U.dtype)
    return out_U, out_C


def _harmonic_ritz(U: Tensor, ws: _Workspace, steps: Tensor, s: int, members: Tensor) -> tuple[Tensor, Tensor]:
    """New U, C for the samples in `members`: the harmonic Ritz vectors of A in W_hat = [U~, V_s] for the k
    harmonic Ritz values of smallest modulus, with A W_hat = V_hat G (V_hat = [C, V_{s+1}]):
    G^T G z = theta G^T V_hat^T W_hat z, solved as the largest eigenvalues 1/theta of G^+ V_hat^T W_hat.
    Unused directions (zero rows of U, steps beyond a sample's last) are padded so that they decouple."""
    B, k, n = U.shape
    q = k + s
    unorm = U.norm(dim=2)
    has_u = unorm > 0
    d = torch.where(has_u, 1 / safe(unorm), 1)
    Ut = U * torch.where(has_u, d, 0).unsqueeze(2)                               # unit rows
    valid = torch.cat([has_u, torch.arange(s, device=U.device) < steps.unsqueeze(1)], 1)        # [B, q]
    f64 = dict(dtype=torch.float64, device=U.device)
    G = torch.zeros(B, q + 1, q, **f64)
    G[:, :k, :k] = torch.diag_embed(d.double())
    G[:, :k, k:] = ws.Bk[:, :, :s].double()
    G[:, k:, k:] = ws.H[:, : s + 1, :s].double()
    shift = torch.zeros(q + 1, q, **f64)
    shift[torch.arange(1, q + 1), torch.arange(q)] = 1
    padded = ~valid & (torch.arange(q, device=U.device) >= k)
    G = torch.where(padded.unsqueeze(1), shift, G)                 # unused step j: e_(k+j+1), a row no one uses
    Vhat = ws.W[:, : q + 1]
    Z = torch.zeros(B, q + 1, q, **f64)
    Z[:, :, :k] = torch.bmm(Vhat, Ut.transpose(1, 2)).double()
    Z[:, k : k + s, k:] = torch.eye(s, **f64)
    Z = torch.where(valid.unsqueeze(1), Z, 0)
    # samples outside `members` or with non-finite entries get a harmless stand-in and keep their U, C
    ok = members & torch.isfinite(G).all(2).all(1) & torch.isfinite(Z).all(2).all(1)
    G, Z = torch.where(ok.view(B, 1, 1), G, shift), torch.where(ok.view(B, 1, 1), Z, 0)
    Qg, Rg = torch.linalg.qr(G)
    X = torch.linalg.solve_triangular(Rg, Qg.transpose(1, 2) @ Z, upper=True)            # G^+ Z
    ok = ok & torch.isfinite(X).all(2).all(1)
    X = torch.where(ok.view(B, 1, 1), X, 0)
    try:
        mu, vectors = torch.linalg.eig(X)
        pick = mu.abs().topk(k, dim=1).indices
        mu = mu.gather(1, pick)
        vectors = vectors.gather(2, pick.unsqueeze(1).expand(B, q, k))
        # a complex pair spans the real plane of (Re, Im): its eigenvalue of positive imaginary part gives Re,
        # its conjugate Im
        P = torch.where(mu.imag.unsqueeze(1) < 0, vectors.imag, vectors.real) * valid.unsqueeze(2)
        left, sv, right = torch.linalg.svd(torch.bmm(G, P), full_matrices=False)      # [B,q+1,k] [B,k] [B,k,k]
    except RuntimeError:            # LAPACK did not converge: keep U, C (still a pair with A U = C)
        return U, ws.W[:, :k].clone()
    keep = sv > torch.finfo(U.dtype).eps ** 0.5 * sv[:, :1]
    inv = torch.where(keep, 1 / safe(sv), 0)
    F = torch.bmm(P, right.transpose(1, 2)) * inv.unsqueeze(1)                           # [B, q, k]
    C_new = torch.bmm((left * keep.unsqueeze(1)).transpose(1, 2).to(U.dtype), Vhat)
    What = torch.cat([Ut, ws.W[:, k : k + s]], 1)
    U_new = torch.bmm(F.transpose(1, 2).to(U.dtype), What)
    ok = ok.view(B, 1, 1)
    return torch.where(ok, U_new, U), torch.where(ok, C_new, ws.W[:, :k])


class _Workspace:
    """W: [B, k + c + 1, n] (C, then the Arnoldi basis), rotations Q^T: [B, c + 1, c + 1], R: [B, c, c],
    the Hessenberg matrix H: [B, c + 1, c] and B_k = C^T A V: [B, k, c] for c = capacity Arnoldi steps."""

    def __init__(self, C: Tensor, capacity: int):
        B, k, n = C.shape
        self.capacity = capacity
        self.W = C.new_zeros(B, k + capacity + 1, n)
        self.W[:, :k] = C
        self.Qt = torch.eye(capacity + 1, dtype=small_dtype(C.dtype), device=C.device).repeat(B, 1, 1)
        self.R = torch.zeros(B, capacity, capacity, dtype=self.Qt.dtype, device=C.device)
        self.H = C.new_zeros(B, capacity + 1, capacity)
        self.Bk = C.new_zeros(B, k, capacity)

    def grown(self, capacity: int) -> _Workspace:
        k, c = self.Bk.shape[1], self.capacity
        new = _Workspace(self.W[:, :k], capacity)
        new.W[:, : k + c + 1] = self.W
        new.Qt[:, : c + 1, : c + 1] = self.Qt
        new.R[:, :c, :c] = self.R
        new.H[:, : c + 1, :c] = self.H
        new.Bk[:, :, :c] = self.Bk
        return new
