"""Spectral penalty: a differentiable, warm-started estimate of rho(J) or ||J||_2 and a hinge on it.

Power steps run without the tape (detached parameters); the estimate is then read on the tape from the
converged vectors, so its derivative w.r.t. params is the eigenvalue's (or singular value's) derivative:
    radius: subspace iteration with 2 columns on J (V) and on J^T (U), so that a complex-conjugate dominant
        pair is held; the dominant Ritz pair's right vector v = V y and left vector u = U w (detached, complex
        for a pair) give the two-sided Rayleigh quotient lambda = u^H J v / u^H v with J V on the tape;
        rho = |lambda|, and d lambda = u^H dJ v / u^H v, the derivative of a simple eigenvalue. Where the Ritz
        residual is above 1e-2 (unconverged), the one-sided Ritz value on span V is used instead (it cannot
        exceed ||J||; the two-sided quotient can be far off there).
    norm: sigma = ||J v|| for v from power iteration on J^T J;  d sigma = u^T dJ v,  u = J v / sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import ShapeError
from ..jacobian import Jacobian
from ._products import (
    FROM_MODULE,
    Linearised,
    ProductCount,
    add_products,
    infer_batched,
    resolve,
    small_dtype,
    unit_columns,
)

KINDS = ("radius", "norm")
TWO_SIDED_RESIDUAL = 1e-2      # relative Ritz residual under which the two-sided quotient is used (see below)
FORMS = ("jvp", "vjp")


@dataclass
class SpectralState:
    """What a spectral penalty keeps between training steps (the caller owns it): per-sample vectors.

    right / left: [B, n, p] orthonormal columns (radius: p = 2, right from J, left from J^T; norm: p = 1,
    right singular vector (jvp form) or left (vjp form)). They are kept per batch position: with shuffled
    batches, sample b starts from another sample's vectors under nearly the same parameters, which is
    usually a close start. A batch larger than the stored one draws the missing rows from `generator`.
    cold_iters: power steps when no vectors are stored (the first call, or a reset).
    last / residual: the last estimate per sample and its relative residual (detached; a large residual: the
    power steps had not converged); calls and products accumulate.
    """

    generator: torch.Generator | None = None
    cold_iters: int = 100
    right: Tensor | None = None
    left: Tensor | None = None
    kind: str | None = None
    form: str | None = None
    last: Tensor | None = None
    residual: Tensor | None = None
    calls: int = 0
    products: ProductCount = field(default_factory=ProductCount)

    def reset(self) -> None:
        """Forget the vectors (the next call starts cold)."""
        self.right = self.left = self.last = self.residual = None
        self.kind = self.form = None


@dataclass(frozen=True)
class SpectralEstimate:
    """A spectral estimate per sample: value [B] (on the tape), its residual [B] (detached: ||J V - V H|| /
    |value| for radius, ||J^T J v - sigma^2 v|| / sigma^2 for norm, from products already made), the vectors
    to start the next call from, and the products spent (vjps, jvps)."""

    value: Tensor
    residual: Tensor
    right: Tensor | None
    left: Tensor | None
    kind: str
    vjps: int
    jvps: int


def _random_columns(B: int, n: int, p: int, generator, dtype, device) -> Tensor:
    gdev = generator.device if generator is not None else "cpu"
    V = torch.randn(B, n, p, generator=generator, dtype=small_dtype(dtype), device=gdev)
    return unit_columns(V.to(device=device, dtype=dtype))


def _ritz(basis: Tensor, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz of J on the orthonormal columns of basis [B, n, 2] given image = J basis: the Ritz values
    theta [B, 2] (complex), their vectors' coefficients Y [B, 2, 2] (columns) and residuals
    ||J V y - theta V y|| [B, 2]. (An orthogonal projection: its Ritz values lie in J's field of values, so
    none is spuriously larger than ||J||.)"""
    cdt = torch.complex128 if basis.dtype == torch.float64 else torch.complex64
    theta, Y = torch.linalg.eig(basis.mT @ image)
    Bc, Ic = basis.to(cdt), image.to(cdt)
    res = (Ic @ Y - theta[:, None, :] * (Bc @ Y)).norm(dim=1)
    return theta, Y, res


