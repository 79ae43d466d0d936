"""RecycleSpace: a Krylov subspace carried from one GCRODR solve to the next, owned by the caller."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import DeviceError, DTypeError, ShapeError


class RecycleSpace:
    """The subspace U that GCRODR deflates in the next solve of a slowly changing sequence of systems.

    A mutable object the caller owns and passes in (`GCRODR(space=space)`); a solve reads U at its start
    and replaces it at its end (the harmonic Ritz vectors of its last cycle). Columns are unit vectors or
    zero (unused).
    U: [B, n, k] per sample (sample i of the next batch uses sample i's subspace: the same batch of systems
    recurs) or [n, k] shared by all samples (training, where batches change: the per-sample vectors of the
    last solve compressed to k columns by an SVD).
    shared: True -> shared. False -> per sample; a solve with another batch size starts without recycling
    (noted in its message and history). None (default) -> per sample while the batch size stays the same,
    shared from the first change on (the per-sample subspace is merged; noted in the message).
    A U whose n, dtype or device differ from b's raises ShapeError / DTypeError / DeviceError.
    history: one dict per solve that used the space (batch, n, mode, recycled columns, matvecs, note).
    """

    def __init__(self, k: int = 10, shared: bool | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"RecycleSpace: k must be an int >= 1, got {k!r}")
        if shared not in (None, True, False):
            raise ValueError(f"RecycleSpace: shared must be True, False or None, got {shared!r}")
        self.k, self.shared = k, shared
        self.U: Tensor | None = None
        self.history: list[dict[str, Any]] = []

    # --- what it holds -----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """"empty" | "per-sample" | "shared"."""
        if self.U is None:
            return "empty"
        return "shared" if self.U.dim() == 2 else "per-sample"

    @property
    def solves(self) -> int:
        """How many solves used the space since it was made or reset."""
        return len(self.history)

    @property
    def columns(self) -> int:
        """Non-zero columns of U (per sample: the most any sample holds)."""
        if self.U is None:
            return 0
        return int((self.U != 0).any(-2).sum(-1).max())

    def reset(self) -> None:
        """Forget the subspace and the history: the space is as new."""
        self.U = None
        self.history = []

    def __repr__(self) -> str:
        shape = None if self.U is None else tuple(self.U.shape)
        return (f"RecycleSpace(k={self.k}, shared={self.shared}, mode={self.mode!r}, U={shape}, "
                f"solves={self.solves})")

    # --- used by GCRODR --------------------------------------------------------------------------------------------
    def check(self, b: Tensor, who: str) -> None:
        """Raise if the stored U cannot serve systems with right-hand sides b: [B, n]."""
        if self.U is None:
            return
        fix = "use one RecycleSpace per kind of system, or call space.reset()"
        if self.U.shape[-2] != b.shape[1]:
            raise ShapeError(f"{who}: the RecycleSpace holds U of shape {tuple(self.U.shape)} (n = {self.U.shape[-2]}) "
                             f"but b has shape {tuple(b.shape)} (n = {b.shape[1]}); {fix}")
        if self.U.dtype != b.dtype:
            raise DTypeError(f"{who}: the RecycleSpace holds U of dtype {self.U.dtype} but b has dtype {b.dtype}; "
                             f"{fix}")
        if self.U.device != b.device:
            raise DeviceError(f"{who}: the RecycleSpace holds U on {self.U.device} but b is on {b.device}; {fix}")

    def load(self, b: Tensor) -> tuple[Tensor | None, str | None]:
        """The stored subspace for the batch of b as [B, k, n] (rows are vectors), or None; and a note if the
        space had to start fresh or change mode."""
        if self.U is None:
            return None, None
        B = b.shape[0]
        note = None
        if self.U.dim() == 3 and self.U.shape[0] != B:
            if self.shared is False:
                note = (f"recycle space: batch size {B} differs from the stored {self.U.shape[0]} (per-sample mode): "
                        "started without recycling; RecycleSpace(shared=True) shares one subspace across batches")
                return None, note
            stored = self.U.shape[0]
            everyone = torch.ones(stored, dtype=torch.bool, device=self.U.device)
            self.U = compress(self.U.transpose(1, 2), everyone, self.k).T.contiguous()
            note = (f"recycle space: batch size {B} differs from the stored {stored}: the per-sample subspaces were "
                    "merged into one shared by all samples (shared from now on; RecycleSpace(shared=False) starts "
                    "fresh instead)")
        if self.U.dim() == 2:
            return self.U.T.unsqueeze(0).expand(B, -1, -1), note
        return self.U.transpose(1, 2), note

    def store(self, U: Tensor, keep: Tensor, previous: Tensor | None, entry: dict[str, Any]) -> None:
        """Replace the subspace with the rows of U: [B, k, n] of the samples in `keep` ([B] bool); the others
        keep `previous` (per sample) or are left out of the shared compression. Appends `entry` to history."""
        B, k, n = U.shape
        U = _unit_rows(torch.where(torch.isfinite(U), U, 0))
        share = self.shared is True or self.mode == "shared"
        if share:
            if bool(keep.any()):
                self.U = compress(U, keep, self.k).T.contiguous()
        else:
            old = previous if previous is not None else torch.zeros_like(U)
            self.U = torch.where(keep.view(B, 1, 1), U, old).transpose(1, 2).contiguous()
        self.history.append({**entry, "mode": self.mode, "columns": self.columns})


def _unit_rows(U: Tensor) -> Tensor:
    """U: [..., k, n] with each non-zero row scaled to unit norm."""
    norm = U.norm(dim=-1, keepdim=True)
    return U / torch.where(norm == 0, torch.ones_like(norm), norm)


def compress(U: Tensor, keep: Tensor, k: int) -> Tensor:
    """One [k, n] basis for the rows of U[keep]: U: [B, k, n] -> the k leading left singular vectors of the
    non-zero unit rows (directions common to many samples first); rows beyond the rank are zero."""
    n = U.shape[-1]
    rows = _unit_rows(U[keep].reshape(-1, n))
    rows = rows[(rows != 0).any(1)]
    out = U.new_zeros(k, n)
    if rows.shape[0] == 0:
        return out
    left, s, _ = torch.linalg.svd(rows.double().T, full_matrices=False)          # [n, r]
    rank = int((s > torch.finfo(U.dtype).eps ** 0.5 * s[0]).sum()) if float(s[0]) > 0 else 0
    r = min(rank, k)
    out[:r] = left[:, :r].T.to(U.dtype)
    return out
