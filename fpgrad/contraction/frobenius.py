"""Jacobian Frobenius penalty (Bai et al. 2021): Hutchinson's estimate of ||J||_F^2 / n at the fixed point."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import ShapeError
from ._products import FROM_MODULE, Linearised, infer_batched, resolve

FORMS = ("vjp", "jvp")
DISTRIBUTIONS = ("rademacher", "gaussian")


def draw_probes(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype, device,
                distribution: str = "rademacher") -> Tensor:
    """Probe vectors with E v v^T = I: Rademacher (+-1) or standard Gaussian, drawn on the generator's device
    (CPU for None) and moved to `device`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"fpgrad.contraction: unknown probe distribution {distribution!r}; use one of {DISTRIBUTIONS}")
    gdev = generator.device if generator is not None else "cpu"
    if distribution == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=gdev)
    else:
        v = torch.randint(0, 2, shape, generator=generator, device=gdev).mul_(2).sub_(1)
    return v.to(dtype=dtype, device=device)


def _reduce(values: Tensor, reduction: str, where: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"{where}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def frobenius_penalty(step: Callable | torch.nn.Module, params: Mapping[str, Tensor] = FROM_MODULE,
                      z: Tensor = FROM_MODULE, x: Tensor | None = FROM_MODULE, *,
                      probes: int = 1, generator: torch.Generator | None = None, form: str = "vjp",
                      vectors: Tensor | None = None, distribution: str = "rademacher", counter: Any = None,
                      batched: bool | None = None, reduction: str = "mean", fz: Tensor | None = None) -> Tensor:
    """Hutchinson estimate of ||J||_F^2 / n per sample, J = d step(params, z, x) / dz at z (detached).

    ||J||_F^2 = E ||J^T v||^2 = E ||J v||^2 for probes with E v v^T = I; the estimate is the mean over `probes`
    probes, differentiable in params (the products stay on the tape). z: [B, *event] (or one sample, see
    `batched`), n = entries per sample.
    form: "vjp" (J^T v, differentiated by double backward, as TorchDEQ's jac_reg) or "jvp" (J v by
        torch.func.jvp: reverse-over-forward, no double backward: for torch.compile and fp16 autocast).
    vectors: the probes themselves, [probes, B, *event] (or [probes, *event] for one sample); needed under
        vmap (no random draws there) and for reproducing an estimate. Otherwise drawn from `generator`
        (`distribution` "rademacher" or "gaussian").
    counter: an object with vjps / jvps fields (ProductCount, CostRecord): one product per probe is added.
    reduction: "mean" (over the batch; a scalar loss term), "sum" or "none" ([B]; 0-dim for one sample).
    fz: the task's own evaluation step(params, z, x), made with z requiring grad (as TorchDEQ's jac_reg); the
        VJP form then differentiates its graph instead of evaluating the step once more (the cost of jac_reg):
            z = z_star.detach().requires_grad_(); f = step(params, z, x)
            loss = task(f) + frobenius_penalty(step, params, z, x, fz=f)
    """
    where = "fpgrad.contraction.frobenius_penalty"
    step, params, z, x = resolve(step, params, z, x, where)
    if form not in FORMS:
        raise ValueError(f"{where}: form must be one of {FORMS}, got {form!r}")
    is_batched = infer_batched(z, x, batched)
    zb = z if is_batched else z.unsqueeze(0)
    xb = x if (x is None or is_batched) else x.unsqueeze(0)
    if vectors is None:
        if int(probes) < 1:
            raise ValueError(f"{where}: probes must be >= 1, got {probes}")
        vectors = draw_probes((int(probes), *zb.shape), generator, zb.dtype, zb.device, distribution)
    else:
        want = (zb.shape if is_batched else zb.shape[1:])
        if vectors.shape[1:] != want:
            raise ShapeError(f"{where}: vectors must be [probes, *z.shape] = [probes, {', '.join(map(str, want))}], "
                             f"got {tuple(vectors.shape)}")
        vectors = vectors if is_batched else vectors.unsqueeze(1)
    taped = None
    if fz is not None:
        if form != "vjp":
            raise ValueError(f"{where}: fz= is reused by the VJP form only (the JVP form evaluates the step under "
                             "torch.func.jvp); use form='vjp' or drop fz=")
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            raise ShapeError(f"{where}: fz must be step(params, z, x), of z's shape {tuple(z.shape)}, got "
                             f"{tuple(getattr(fz, 'shape', ()))}")
        if not (z.requires_grad and fz.requires_grad):
            raise ValueError(f"{where}: fz= needs the step evaluated at a z that requires grad: "
                             "z = z_star.detach().requires_grad_(); fz = step(params, z, x); then pass both")
        taped = (z, fz)
    lin = Linearised(step, params, zb, xb, counter, where, taped=taped)
    product = lin.vjp if form == "vjp" else lin.jvp
    total = None
    for v in vectors:
        w = product(v.reshape(lin.batch, lin.n))
        sq = w.pow(2).sum(dim=1)
        total = sq if total is None else total + sq
    values = total / (vectors.shape[0] * lin.n)
    if not is_batched:
        values = values[0]
    return _reduce(values, reduction, where)


def frobenius_exact(step: Callable, params: Mapping[str, Tensor], z: Tensor, x: Tensor | None, *,
                    batched: bool | None = None) -> Tensor:
    """||J||_F^2 / n per sample from the dense Jacobian (torch.func.jacrev; n VJPs): a reference for small maps,
    differentiable in params."""
    is_batched = infer_batched(z, x, batched)
    zb = z.detach() if is_batched else z.detach().unsqueeze(0)
    xb = x if (x is None or is_batched) else x.unsqueeze(0)

    def one(zs, xs):
        J = torch.func.jacrev(lambda zz: step(params, zz[None], None if xs is None else xs[None])[0])(zs)
        return J.reshape(zs.numel(), zs.numel()).pow(2).sum() / zs.numel()
    values = torch.stack([one(zb[b], None if xb is None else xb[b]) for b in range(zb.shape[0])])
    return values if is_batched else values[0]