def _krylov_start(apply: Callable[[Tensor], Tensor], v0: Tensor, k: int) -> Tensor:
    """[B, n, 2] orthonormal columns spanning the dominant Ritz vectors after k Arnoldi steps of `apply` ([B, n] ->
    [B, n], detached) from v0 [B, n]: the real and imaginary parts of the Ritz vector of largest |Ritz value| when
    it is complex, else it and the next one. Classical Gram-Schmidt twice; k products."""
    B, n = v0.shape
    k = min(int(k), n)
    wdt = small_dtype(v0.dtype)
    tiny = torch.finfo(v0.dtype).tiny
    # (built without in-place writes, so that it runs under torch.func.vmap)
    rows = [v0 / v0.norm(dim=1, keepdim=True).clamp_min(tiny)]
    columns = []
    for j in range(k):
        w = apply(rows[j])
        Q = torch.stack(rows, dim=1)                          # [B, j + 1, n]
        h = 0
        for _ in range(2):
            c = torch.einsum("bin,bn->bi", Q, w)
            w = w - torch.einsum("bi,bin->bn", c, Q)
            h = h + c
        hn = w.norm(dim=1)
        columns.append(torch.cat([h, hn.unsqueeze(1), h.new_zeros(B, k - j - 1)], dim=1).to(wdt))
        rows.append(w / hn.clamp_min(tiny).unsqueeze(1))      # (an invariant subspace: a zero row, H exact)
    H = torch.stack(columns, dim=2)                           # [B, k + 1, k] upper Hessenberg
    theta, S = torch.linalg.eig(H[:, :k, :k])                 # Ritz values [B, k], their vectors' coefficients
    order = theta.abs().argsort(dim=1, descending=True)
    basis = torch.stack(rows[:k], dim=2).to(S.dtype)          # [B, n, k]

    def ritz_vector(i: int) -> Tensor:
        coef = S.gather(2, order[:, None, i:i + 1].expand(B, k, 1))
        return (basis @ coef)[..., 0]                         # [B, n] complex
    first = ritz_vector(0)
    ranked = theta.gather(1, order)
    real = ranked.imag.abs() <= 1e-6 * ranked.abs().clamp_min(tiny)          # [B, k] real Ritz values, by modulus
    # a real dominant value: the next real Ritz vector beside it (the two span an invariant plane when exact), or
    # the next one's real part where every other Ritz value is complex
    later_real = real & (torch.arange(k, device=real.device) > 0)
    nxt = torch.where(later_real.any(dim=1), later_real.float().argmax(dim=1), torch.ones_like(order[:, 0]))
    nxt = nxt.clamp(max=k - 1)
    second = (basis @ S.gather(2, order.gather(1, nxt[:, None])[:, None, :].expand(B, k, 1)))[..., 0]
    a = first.real
    b = torch.where(real[:, 0].unsqueeze(1), second.real, first.imag)
    columns, _ = torch.linalg.qr(torch.stack([a, b], dim=-1).to(v0.dtype))
    return columns


