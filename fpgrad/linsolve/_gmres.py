"""Restarted GMRES(m), batched: one Arnoldi basis and one set of Givens rotations per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .._checks import check_period, host_check
from ._common import MAX_ITER, STAGNATED, LinearSolver, _Run, safe, small_dtype


@dataclass(frozen=True)
class GMRES(LinearSolver):
    """Restarted GMRES(restart) for (I - M) u = b, right preconditioned: min ||b - A P y||, u = u0 + P y.

    Per sample an Arnoldi basis V: [B, restart + 1, n] (classical Gram-Schmidt applied twice, as stable as
    modified GS and done in batched matrix products) and the product of its Givens rotations Q^T:
    [B, restart + 1, restart + 1], which gives the residual of the least-squares problem after every matvec
    (both grown on demand, so a large restart costs memory only for the steps taken).
    A sample whose residual estimate reaches tol stops extending its basis. At the end of each cycle the true
    residual is computed (one matvec) and the cycle restarts from it; after the last cycle (every sample below
    tol, or max_iter reached) the residual formed from the basis, V (beta e1 - Hbar y), stands in for it where a
    bound on their gap (recurrence_bound) cannot change any sample's verdict and no preconditioner is given: a
    converged solve costs its Arnoldi steps and no more. M must therefore be linear (a VJP or JVP is). max_iter
    counts Arnoldi steps (matvecs other than the residual checks). With right preconditioning the minimised
    residual is the true one.
    A batch of one sample solves its small Hessenberg problem on the host (same arithmetic, fewer tensor ops).
    check_every: most Arnoldi steps between the host's "is any sample still stepping?" check (a device -> host
    sync); None: 1 on the CPU, 8 on CUDA. A check also predicts, from the rate the residuals fell, when the
    slowest sample will stop, and the next check comes then if sooner. Between checks the per-sample masks
    stay on the device; the steps run after the last sample stopped are dropped from the trace (their matvecs
    are counted). With check_every > 1 the rotations are not applied step by step: the Hessenberg columns are
    stored and factored once per host check by a batched Householder QR (about 38 dispatched operations an
    Arnoldi step with a matrix operator instead of about 55; the same iterations and solution up to round-off).
    The batch of one solves on the host and syncs once a step whatever check_every says.
    """

    restart: int = 30
    check_every: int | None = None

    name: ClassVar[str] = "gmres"
    fixes: ClassVar[dict] = {
        MAX_ITER: "raise max_iter, raise restart (now {restart}) or pass a preconditioner",
        STAGNATED: "restarted GMRES can stagnate: raise restart (now {restart}) or pass a preconditioner; or "
                   "{precision}",
    }

    def _check_config(self) -> None:
        super()._check_config()
        if self.restart < 1:
            raise ValueError(f"gmres: restart must be >= 1, got {self.restart}")
        check_period(self.check_every, "cpu", self.name)

    def _cycle(self, run: _Run, members: Tensor) -> Tensor | None:
        if run.b.shape[0] == 1:
            return _single_cycle(self, run)
        B, n = run.b.shape
        m = min(self.restart, run.budget, n)
        period = check_period(self.check_every, run.b.device, self.name)
        if period > 1:
            return _deferred_cycle(self, run, members, m, period)
        eps = torch.finfo(run.b.dtype).eps
        beta = run.r.norm(dim=1)
        V, Qt, R = _workspace(run.b, min(m, INITIAL_CAPACITY))
        # per-sample quantities of the loop are columns [B, 1]: they broadcast against the rows [B, n] without an
        # unsqueeze a step (each one a dispatch on a GPU). The cycle's residual rows and masks are recorded in the
        # run once, after the loop (three operations a cycle)
        col = members.unsqueeze(1)
        # V holds zero rows for the samples out of the loop's mask, so each product needs no mask of its own: the
        # samples outside `members` start with a zero vector, and a sample leaving the mask gets a zero next vector
        V[:, 0] = torch.where(col, run.r / safe(beta).unsqueeze(1), 0)
        stepped: list[Tensor] = []                          # each step's `stepping` column
        rows: list[Tensor] = [run.rows[-1].unsqueeze(1)]    # residual columns: the run's last row, then each step's
        entered: list[Tensor] = []                          # each step's active column
        zero = V.new_zeros(())
        beta_rel = (beta / run.scale).to(Qt.dtype).unsqueeze(1)   # the residual estimate is beta_rel |Q^T[j + 1, 0]|
        threshold = run.threshold.unsqueeze(1) if isinstance(run.threshold, Tensor) else run.threshold
        growth_limit = run.growth_limit.unsqueeze(1) if isinstance(run.growth_limit, Tensor) else run.growth_limit
        q0 = Qt[:, :, 0]                                    # (a view: one slice a step)
        active = col
        k = 0
        next_check = 0
        for j in range(m):
            if j == next_check:           # the host check (period > 1: next when the slowest is predicted to stop)
                n_active, ahead = _cycle_check(run, rows, active, period, threshold)
                if n_active == 0:
                    break
                next_check = j + ahead
            if j == R.shape[-1]:
                V, Qt, R = _workspace(run.b, min(2 * j, m), (V, Qt, R))
                q0 = Qt[:, :, 0]
            w = run.A(run.precondition(V[:, j]))            # (zero rows outside `active`: see V[:, 0])
            basis = V[:, : j + 1]
            h, w, hn, extends = orthogonalise(basis, w, eps)
            stepping = givens_column(Qt, R, h, hn, j, active)
            stepped.append(stepping)
            rel = beta_rel * q0[:, j + 1 : j + 2].abs()
            if rel.dtype != run.rel.dtype:
                rel = rel.to(run.rel.dtype)
            # record_step's arithmetic on columns: the residual frozen outside `active`; the samples that go on
            # have not reached the threshold, not diverged and not gone NaN (NaN compares False both ways: such
            # a sample leaves here and settle() flags it)
            rows.append(torch.where(active, rel, rows[-1]))
            entered.append(active)
            active = stepping & (rel > threshold) & (rel <= growth_limit)
            # the next vector, zero for the samples that did not step (a sample that stepped and leaves keeps it:
            # the residual formed after the loop needs it; its row in the next product is discarded). At a lucky
            # breakdown hn = 0 makes the new rotation's sine 0, so the residual estimate is exactly 0 and the
            # sample leaves (the division by hn = 0 is masked out)
            nxt = V[:, j + 1]
            torch.where(stepping & extends, w / hn, zero, out=nxt)     # (written in place)
            k = j + 1
        if entered:
            run.rows.extend(torch.cat(rows[1:], 1).unbind(1))
            run.actives.extend(torch.cat(entered, 1).unbind(1))
        run.settle(members)
        steps = torch.cat(stepped, 1).sum(1) if stepped else torch.zeros_like(run.status)
        if k > 0:
            y = least_squares(Qt, R, beta, steps, k)
            # the residual of the update, from the basis: beta e1 - Hbar y = Q (beta Q^T e1)[steps] e_steps, so
            # r = (beta Q^T e1)[steps] V^T Q^T[steps, :] (row `steps` of Q^T is untouched by the identity
            # rotations of the steps a sample did not take, and zero past column `steps`)
            q = Qt[torch.arange(B, device=Qt.device), steps, : k + 1]                  # [B, k + 1]
            coefficients = beta.to(q.dtype).unsqueeze(1) * q[:, :1] * q
            residual = torch.bmm(coefficients.to(V.dtype).unsqueeze(1), V[:, : k + 1]).squeeze(1)
            run.recurrence = (residual, recurrence_bound(eps, beta, y, R[:, :k, :k].norm(dim=1).amax(1), run.u))
            y = y.to(V.dtype)
            du = run.precondition(torch.bmm(y.unsqueeze(1), V[:, :k]).squeeze(1))
            run.u = torch.where((steps > 0).unsqueeze(1), run.u + du, run.u)
        return None


# the constants of recurrence_bound: the measured gap, over normal and far-from-normal maps, n 50-3000, float32 and
# float64, reached 2.0 eps (beta + a sum |y_j|) in a first cycle and 9.3 eps a ||u0|| past it (u0: the iterate a
# restarted cycle starts from): at most 0.11 of the bound (tests/test_gmres_recurrence.py asks for 0.25)
ROUNDING_CYCLE = 16.0
ROUNDING_START = 128.0


def recurrence_bound(eps: float, beta: Tensor, y: Tensor, a: Tensor, u0: Tensor) -> Tensor:
    """[B]: a bound on the gap between r, the residual formed from a GMRES basis for u = u0 + V y, and the residual
    b - A u a fresh product would give: eps (16 (beta + a sum_j |y_j|) + 128 a ||u0||), with a = max_j ||A v_j||
    (the largest Hessenberg column; R's too: Q is orthogonal) standing for ||A||. Each product A v_j carries a
    rounding error of about eps ||A|| (v_j is a unit vector), which r collects with weight |y_j|; Gram-Schmidt
    and the combinations forming u and r add about eps beta. The products behind the cycle's starting residual
    (from u0) and the one a check would apply to u round at eps ||A|| ||u0||, with sums of n terms: their
    constant is the larger. (Where A is far from normal, ||u|| can be many orders above ||b||: the true
    residual is then known only to eps ||A|| ||u||, and the bound says so.) Five operations."""
    u0_norm = u0.norm(dim=1)
    if beta.dtype != y.dtype:                                   # (bfloat16: y, a are float32)
        beta, u0_norm = beta.to(y.dtype), u0_norm.to(y.dtype)
    spread = torch.add(torch.linalg.vector_norm(y, 1, dim=1), u0_norm, alpha=ROUNDING_START / ROUNDING_CYCLE)
    return torch.addcmul(beta, a, spread).mul_(eps * ROUNDING_CYCLE)


def formed_residual(r0: Tensor, H: Tensor, y: Tensor, V: Tensor, beta: Tensor, u0: Tensor, eps: float
                    ) -> tuple[Tensor, Tensor]:
    """(r0 - V^T Hbar y, its recurrence_bound): the residual of u0 + V[:, :k] y formed from an Arnoldi basis
    V: [B, k + 1, n] with A V[:, :k] = V Hbar (H: [B, k + 1, k]) and r0 = beta V[:, 0] (the cycle's starting
    residual), without a product. Six operations."""
    Hy = torch.bmm(H, y.unsqueeze(2)).transpose(1, 2)                                   # [B, 1, k + 1]
    if Hy.dtype != V.dtype:
        Hy = Hy.to(V.dtype)
    residual = torch.baddbmm(r0.unsqueeze(1), Hy, V, alpha=-1).squeeze(1)
    return residual, recurrence_bound(eps, beta, y, H.norm(dim=1).amax(1), u0)


def _cycle_check(run: _Run, rows: list[Tensor], active: Tensor, period: int, threshold) -> tuple[int, int]:
    """A batched cycle's host check: (0 if no sample is active, else 1; steps until the next check). rows: the
    cycle's residual columns [B, 1], the first being the run's last row; the prediction reads the residuals
    `period` steps back, reaching into the run's rows before the cycle."""
    gap = min(period, len(run.rows) + len(rows) - 2) if period > 1 else 0
    before = None
    if gap:
        before = rows[-1 - gap] if gap < len(rows) else run.rows[len(rows) - 2 - gap].unsqueeze(1)
    return host_check(active, period, rows[-1], before, gap, threshold, count=False)


def _deferred_cycle(solver: GMRES, run: _Run, members: Tensor, m: int, period: int) -> None:
    """The batched cycle with check_every > 1 (the CUDA default): the Hessenberg columns are stored and factored
    only at a host check, by one batched Householder QR, instead of one Givens rotation per Arnoldi step.

    Between checks nothing is read on the host, so the per-step rotation served only to know each step which
    samples had stopped. Here an Arnoldi step is the matvec, CGS2 and two writes (~38 dispatched operations
    with a matrix operator instead of ~55), and a check factors H[:, :j + 1, :j] = Q R (geqrf): the
    least-squares residual after step t is beta ||(Q^T e1)[t + 1:]|| (a tail norm: exact in float32 too, where
    1 - sum (Q^T e1)[:t + 1]^2 would lose everything below ~2e-4), and the per-step masks of the rotated loop
    (which samples entered each step, which stepped, the frozen residual rows) follow from those residuals and
    R's diagonal in a few operations. A sample that stopped between checks keeps extending its basis until the
    check (on a GPU its rows cost nothing extra: the batch runs for the slowest sample); those columns never
    enter its solution (its triangular system gets identity columns past its steps). A non-finite column stops
    its sample as NaN, as the rotated loop's check does; the result equals check_every = 1's up to round-off."""
    B, n = run.b.shape
    eps = torch.finfo(run.b.dtype).eps
    small = small_dtype(run.b.dtype)
    beta = run.r.norm(dim=1)
    capacity = min(m, INITIAL_CAPACITY)
    V = run.b.new_zeros(B, capacity + 1, n)
    H = torch.zeros(B, capacity + 1, capacity, dtype=small, device=run.b.device)
    col = members.unsqueeze(1)
    V[:, 0] = torch.where(col, run.r / safe(beta).unsqueeze(1), 0)
    beta_rel = (beta / run.scale).to(small).unsqueeze(1)
    threshold = run.threshold.unsqueeze(1) if isinstance(run.threshold, Tensor) else run.threshold
    growth_limit = run.growth_limit.unsqueeze(1) if isinstance(run.growth_limit, Tensor) else run.growth_limit
    rows: list[Tensor] = [run.rows[-1].unsqueeze(1)]    # as in the rotated loop: [B, 1] columns, one a step
    entered: list[Tensor] = []
    steps = torch.zeros(B, dtype=torch.long, device=run.b.device)
    active = col              # the samples still stepping after the last factored step
    live = col                # the samples whose basis still grows (active at the last check, no breakdown)
    zero = V.new_zeros(())
    one = H.new_ones(1, 1)
    factored, k, next_check = 0, 0, 0
    qe1 = R = None                # Q^T e1 and R of the last factorisation

    def factor(upto: int) -> None:
        """Factor H's first `upto` columns; derive the masks and residual rows of steps factored..upto - 1."""
        nonlocal active, steps, qe1, R
        Hk = H[:, : upto + 1, :upto]
        finite = torch.isfinite(Hk).all(dim=1)                                  # [B, upto]: columns
        # Householder QR (geqrf: batched on CUDA): R in the upper triangle of R, reflector i = I - tau_i v_i v_i^T
        # with v_i = e_i + R[i + 1, i] e_{i + 1} (H is Hessenberg, so each v has one entry below the diagonal).
        # Q^T e1, applied reflector by reflector, is then a running product: entry i is (1 - tau_i) prod_{l < i}
        # d_l and the last prod_l d_l, with d_l = -tau_l R[l + 1, l]: no Q formed (orgqr loops over the batch on
        # CUDA)
        R, tau = torch.geqrf(torch.where(finite.unsqueeze(1), Hk, 0))
        running = torch.cumprod(-tau * R.diagonal(offset=-1, dim1=1, dim2=2), 1)
        q0 = torch.cat([1 - tau, one.expand(B, 1)], 1) * torch.cat([one.expand(B, 1), running], 1)
        qe1 = q0
        tails = q0.square().flip(1).cumsum(1).flip(1).sqrt()                    # ||(Q^T e1)[i:]||, i = 0..upto
        window = slice(factored, upto)
        rel = beta_rel * tails[:, factored + 1 : upto + 1]                      # [B, L]: after each new step
        rel = torch.where(finite[:, window], rel, math.nan)                      # a NaN column: a NaN residual
        if rel.dtype != run.rel.dtype:
            rel = rel.to(run.rel.dtype)
        diag = R.diagonal(dim1=1, dim2=2)[:, window].abs()
        stepping_ok = diag > 0                                                  # (False for NaN)
        going = stepping_ok & (rel > threshold) & (rel <= growth_limit)
        # entered step t: active before the window and every earlier step of the window went on
        ent = torch.cat([active, going[:, :-1]], 1).long().cumprod(1).bool()
        took = ent & stepping_ok
        # residual rows frozen outside `entered`: a sample's value after it left is its last entered step's
        n_in = ent.sum(1, keepdim=True)
        last = rel.gather(1, (n_in - 1).clamp(min=0))
        frozen = torch.where(n_in > 0, last, rows[-1])
        new_rows = torch.where(ent, rel, frozen)
        rows.extend(new_rows.split(1, 1))
        entered.extend(ent.split(1, 1))
        steps = steps + took.sum(1)
        active = ent[:, -1:] & going[:, -1:]

    for j in range(m):
        if j == next_check:
            if j > factored:
                factor(j)
                factored = j
                live = active
            n_active, ahead = _cycle_check(run, rows, active, period, threshold)
            if n_active == 0:
                break
            next_check = j + ahead
        if j == H.shape[-1]:
            grown = min(2 * j, m)
            V = torch.cat([V, V.new_zeros(B, grown - j, n)], 1)
            H = torch.cat([torch.cat([H, H.new_zeros(B, grown - j, j)], 1), H.new_zeros(B, grown + 1, grown - j)], 2)
        w = run.A(run.precondition(V[:, j]))            # (zero rows outside `live`)
        h, w, hn, extends = orthogonalise(V[:, : j + 1], w, eps)
        H[:, : j + 2, j] = torch.cat([h, hn], 1)
        live = live & extends
        torch.where(live, w / hn, zero, out=V[:, j + 1])
        k = j + 1
    if k > factored:
        factor(k)
    if entered:
        run.rows.extend(torch.cat(rows[1:], 1).unbind(1))
        run.actives.extend(torch.cat(entered, 1).unbind(1))
    run.settle(members)
    run.drop_idle_tail(period - 1)
    if k > 0 and R is not None:
        # each sample's first `steps` columns: R there, the identity past them (y = 0 there)
        used = torch.arange(k, device=steps.device) < steps.unsqueeze(1)             # [B, k]
        Rk = torch.where(used.unsqueeze(1) & used.unsqueeze(2), R[:, :k, :k], _identity(k, R.dtype, R.device))
        g = torch.where(used, beta.unsqueeze(1).to(R.dtype) * qe1[:, :k], 0)
        y = torch.linalg.solve_triangular(Rk, g.unsqueeze(2), upper=True).squeeze(2)
        # (y is zero past a sample's own columns, so the columns a stopped sample went on adding between checks
        # drop out, unless NaN: then the residual is NaN and close() computes the product)
        run.recurrence = formed_residual(run.r, H[:, : k + 1, :k], y, V[:, : k + 1], beta, run.u, eps)
        if y.dtype != V.dtype:
            y = y.to(V.dtype)
        du = run.precondition(torch.bmm(y.unsqueeze(1), V[:, :k]).squeeze(1))
        run.u = torch.where((steps > 0).unsqueeze(1), run.u + du, run.u)
    return None


def _single_cycle(solver: GMRES, run: _Run) -> None:
    """One cycle for a batch of one sample: the same arithmetic as the batched cycle (CGS2, Givens rotations,
    recursive residual), with the small Hessenberg problem on the host in float64 scalars instead of ~50 tiny
    tensor operations per step: one host sync per Arnoldi step (the batched cycle also syncs once, to test for
    active samples). On small systems those tensor operations cost more than the products (benchmarks/
    solver_overhead.py)."""
    n = run.b.shape[1]
    m = min(solver.restart, run.budget, n)
    eps = torch.finfo(run.b.dtype).eps
    beta = float(run.r.norm())
    scale, threshold = float(run.scale), float(run.threshold)
    growth_limit = float(run.growth_limit)
    V = run.b.new_zeros(min(m, INITIAL_CAPACITY) + 1, n)
    V[0] = run.r[0] / (beta if beta > 0 else 1.0)
    cs: list[float] = []
    sn: list[float] = []
    columns: list[list[float]] = []   # column j of R: j + 1 entries
    g = [beta]                        # beta Q^T e1, rotated so far
    rels: list[float] = []
    for j in range(m):
        if j + 1 == V.shape[0]:
            grown = run.b.new_zeros(min(2 * j, m) + 1, n)
            grown[: j + 1] = V
            V = grown
        w = run.A(run.precondition(V[j : j + 1]))[0]
        basis = V[: j + 1]
        norm0 = w.norm()
        c1 = torch.mv(basis, w)
        w = w - torch.mv(basis.T, c1)
        c2 = torch.mv(basis, w)
        w = w - torch.mv(basis.T, c2)
        hn = w.norm()
        *col, hn_f, norm0_f = torch.cat([c1 + c2, hn.view(1), norm0.view(1)]).tolist()
        lucky = not hn_f > eps * norm0_f
        if lucky:
            hn_f = 0.0
        for i in range(j):
            a, b = col[i], col[i + 1]
            col[i], col[i + 1] = cs[i] * a + sn[i] * b, cs[i] * b - sn[i] * a
        diag = math.hypot(col[j], hn_f)
        if not diag > 0:                # singular Hessenberg (or NaN): stop here, the column is not taken
            if not math.isfinite(diag):
                rels.append(math.nan)
            break
        c, s = col[j] / diag, hn_f / diag
        cs.append(c)
        sn.append(s)
        col[j] = diag
        columns.append(col[: j + 1])
        g[j], g_next = c * g[j], -s * g[j]
        g.append(g_next)
        rel = abs(g_next) / scale
        rels.append(rel)
        if not lucky:
            V[j + 1] = w / hn_f
        if not rel > threshold or not math.isfinite(rel) or rel > growth_limit:
            break
    if rels:
        run.record_trace(torch.tensor(rels, dtype=run.rel.dtype, device=run.rel.device).unsqueeze(1))
    k = len(columns)
    if k > 0 and bool(run.running.all()):
        R = np.zeros((k, k))
        for j, col in enumerate(columns):
            R[: j + 1, j] = col
        y = scipy.linalg.solve_triangular(R, np.asarray(g[:k]))
        # the residual of the update, from the basis: g[k] V^T Q e_k, Q e_k = G_0^T ... G_{k-1}^T e_k
        q = [0.0] * k + [1.0]
        for i in reversed(range(k)):
            a, b = q[i], q[i + 1]
            q[i], q[i + 1] = cs[i] * a - sn[i] * b, sn[i] * a + cs[i] * b
        coefficients = torch.tensor([g[k] * x for x in q], dtype=run.b.dtype, device=run.b.device)
        residual = torch.mv(V[: k + 1].T, coefficients).unsqueeze(0)
        y = torch.as_tensor(y, dtype=run.b.dtype).to(run.b.device)
        a = run.rel.new_full((1,), float(np.linalg.norm(R, axis=0).max()))
        run.recurrence = (residual, recurrence_bound(eps, run.rel.new_full((1,), beta), y.unsqueeze(0), a, run.u))
        run.u = run.u + run.precondition(torch.mv(V[:k].T, y).unsqueeze(0))
    return None


def orthogonalise(basis: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Classical Gram-Schmidt applied twice (CGS2) of w: [B, n] against the rows of basis: [B, j, n].

    Returns (coefficients [B, j], the orthogonal remainder, its norm [B, 1] with 0 where the remainder vanished
    relative to w, and the mask [B, 1] of the others: where it is False the space is invariant, the solution
    exact, a "lucky" breakdown). Each pass is two batched products, the second fused with the subtraction (baddbmm):
    ~13 dispatched operations a step, not ~21."""
    norm0 = w.norm(dim=1, keepdim=True)
    w3 = w.unsqueeze(1)                                  # [B, 1, n]
    basis_t = basis.transpose(1, 2)                      # [B, n, j]
    c1 = torch.bmm(w3, basis_t)                          # [B, 1, j]
    w3 = torch.baddbmm(w3, c1, basis, alpha=-1)
    c2 = torch.bmm(w3, basis_t)
    w3 = torch.baddbmm(w3, c2, basis, alpha=-1)
    w = w3.squeeze(1)
    hn = w.norm(dim=1, keepdim=True)
    extends = hn > eps * norm0                           # (False for a NaN remainder too)
    return (c1 + c2).squeeze(1), w, torch.where(extends, hn, 0), extends


def givens_column(Qt: Tensor, R: Tensor, h: Tensor, hn: Tensor, j: int, active: Tensor) -> Tensor:
    """Bring Hessenberg column j (h: [B, j + 1], subdiagonal hn: [B, 1]) into R with the rotations so far and one
    new rotation, updating Q^T and R in place. active: [B, 1]. Returns the samples that took the step ([B, 1]:
    active, with a nonzero diagonal; for the others R gets an identity column: a singular Hessenberg matrix
    stops them here).
    The new rotation is applied to rows j, j + 1 of Q^T as one batched 2 x 2 product (a GPU step here is bound
    by dispatches: ~25 operations, not ~50)."""
    column = torch.cat([h, hn], 1)
    if column.dtype != Qt.dtype:                                    # (Q^T and R may be wider than h)
        column = column.to(Qt.dtype)
    col = torch.bmm(Qt[:, : j + 2, : j + 2], column.unsqueeze(2)).squeeze(2)
    pair = col[:, j:]                                               # [B, 2]: the entries the rotation meets
    diag = torch.linalg.vector_norm(pair, dim=1, keepdim=True)     # [B, 1]
    stepping = active & (diag > 0)
    safe_diag = torch.where(stepping, diag, 1)
    consts = _constants(Qt.dtype, Qt.device)
    # (cos, sin) of the new rotation; (1, 0) for the samples that do not step
    cs = torch.where(stepping, pair / safe_diag, consts["e0"])
    # R's column j: the rotated column with diag in row j; the identity column e_j for the samples that do not
    # step (a cached row of I: no kernel a step)
    r_col = R[:, : j + 1, j]
    torch.where(stepping, torch.cat([col[:, :j], diag], 1), _unit(j, R.dtype, R.device), out=r_col)
    # rows j, j + 1 of Q^T <- [[cos, sin], [-sin, cos]] @ those rows
    G = cs[:, consts["index"]] * consts["sign"]                    # [B, 2, 2]
    rows = Qt[:, j : j + 2, : j + 2]
    rows.copy_(torch.bmm(G, rows))
    return stepping


_CONSTANTS: dict = {}
_UNITS: dict = {}


def _constants(dtype: torch.dtype, device: torch.device) -> dict:
    """Small constants of the rotations, made once per dtype and device (each would be a kernel a step)."""
    key = (dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = {"e0": torch.tensor([1.0, 0.0], dtype=dtype, device=device),
                           "index": torch.tensor([[0, 1], [1, 0]], device=device),
                           "sign": torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=dtype, device=device)}
    return _CONSTANTS[key]


def _unit(j: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """e_j: [j + 1] (row j of a cached identity), cached per (j, dtype, device)."""
    key = (j, dtype, device)
    unit = _UNITS.get(key)
    if unit is None:
        unit = _UNITS[key] = _identity(j + 1, dtype, device)[j]
    return unit


_IDENTITIES: dict = {}


def _identity(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """I [size, size] (cached per dtype and device, grown by doubling): its row j is e_j."""
    key = (dtype, device)
    eye = _IDENTITIES.get(key)
    if eye is None or eye.shape[0] < size:
        eye = torch.eye(max(size, 2 * (eye.shape[0] if eye is not None else 32)), dtype=dtype, device=device)
        _IDENTITIES[key] = eye
    return eye[:size, :size]


def least_squares(Qt: Tensor, R: Tensor, beta: Tensor, steps: Tensor, k: int) -> Tensor:
    """y: [B, k] minimising ||beta e1 - Hbar y|| from the rotated system R y = beta Q^T e1 (a sample uses its
    first `steps` columns; the rest of its y is zero)."""
    used = torch.arange(k, device=steps.device) < steps.unsqueeze(1)
    g = torch.where(used, beta.unsqueeze(1).to(Qt.dtype) * Qt[:, :k, 0], 0)
    return torch.linalg.solve_triangular(R[:, :k, :k], g.unsqueeze(2), upper=True).squeeze(2)


INITIAL_CAPACITY = 32     # Arnoldi steps allocated at first; doubled as needed up to restart


def _workspace(b: Tensor, capacity: int, old: tuple[Tensor, Tensor, Tensor] | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Basis V: [B, c + 1, n] (b's dtype), rotations Q^T: [B, c + 1, c + 1] (identity), R: [B, c, c] (in
    small_dtype: float32 or wider) for c = capacity Arnoldi steps, holding the contents of `old` if given."""
    B, n = b.shape
    V = b.new_zeros(B, capacity + 1, n)
    Qt = torch.eye(capacity + 1, dtype=small_dtype(b.dtype), device=b.device).repeat(B, 1, 1)
    R = torch.zeros(B, capacity, capacity, dtype=Qt.dtype, device=b.device)
    if old is not None:
        c = old[2].shape[-1]
        V[:, : c + 1] = old[0]
        Qt[:, : c + 1, : c + 1] = old[1]
        R[:, :c, :c] = old[2]
    return V, Qt, R
