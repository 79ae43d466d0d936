"""The Jacobian J = d step(params, z, x) / dz of a map at a state z*, applied without materialising it.

One object for everything that multiplies by J at z*: the adjoint estimators (`JT`, `J`, `pullback`),
the spectral measurements (`matvec`, `rmatvec`, blocks, `dense`, `to_scipy`) and the benchmarks. Every
product is counted in one CostRecord (`record`, also reachable as `count`): a product with one vector per
sample counts 1 however large the batch, a block of p vectors per sample counts p.

The relative residual of z* has one definition here, the forward solvers' stopping rule:
    ||f(z*) - z*|| / ||f(z*)||   per sample.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .errors import DeviceError, ShapeError

if TYPE_CHECKING:       # estimators/_base.py imports this module: CostRecord is imported where it is needed
    from .estimators._base import CostRecord

JVP_MODES = ("auto", "double_vjp", "linearize", "forward")


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """||f(z) - z|| / ||f(z)|| per sample: z, fz [B, ...] -> [B] (as the forward solvers' stopping rule)."""
    B = z.shape[0]
    n = math.prod(z.shape[1:])
    diff = (fz - z).reshape(B, n).norm(dim=1)
    return diff / fz.reshape(B, n).norm(dim=1).clamp_min(torch.finfo(fz.dtype).tiny)


class Jacobian:
    """J = d step(params, z, x) / dz at z*: J v (JVP) and J^T v (VJP), counted in `record`.

    Samples do not interact, so J is block-diagonal with one [n, n] block per sample.
    Two layers of products:
    - `JT(v)` / `J(v)`: v flat per sample [B, n] (any shape with the state's number of entries; the result
      has v's shape), one counted product each, no checks: what the adjoint solvers call (M = J^T in
      (I - M) u = g; `J` only where a solver needs J, e.g. CG on the normal equations).
    - `matvec(v)` / `rmatvec(v)`: checked input ([B, n], the state's shape, or a block [p, B, n] of p
      vectors per sample applied in one vmapped call and counted p; unbatched: [n] / [p, n]), detached output.
    `pullback(u)` gives (df/dparams)^T u and (df/dx)^T u (one VJP), the step that turns the adjoint vector
    into the gradient. `dense()`, `block(i)`, `to_scipy(sample)` serve the spectral measurements.

    step, params, x, z_star: the map at the state (x may be None). z_star: [B, *event], or one sample's
    [*event] with batched=False. record: the CostRecord to count in (default a new one). forward: the
    FixedPoint of the forward solve that found z* (for estimators that reuse its inverse estimate).
    jvp: how J v is computed: "double_vjp" (the VJP of the linear map u -> J^T u, no re-run of the step; in
    PyTorch usually the fastest), "linearize" (torch.func.linearize), "forward" (torch.func.jvp each call),
    or "auto" (the first of these that passes the adjoint test). check_jvp: run the adjoint test
    <u, J v> = <J^T u, v> on the chosen mode before its first use (always on for "auto").
    """

    def __init__(self, step: Callable, params: Mapping[str, Tensor], x: Tensor | None, z_star: Tensor,
                 record: CostRecord | None = None, forward: Any = None, *, batched: bool = True,
                 name: str = "map", jvp: str = "double_vjp", check_jvp: bool = False):
        if jvp not in JVP_MODES:
            raise ValueError(f"jacobian_operator: unknown jvp mode {jvp!r}; choose one of {JVP_MODES}")
        if record is None:
            from .estimators._base import CostRecord
            record = CostRecord()
        self.step, self.params, self.x, self.z_star = step, params, x, z_star
        self.forward = forward
        self.record = record
        self.name = name
        self.batched = bool(batched)
        self._z = z_star if batched else z_star.unsqueeze(0)
        self._x = x if (batched or x is None) else x.unsqueeze(0)
        self.state_shape = tuple(self._z.shape)
        self.event_shape = self.state_shape[1:]
        self.batch = int(self.state_shape[0])
        self.n = int(math.prod(self.event_shape))
        self.dtype = self._z.dtype
        self.device = self._z.device
        self.jvp_mode = jvp
        self._check_jvp = check_jvp or jvp == "auto"
        self._jvp_fn: Callable | None = None
        self._dense: Tensor | None = None
        with torch.enable_grad():
            fz, self._vjp_fn = torch.func.vjp(self._f, self._z)
        self._fz = fz.detach()
        if self._fz.shape != self._z.shape:
            raise ShapeError(f"jacobian_operator: the step of '{name}' maps a state of shape "
                             f"{tuple(self._z.shape)} to {tuple(self._fz.shape)}; J = df/dz needs a step "
                             "that returns a state of the input's shape")

    def _f(self, z: Tensor) -> Tensor:
        return self.step(self.params, z, self._x)

    @property
    def count(self) -> CostRecord:
        """The record the products are counted in (`count.vjps`, `count.jvps`): the same object as `record`."""
        return self.record

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of one sample's block: (n, n)."""
        return (self.n, self.n)

    # ---- how far z* is from a fixed point ---------------------------------------------------------------
    @property
    def residual(self) -> Tensor:
        """||f(z) - z|| per sample: [B] (0-dim for an unbatched state)."""
        return self._out((self._fz - self._z.detach()).reshape(self.batch, self.n).norm(dim=1))

    @property
    def relative_residual(self) -> Tensor:
        """||f(z) - z|| / ||f(z)|| per sample: [B] (0-dim for an unbatched state); see `relative_residual`."""
        return self._out(relative_residual(self._z.detach(), self._fz))

    def _out(self, t: Tensor) -> Tensor:
        """Drop the internal batch dim for an unbatched state."""
        return t if self.batched else t[0]

    # ---- products on flat vectors (the estimators' and solvers' path) ------------------------------------
    def JT(self, v: Tensor) -> Tensor:
        """J^T v: one VJP. v: [B, n] (any shape with the state's entries); the result has v's shape."""
        self.record.vjps += 1
        return self._vjp_fn(v.reshape(self.state_shape))[0].reshape(v.shape)

    def J(self, v: Tensor) -> Tensor:
        """J v: one JVP (by default one backward through the stored VJP graph, no re-run of the step)."""
        vs = v.reshape(self.state_shape)
        self._ensure_jvp(vs)
        self.record.jvps += 1
        return self._jvp_fn(vs).reshape(v.shape)

    def cast(self, dtype: torch.dtype) -> Jacobian:
        """The same step linearised at z* with params, x and z* cast to `dtype` (for low-precision products);
        its products are counted in the same record."""
        def to(t):
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
        params = {k: to(v) for k, v in self.params.items()}
        return Jacobian(self.step, params, to(self.x), to(self.z_star), self.record, self.forward,
                        batched=self.batched, name=self.name, jvp=self.jvp_mode, check_jvp=self._check_jvp)

    # ---- pulling an adjoint vector back to params and x ---------------------------------------------------
    def pullback(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """(df/dparams)^T u and (df/dx)^T u at z*:  one VJP."""
        gp, gx, _ = self._pull(u, with_state=False)
        return gp, gx

    def pullback_with_state(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor | None, Tensor]:
        """(df/dparams)^T u, (df/dx)^T u and J^T u (flat, like u) at z*: the same one VJP, also taken w.r.t. z
        (what lets a truncated series measure its residual without another product)."""
        return self._pull(u, with_state=True)

    def _pull(self, u: Tensor, with_state: bool):
        self.record.vjps += 1
        has_x = self._x is not None
        primals = (dict(self.params),) + ((self._x,) if has_x else ()) + ((self._z,) if with_state else ())

        def f(p, *rest):
            return self.step(p, rest[-1] if with_state else self._z, rest[0] if has_x else None)
        _, fn = torch.func.vjp(f, *primals)
        grads = fn(u.reshape(self.state_shape))
        gx = None
        if has_x:
            gx = grads[1] if self.batched else grads[1][0]
        return grads[0], gx, grads[-1].reshape(u.shape) if with_state else None

    # ---- how J v is computed ---------------------------------------------------------------------------
    def _vjp_state(self, u: Tensor) -> Tensor:
        return self._vjp_fn(u)[0]

    def _build_jvp(self, mode: str) -> Callable:
        if mode == "double_vjp":
            w0 = torch.zeros(self.state_shape, dtype=self.dtype, device=self.device)
            with torch.enable_grad():
                _, pullback_of_vjp = torch.func.vjp(self._vjp_state, w0)
            return lambda v: pullback_of_vjp(v)[0]
        if mode == "linearize":
            with warnings.catch_warnings():     # torch.fx / jit chatter from inside linearize, not ours to show
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                with torch.enable_grad():
                    _, fn = torch.func.linearize(self._f, self._z)
            return fn
        return lambda v: torch.func.jvp(self._f, (self._z,), (v,))[1]

    def _adjoint_mismatch(self, v: Tensor, Jv: Tensor) -> float:
        """|<u, J v> - <J^T u, v>| relative to its scale, for a fixed random u: a JVP built by double
        backward is wrong (silently) where a step's backward is not itself differentiable."""
        g = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(v.shape, generator=g, dtype=torch.float64).to(device=v.device, dtype=v.dtype)
        JTu = self._vjp_state(u)
        lhs, rhs = float((u * Jv).sum()), float((JTu * v).sum())
        scale = max(float(u.norm() * Jv.norm()), float(JTu.norm() * v.norm()), torch.finfo(v.dtype).tiny)
        return abs(lhs - rhs) / scale

    def _ensure_jvp(self, probe: Tensor) -> None:
        """Choose the JVP implementation. Unchecked: the requested mode. Checked: the first candidate that runs
        on `probe` ([B, *event]) and passes the adjoint test <u, J v> = <J^T u, v> against the VJP."""
        if self._jvp_fn is not None:
            return
        if not self._check_jvp:
            self._jvp_fn = self._build_jvp(self.jvp_mode)
            return
        modes = ["double_vjp", "linearize", "forward"] if self.jvp_mode == "auto" else [self.jvp_mode]
        tol = 1e3 * torch.finfo(self.dtype).eps
        errors = []
        for mode in modes:
            try:
                fn = self._build_jvp(mode)
                out = fn(probe)
                if out.shape != probe.shape:
                    raise RuntimeError(f"returned shape {tuple(out.shape)}")
                mismatch = self._adjoint_mismatch(probe.detach(), out.detach())
                if mismatch > tol:
                    raise RuntimeError(f"fails the adjoint test against the VJP (relative mismatch {mismatch:.1e})")
            except Exception as e:  # noqa: BLE001 - report every failed candidate below
                errors.append(f"{mode}: {type(e).__name__}: {e}")
                continue
            self._jvp_fn, self.jvp_mode = fn, mode
            return
        raise RuntimeError(f"jacobian_operator: no JVP implementation works for the step of '{self.name}': "
                           + "; ".join(errors))

    # ---- checked products (the spectral measurements' path) ------------------------------------------------
    def _apply(self, V: Tensor, transpose: bool) -> Tensor:
        """J V (or J^T V) on internal flat vectors: V [B, n] or a block [p, B, n] (counted p)."""
        block = V.dim() == 3
        Vs = V.reshape(*V.shape[:-1], *self.event_shape)
        if transpose:
            fn = self._vjp_state
            self.record.vjps += V.shape[0] if block else 1
        else:
            self._ensure_jvp(Vs[0] if block else Vs)
            fn = self._jvp_fn
            self.record.jvps += V.shape[0] if block else 1
        out = torch.vmap(fn)(Vs) if block else fn(Vs)
        return out.reshape(V.shape).detach()

    def _internal(self, v: Tensor, where: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if not isinstance(v, Tensor):
            raise TypeError(f"JacobianOperator.{where}: v must be a torch.Tensor, got {type(v).__name__}")
        if v.device != self.device:
            raise DeviceError(f"JacobianOperator.{where}: v is on {v.device} but the state is on {self.device}; "
                              f"move it with v.to('{self.device}')")
        v = v.to(self.dtype)
        B, n, shape = self.batch, self.n, tuple(v.shape)
        state = (B, *self.event_shape) if self.batched else self.event_shape
        if self.batched:
            if shape == (B, n):
                return v, lambda o: o
            if len(shape) == 3 and shape[1:] == (B, n):
                return v, lambda o: o
            if shape == state:
                return v.reshape(B, n), lambda o: o.reshape(shape)
            expected = f"[B={B}, n={n}], a block [p, {B}, {n}] or the state's shape {list(state)}"
        else:
            if shape == (n,):
                return v.unsqueeze(0), lambda o: o[0]
            if len(shape) == 2 and shape[1] == n:
                return v.unsqueeze(1), lambda o: o[:, 0]
            if shape == state:
                return v.reshape(1, n), lambda o: o.reshape(shape)
            expected = f"[n={n}], a block [p, {n}] or the state's shape {list(state)}"
        raise ShapeError(f"JacobianOperator.{where}: v has shape {list(shape)}; expected {expected}")

    def matvec(self, v: Tensor) -> Tensor:
        """J v (one JVP; a block of p vectors counts p)."""
        V, back = self._internal(v, "matvec")
        return back(self._apply(V, transpose=False))

    def rmatvec(self, v: Tensor) -> Tensor:
        """J^T v (one VJP; a block of p vectors counts p)."""
        V, back = self._internal(v, "rmatvec")
        return back(self._apply(V, transpose=True))

    __matmul__ = matvec

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    # ---- blocks, dense, scipy --------------------------------------------------------------------------
    def block(self, sample: int) -> Jacobian:
        """The operator of one sample's block (a batch of 1, linearised on that sample alone).

        Shares this operator's record."""
        if not 0 <= sample < self.batch:
            raise IndexError(f"JacobianOperator.block: sample {sample} out of range for a batch of {self.batch}")
        if self.batch == 1:
            return self
        x = None if self._x is None else self._x[sample:sample + 1]
        mode = "auto" if self.jvp_mode == "auto" or self._jvp_fn is None else self.jvp_mode
        blk = Jacobian(self.step, self.params, x, self._z[sample:sample + 1], self.record, batched=True,
                       name=self.name, jvp=mode if self._check_jvp else self.jvp_mode, check_jvp=self._check_jvp)
        if self._dense is not None:
            blk._dense = self._dense[sample:sample + 1]
        return blk

    def _block_for(self, sample: int | None, where: str) -> Jacobian:
        if sample is None:
            if self.batch != 1:
                raise ValueError(f"JacobianOperator.{where}: the batch has {self.batch} samples; pass sample=i")
            return self
        return self.block(int(sample))

    def dense(self, sample: int | None = None, chunk_size: int | None = None) -> Tensor:
        """Materialise J: [B, n, n] (or [n, n] for an unbatched state or one `sample`). n VJPs (counted).

        Rows come from vmapped VJPs with e_j (as jacrev does), `chunk_size` rows at a time; cached."""
        if sample is not None:
            if not 0 <= int(sample) < self.batch:
                raise IndexError(f"JacobianOperator.dense: sample {sample} out of range for a batch of {self.batch}")
            if self._dense is not None:
                return self._dense[int(sample)]
            return self.block(int(sample))._dense_all(chunk_size)[0]
        D = self._dense_all(chunk_size)
        return D if self.batched else D[0]

    def _dense_all(self, chunk_size: int | None) -> Tensor:
        if self._dense is None:
            B, n = self.batch, self.n
            c = chunk_size or max(1, min(n, (1 << 22) // max(1, B * n)))
            eye = torch.eye(n, dtype=self.dtype, device=self.device)
            rows = []
            for j0 in range(0, n, c):
                E = eye[j0:j0 + c, None, :].expand(-1, B, n)          # [c, B, n]: e_j for every sample
                rows.append(self._apply(E, transpose=True))          # [c, B, n]: row j of each block
            self._dense = torch.cat(rows, dim=0).permute(1, 0, 2).contiguous()
        return self._dense

    def to_scipy(self, sample: int | None = None):
        """One sample's block as a scipy.sparse.linalg.LinearOperator (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        blk = self._block_for(sample, "to_scipy")
        n = self.n

        def apply(v: np.ndarray, transpose: bool) -> np.ndarray:
            v = np.asarray(v)
            cols = v.reshape(n, -1)
            if np.iscomplexobj(cols):
                re = apply(cols.real, transpose)
                im = apply(cols.imag, transpose)
                return (re + 1j * im).reshape(v.shape)
            t = torch.from_numpy(np.ascontiguousarray(cols.T, dtype=np.float64))
            t = t.to(device=blk.device, dtype=blk.dtype).unsqueeze(1)       # [p, 1, n]
            out = blk._apply(t, transpose) if t.shape[0] > 1 else blk._apply(t[0], transpose).unsqueeze(0)
            return out[:, 0, :].T.to("cpu", torch.float64).numpy().reshape(v.shape)

        return LinearOperator((n, n), matvec=lambda v: apply(v, False), rmatvec=lambda v: apply(v, True),
                              matmat=lambda V: apply(V, False), rmatmat=lambda V: apply(V, True),
                              dtype=np.float64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, batch={self.batch}{'' if self.batched else ' (unbatched)'}, "
                f"n={self.n}, dtype={self.dtype}, device={self.device}, jvp={self.jvp_mode}, "
                f"jvps={self.record.jvps}, vjps={self.record.vjps})")


class _Transposed:
    """J^T as an operator: matvec = J^T v, rmatvec = J v."""

    def __init__(self, J: Jacobian):
        self.J = J

    def matvec(self, v: Tensor) -> Tensor:
        return self.J.rmatvec(v)

    def rmatvec(self, v: Tensor) -> Tensor:
        return self.J.matvec(v)