def _dominant_pair(V: Tensor, JV: Tensor, U: Tensor, JTU: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The dominant eigenvalue's right and left Ritz vectors (coefficients y, w [B, 2] complex, on V and U),
    its relative residual [B], and which root of each 2x2 Ritz matrix it is (signs [B] for `_root_modulus`:
    right on V, left on U), all detached. The right pair maximises |theta| - residual (a Ritz value still far
    from converged has a large residual); the left pair is the left Ritz value nearest to it."""
    theta, Y, res = _ritz(V, JV)
    idx = (theta.abs() - res).argmax(dim=1)
    chosen = theta.gather(1, idx[:, None])
    y = Y.gather(2, idx[:, None, None].expand(-1, 2, 1))[..., 0]
    phi, Wl, _ = _ritz(U, JTU)                       # eigenvalues of J^T: those of J (conjugate pairs included)
    jdx = (phi - chosen).abs().argmin(dim=1)
    w = Wl.gather(2, jdx[:, None, None].expand(-1, 2, 1))[..., 0]
    rel = res.gather(1, idx[:, None])[:, 0] / chosen[:, 0].abs().clamp_min(torch.finfo(V.dtype).tiny)

    def sign(vals, i):
        mine, other = vals.gather(1, i[:, None])[:, 0], vals.gather(1, (1 - i)[:, None])[:, 0]
        return torch.where(mine.real >= other.real, 1.0, -1.0).to(V.dtype)
    return y, w, rel, sign(theta, idx), sign(phi, jdx)


def _root_modulus(H: Tensor, sign: Tensor) -> Tensor:
    """|eigenvalue| of real 2x2 blocks H [B, 2, 2], differentiable without complex arithmetic: for a real pair
    the root (tr + sign sqrt(disc)) / 2, for a complex pair sqrt(det)."""
    tr = H[:, 0, 0] + H[:, 1, 1]
    det = H[:, 0, 0] * H[:, 1, 1] - H[:, 0, 1] * H[:, 1, 0]
    disc = tr * tr - 4.0 * det
    tiny = torch.finfo(H.dtype).tiny
    real = (0.5 * (tr + sign * disc.clamp_min(tiny).sqrt())).abs()
    return torch.where(disc >= 0, real, det.clamp_min(tiny).sqrt())


def spectral_estimate(step: Callable, params: Mapping[str, Tensor], z: Tensor, x: Tensor | None, *,
                      kind: str = "radius", iters: int = 3, right: Tensor | None = None, left: Tensor | None = None,
                      generator: torch.Generator | None = None, form: str = "jvp", counter: Any = None,
                      batched: bool | None = None, krylov: int = 0) -> SpectralEstimate:
    """rho(J) (kind="radius") or ||J||_2 (kind="norm") per sample at z (detached), differentiable in params.

    `iters` detached power steps from `right` / `left` ([B, n, p]; random from `generator` when None), then
    one product on the tape (radius: 2, one per column). Products per call: radius 4 max(iters, 1) + 2, norm
    2 iters + 2 (one for the residual).
    krylov = k > 0 (kind="radius"): before the power steps, k Arnoldi steps on J and k on J^T (detached, 2k more
    products) from the start vectors' first columns replace the start vectors by the span of their dominant Ritz
    vectors. A power step shrinks the error by |lambda_2 / lambda_1|, a Krylov space by far more for the same
    products: with start vectors from other samples (a new batch every training step) 4 warm power steps saw a
    median 0.75 of the dense rho(J) in the discovery study's penalised slot attention, 16 Arnoldi steps 1.00.
    form: whether the product on the tape is a JVP (reverse-over-forward,
    no double backward) or a VJP (double backward). Pure given its vectors: vmap-safe when `right` / `left`
    are passed.
    z: [B, *event] (or one sample, see `batched`); value: [B] (0-dim for one sample).
    """
    where = "fpgrad.contraction.spectral_estimate"
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if form not in FORMS:
        raise ValueError(f"{where}: form must be one of {FORMS}, got {form!r}")
    if int(iters) < 0:
        raise ValueError(f"{where}: iters must be >= 0, got {iters}")
    if isinstance(krylov, bool) or not isinstance(krylov, int) or krylov < 0:
        raise ValueError(f"{where}: krylov (Arnoldi steps before the power steps) must be an int >= 0, got "
                         f"{krylov!r}")
    if krylov and kind != "radius":
        raise ValueError(f"{where}: krylov applies to kind='radius' (the norm's power steps on J^T J converge "
                         "at the squared rate); use iters= for kind='norm'")
    is_batched = infer_batched(z, x, batched)
    zb = z if is_batched else z.unsqueeze(0)
    xb = x if (x is None or is_batched) else x.unsqueeze(0)
    own = ProductCount()

    class _Both:  # count in the caller's counter and in this call's own
        def __init__(self):
            self.vjps = self.jvps = 0

    both = _Both()
    lin = Linearised(step, params, zb, xb, both, where)        # the product on the tape
    # the detached power steps: the library's Jacobian at z (one step evaluation; J v by its double VJP)
    frozen = _Frozen(Jacobian(step, {k: v.detach() for k, v in params.items()},
                              None if xb is None else xb.detach(), lin.z, record=both, name=where))
    B, n = lin.batch, lin.n
    p = 2 if kind == "radius" else 1
    if p > n:
        raise ShapeError(f"{where}: kind='radius' needs states of >= 2 entries per sample, got n={n}; "
                         "use kind='norm'")

    def start(V: Tensor | None) -> Tensor:
        if V is None:
            return _random_columns(B, n, p, generator, zb.dtype, zb.device)
        V = V if is_batched else V.unsqueeze(0)
        if V.shape != (B, n, p):
            raise ShapeError(f"{where}: start vectors must be [B, n, {p}] = [{B}, {n}, {p}] for kind={kind!r}, "
                             f"got {tuple(V.shape)}")
        return V.detach().to(zb.dtype)

    wdt = small_dtype(zb.dtype)
    with torch.no_grad():
        if kind == "radius":
            V, U = start(right), start(left)
            if krylov:
                V = _krylov_start(frozen.jvp, V[..., 0], krylov)
                U = _krylov_start(frozen.vjp, U[..., 0], krylov)
            JV, JTU = frozen.apply(V), frozen.apply(U, transpose=True)
            for _ in range(max(int(iters), 1) - 1):
                V, U = unit_columns(JV), unit_columns(JTU)
                JV, JTU = frozen.apply(V), frozen.apply(U, transpose=True)
            y, w, resid, sign_right, sign_left = _dominant_pair(V.to(wdt), JV.to(wdt), U.to(wdt), JTU.to(wdt))
            nxt_right, nxt_left = unit_columns(JV), unit_columns(JTU)
        else:
            # jvp form: right singular vector v (J^T J v); vjp form: left u (J J^T u)
            V = start(right if form == "jvp" else left)
            for _ in range(int(iters)):
                if form == "jvp":
                    V = unit_columns(frozen.apply(frozen.apply(V), transpose=True))
                else:
                    V = unit_columns(frozen.apply(frozen.apply(V, transpose=True)))
    if kind == "radius":
        # two-sided Rayleigh quotient lambda = u^H J v / u^H v, u = U w, v = V y, with J V (or J^T U) on the tape
        cdt = y.dtype
        if form == "jvp":
            JVt = lin.apply(V)                                            # on the tape
            C = (U.mT @ JVt).to(wdt)                                      # U^T J V
            one_sided = _root_modulus((V.mT @ JVt).to(wdt), sign_right)   # Ritz value of J on span V
        else:
            JTUt = lin.apply(U, transpose=True)                           # on the tape
            C = (JTUt.mT @ V).to(wdt)                                     # (J^T U)^T V = U^T J V
            one_sided = _root_modulus((U.mT @ JTUt).to(wdt), sign_left)   # Ritz value of J^T on span U
        M = (U.mT @ V).to(wdt)
        # x = U w is J^T's eigenvector for lambda, so u = conj(x) and u^H = w^T U^T (phases cancel in the ratio)
        wh = w[:, None, :]
        num = (wh @ (C.to(cdt) @ y[:, :, None]))[:, 0, 0]
        den = (wh @ (M.to(cdt) @ y[:, :, None]))[:, 0, 0]
        cos = den.detach().abs() / ((V.to(cdt) @ y[:, :, None]).norm(dim=(1, 2))
                                    * (U.to(cdt) @ w[:, :, None]).norm(dim=(1, 2)))
        two_sided = (num / torch.where(den.abs() > 0, den, torch.ones_like(den))).abs()
        # unconverged vectors make the two-sided quotient unreliable (1 / cos(u, v) amplifies their errors, and it
        # can be far above rho): there the one-sided Ritz value (in J's field of values, <= ||J||) is used
        trusted = (resid <= TWO_SIDED_RESIDUAL) & (cos.detach() > 1e-3)
        value = torch.where(trusted, two_sided, one_sided)
    else:
        v = V[..., 0]
        if form == "jvp":
            w = lin.jvp(v)
        else:
            w = lin.vjp(v)
        value = w.to(wdt).norm(dim=1)
        with torch.no_grad():
            # the next call's start: one more (free) half step; the residual from the products made so far
            u = w.detach() / value.detach().clamp_min(torch.finfo(wdt).tiny)[:, None].to(w.dtype)
            resid = torch.zeros_like(value.detach()) if n == 1 else _norm_residual(frozen, v, u, form)
            nxt = v[..., None]
        nxt_right, nxt_left = (nxt, None) if form == "jvp" else (None, nxt)
    own.vjps, own.jvps = both.vjps, both.jvps
    add_products(counter, vjps=both.vjps, jvps=both.jvps)
    out = (lambda t: t) if is_batched else (lambda t: None if t is None else t[0])
    return SpectralEstimate(out(value), out(resid), out(nxt_right), out(nxt_left), kind, own.vjps, own.jvps)


class _Frozen:
    """fpgrad.jacobian.Jacobian on the power steps' blocks: V [B, n, p] -> J V (or J^T V), detached, counted p."""

    def __init__(self, J: Jacobian):
        self.J = J

    def apply(self, V: Tensor, transpose: bool = False) -> Tensor:
        block = V.movedim(-1, 0)
        out = self.J.rmatvec(block) if transpose else self.J.matvec(block)
        return out.movedim(0, -1)

    def jvp(self, v: Tensor) -> Tensor:
        return self.J.matvec(v)

    def vjp(self, u: Tensor) -> Tensor:
        return self.J.rmatvec(u)


def _norm_residual(frozen: _Frozen, v: Tensor, u: Tensor, form: str) -> Tensor:
    """sin of the angle between v and J^T J v (jvp form; u = J v / sigma) or between u and J J^T u (vjp form):
    0 exactly at a singular vector. One detached product (counted)."""
    back = frozen.vjp(u) if form == "jvp" else frozen.jvp(u)
    back = back / back.norm(dim=1, keepdim=True).clamp_min(torch.finfo(back.dtype).tiny)
    return (back - (back * v).sum(dim=1, keepdim=True) * v).norm(dim=1)


def _stored(state: SpectralState, B: int, kind: str, form: str) -> tuple[Tensor | None, Tensor | None, bool]:
    """The state's vectors for a batch of B (cut to B, or None when missing or of another kind / width)."""
    if state.kind != kind or (kind == "norm" and state.form != form):
        return None, None, False
    vecs = []
    for V in (state.right, state.left):
        if V is None or V.shape[0] < B:
            vecs.append(None)
        else:
            vecs.append(V[:B])
    needed = (0, 1) if kind == "radius" else ((0,) if form == "jvp" else (1,))
    warm = all(vecs[i] is not None for i in needed)
    return vecs[0], vecs[1], warm


def spectral_penalty(step: Callable | torch.nn.Module, params: Mapping[str, Tensor] = FROM_MODULE,
                     z: Tensor = FROM_MODULE, x: Tensor | None = FROM_MODULE, *,
                     target: float = 0.9, state: SpectralState | None = None, kind: str = "radius",
                     iters: int = 2, squared: bool = False, smooth: float = 0.0, form: str = "jvp",
                     right: Tensor | None = None, left: Tensor | None = None,
                     generator: torch.Generator | None = None, counter: Any = None, batched: bool | None = None,
                     reduction: str = "mean", krylov: int = 0) -> Tensor:
    """max(0, estimate - target) (squared if `squared`) per sample, estimate = rho(J) or ||J||_2 at z (detached).

    smooth = d > 0: a Huber hinge, e^2 / (2 d) for an excess e < d and e - d / 2 beyond: its gradient grows from
    zero as the estimate crosses the target (no jump to the full weight when the penalty switches on) and is
    bounded by the weight beyond d (a batch whose estimate leaps far above the target does not get a gradient
    that grows with the leap, as the squared hinge's does).

    One line in a training loop:  loss = task + weight * spectral_penalty(step, params, z_star, x, state=state).
    state: a SpectralState the caller owns; warm-starts `iters` power steps from the previous call's vectors
    (a cold start runs state.cold_iters) and stores the new ones. Without a state, `right` / `left` start the
    power steps (pass them under vmap, where the state cannot be written), else random from `generator`.
    z: the state the backward linearises at (e.g. the output of `fpgrad.fixed_point`), [B, *event] or one
    sample. reduction: "mean" | "sum" | "none" ([B]). Products are added to `counter` and `state.products`.
    krylov = k: k Arnoldi steps on J and on J^T before the power steps (2k products; kind="radius"), started from
    the stored vectors: when every step brings new samples (a new batch of scenes), the stored vectors come from
    other samples and a few power steps from them see too little of rho(J) (a median 0.75 of it in the discovery
    study, where krylov=16 saw 1.00); see `spectral_estimate` for kind, form and the products per call.
    """
    where = "fpgrad.contraction.spectral_penalty"
    step, params, z, x = resolve(step, params, z, x, where)
    is_batched = infer_batched(z, x, batched)
    warm = True
    if state is not None:
        if torch._C._functorch.is_functorch_wrapped_tensor(z):
            raise ValueError(f"{where}: a SpectralState cannot be updated inside a torch.func transform (vmap); "
                             "pass the vectors with right= / left= instead (spectral_estimate returns the next ones)")
        if right is not None or left is not None:
            raise ValueError(f"{where}: give a state or start vectors (right= / left=), not both")
        B = z.shape[0] if is_batched else 1
        right, left, warm = _stored(state, B, kind, form)
        if not is_batched:
            right = None if right is None else right[0]
            left = None if left is None else left[0]
        generator = state.generator if generator is None else generator
    n_iters = iters if warm else (state.cold_iters if state is not None else max(iters, 0))
    est = spectral_estimate(step, params, z, x, kind=kind, iters=n_iters, right=right, left=left,
                            generator=generator, form=form, counter=counter, batched=batched, krylov=krylov)
    if state is not None:
        def keep(V):
            return None if V is None else (V if is_batched else V.unsqueeze(0)).detach()
        state.right, state.left = keep(est.right), keep(est.left)
        state.kind, state.form = kind, form
        state.last = est.value.detach()
        state.residual = est.residual.detach()
        state.calls += 1
        state.products.vjps += est.vjps
        state.products.jvps += est.jvps
    if smooth < 0 or (smooth > 0 and squared):
        raise ValueError(f"{where}: smooth (the Huber width) must be >= 0 and is not combined with squared=True, "
                         f"got smooth={smooth}, squared={squared}")
    excess = torch.relu(est.value - target)
    if smooth > 0:
        values = torch.where(excess < smooth, excess * excess / (2 * smooth), excess - smooth / 2)
    else:
        values = excess * excess if squared else excess
    from .frobenius import _reduce
    return _reduce(values.to(z.dtype) if z.dtype.is_floating_point else values, reduction, where)


def dense_radius(step: Callable, params: Mapping[str, Tensor], z: Tensor, x: Tensor | None, *,
                 kind: str = "radius", batched: bool | None = None) -> Tensor:
    """rho(J) or ||J||_2 per sample from the dense Jacobian (torch.func.jacrev; a reference for small maps)."""
    is_batched = infer_batched(z, x, batched)
    zb = z.detach() if is_batched else z.detach().unsqueeze(0)
    xb = x if (x is None or is_batched) else x.unsqueeze(0)
    out = []
    for b in range(zb.shape[0]):
        xs = None if xb is None else xb[b:b + 1]
        J = torch.func.jacrev(lambda zz, xs=xs: step(params, zz[None], xs)[0])(zb[b])
        J = J.reshape(zb[b].numel(), zb[b].numel())
        if kind == "radius":
            out.append(torch.linalg.eigvals(J).abs().max())
        else:
            out.append(torch.linalg.matrix_norm(J, ord=2))
    values = torch.stack(out)
    return values if is_batched else values[0]
