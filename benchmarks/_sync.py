"""Counting host synchronisations: on CUDA torch.cuda.set_sync_debug_mode("warn") and its warnings; on CPU (where
nothing syncs) the calls that would: Tensor.item / __bool__ / __int__ / __float__ / tolist and nonzero."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

# the Tensor methods (and torch functions) that copy a device value to the host
_TENSOR_METHODS = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")
_TORCH_FUNCTIONS = ("nonzero",)


class SyncCounter:
    """Context manager counting host synchronisations in its block: `count`, and `by_kind` on CPU.

    device: "cuda" counts what torch.cuda.set_sync_debug_mode("warn") reports (every real sync, also those
    inside torch); anything else counts the Python-level calls that would sync on a GPU (patched on
    torch.Tensor for the block's duration; not thread-safe).
    """

    def __init__(self, device: Any = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        def counted(*args, **kwargs):
            self.count += 1
            self.by_kind[name] = self.by_kind.get(name, 0) + 1
            return original(*args, **kwargs)
        setattr(owner, name, counted)

    def __enter__(self) -> SyncCounter:
        if self.cuda:
            self._previous_mode = torch.cuda.get_sync_debug_mode()
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            for name in _TENSOR_METHODS:
                self._wrap(torch.Tensor, name)
            for name in _TORCH_FUNCTIONS:
                self._wrap(torch, name)
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(self._previous_mode)
            self.count = sum("synchroniz" in str(w.message) for w in self._records)
            self._catch.__exit__(*exc)
        else:
            for owner, name, original in reversed(self._saved):
                setattr(owner, name, original)
            self._saved.clear()


def syncs_per_iteration(run: Callable[[int], Any], device: Any, low: int = 5, high: int = 15) -> dict[str, Any]:
    """Host syncs per solver iteration: (syncs of run(high) - syncs of run(low)) / (high - low), so that the
    once-per-call syncs (setup, the final checks) cancel. run(T) must run exactly T iterations."""
    run(low)                                    # warm up (first-call checks, lazy initialisation)
    counts = {}
    kinds: dict[str, int] = {}
    for T in (low, high):
        with SyncCounter(device) as counter:
            run(T)
        counts[T] = counter.count
        if T == high:
            kinds = dict(counter.by_kind)
    per_iteration = (counts[high] - counts[low]) / (high - low)
    return {"per_iteration": per_iteration, "per_call": counts[low] - low * per_iteration,
            "iterations": [low, high], "counts": [counts[low], counts[high]], "kinds_at_high": kinds}
