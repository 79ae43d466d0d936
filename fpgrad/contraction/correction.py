"""Fixed-point correction (Bai et al. 2022): a weighted loss on intermediate iterates of the forward solve."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

WEIGHTS = ("linear", "exp", "const")


def correction_weights(count: int, weights: Union[str, Tensor, Sequence[float]] = "linear", gamma: float | None = None,
                       *, normalize: bool = True, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Weights [count] of the iterates k = 0 .. count-1 (the last is the deepest), as TorchDEQ's schedules:
    "linear": 1 - (count - k - 1) / count * gamma (gamma 0.9);  "exp": gamma^(count - k - 1) (gamma 0.8);
    "const": 1; or the weights themselves. normalize: divide by their sum (TorchDEQ does not: normalize=False
    reproduces its fp_correction), so the loss keeps its scale whatever the number of iterates."""
    if count < 1:
        raise ValueError(f"fpgrad.contraction.correction_weights: need at least one iterate, got {count}")
    if isinstance(weights, str):
        k = torch.arange(count, dtype=torch.float64)
        if weights == "linear":
            g = 0.9 if gamma is None else float(gamma)
            w = 1.0 - (count - k - 1) / count * g
        elif weights == "exp":
            g = 0.8 if gamma is None else float(gamma)
            w = g ** (count - k - 1)
        elif weights == "const":
            w = torch.ones(count, dtype=torch.float64)
        else:
            raise ValueError(f"fpgrad.contraction: unknown weight schedule {weights!r}; use one of {WEIGHTS} "
                             "or a tensor of weights")
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.numel() != count:
            raise ValueError(f"fpgrad.contraction: {w.numel()} weights given for {count} iterates; give one weight "
                             "per entry of `iters`")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"fpgrad.contraction: weights must be finite and >= 0, got {w.tolist()}")
    if normalize:
        total = w.sum()
        if float(total) == 0.0:
            raise ValueError("fpgrad.contraction: the weights sum to 0; they cannot be normalised")
        w = w / total
    return w.to(dtype=dtype, device=device)


def fixed_point_correction(step: Callable, params: Mapping[str, Tensor], x: Tensor | None, z0: Tensor,
                           iters: Sequence[int], loss_fn: Callable[[Tensor], Tensor], *,
                           weights: Union[str, Tensor, Sequence[float]] = "linear", gamma: float | None = None,
                           normalize: bool = True, grad_steps: int = 1, tau: float = 1.0,
                           detach: bool = True, return_losses: bool = False):
    """sum_k w_k loss_fn(z_k) over intermediate iterates of plain iteration z <- step(params, z, x) from z0.

    iters: increasing iteration counts at which the loss is taken, e.g. [6, 12, 18, 24] (TorchDEQ's n_states
    sampling of a 24-step solve), the last one the deepest.
    detach=True (TorchDEQ's DEQIndexing with a phantom / one-step gradient): the iteration runs without the
    tape, and each sampled iterate gets `grad_steps` steps on the tape from its detached value,
    z <- tau f(z) + (1 - tau) z (grad_steps=1, tau=1: the one-step / JFB gradient at every iterate; the
    iteration count of the sampled iterate includes these steps). detach=False: the whole trajectory is
    on the tape (unrolled backprop with losses on intermediate iterates).
    weights: "linear" | "exp" | "const" | a tensor [len(iters)] (see `correction_weights`).
    Returns the weighted loss (and the per-iterate losses, detached, when return_losses).
    """
    where = "fpgrad.contraction.fixed_point_correction"
    iters = [int(i) for i in iters]
    if not iters or any(i < 1 for i in iters) or any(b <= a for a, b in zip(iters, iters[1:])):
        raise ValueError(f"{where}: iters must be increasing positive iteration counts, got {iters}")
    if int(grad_steps) < 1 or (detach and grad_steps > iters[0]):
        raise ValueError(f"{where}: need 1 <= grad_steps <= iters[0] ({iters[0]}), got {grad_steps}")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"{where}: tau (the damping of the taped steps) must be in (0, 1], got {tau}")
    w = correction_weights(len(iters), weights, gamma, normalize=normalize, dtype=z0.dtype, device=z0.device)

    def taped(z: Tensor, steps: int) -> Tensor:
        for _ in range(steps):
            f = step(params, z, x)
            z = f if tau == 1.0 else tau * f + (1.0 - tau) * z
        return z

    losses = []
    total = None
    z = z0 if not detach else z0.detach()
    done = 0
    for k, i in enumerate(iters):
        if detach:
            with torch.no_grad():
                frozen = {key: v.detach() for key, v in params.items()}
                xd = None if x is None else x.detach()
                for _ in range(i - grad_steps - done):
                    z = step(frozen, z, xd)
            done = i - grad_steps
            zk = taped(z.detach(), grad_steps)
        else:
            z = taped(z, i - done)
            done = i
            zk = z
        loss = loss_fn(zk)
        losses.append(loss.detach())
        term = w[k] * loss
        total = term if total is None else total + term
    return (total, torch.stack(losses)) if return_losses else total
