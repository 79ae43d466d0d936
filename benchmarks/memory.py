"""Memory: bytes autograd saves for backward (fpgrad.gradient's cost.bytes_saved, counted with saved-tensor
hooks, unique storages) after T = 10, 100, 1000 forward iterations, for each estimator; ratio T=1000 / T=10.

The forward is exactly T plain iterations (Iterate.exactly(T)); Unrolled(T) and Truncated(k, T)
take T themselves. An independent count (every saved tensor's numel x element size, no deduplication) is
recorded beside it as a check. Maps: slot attention and the tanh map, float64.

--dtype float32: the same maps (float64 draws) with params, inputs, z0 and targets cast to float32; every saved
tensor is then half the bytes, and the targets (ratios T=1000 / T=10) are unchanged in kind. No tolerance is
involved (exactly T iterations; Implicit's GMRES at its default tol, capped at 300). Written to
reports/benchmarks/float32/.

    python -m benchmarks.memory [--quick] [--dtype float32]      (or: fpgrad bench memory)
"""

from __future__ import annotations

import sys

import torch

from benchmarks import _common as C

RATIO_LIMIT = 1.05
CONSTANT = ("implicit", "one_step", "neumann", "phantom")


class RawSaved:
    """Sum of numel x element size of every tensor autograd saves (no deduplication): an upper bound."""

    def __init__(self):
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def estimators(T: int):
    from fpgrad.estimators import Implicit, Neumann, OneStep, Phantom, Truncated, Unrolled
    return [("unrolled", f"Unrolled({T})", Unrolled(T)),
            ("truncated", f"Truncated(5, {T})", Truncated(5, T)),
            ("one_step", "OneStep()", OneStep()),
            ("neumann", "Neumann(5)", Neumann(5)),
            ("phantom", "Phantom(5, 0.5)", Phantom(5, 0.5)),
            ("implicit", "Implicit(gmres)", Implicit(solver="gmres", max_iter=300))]


def measure(m, x, z0, loss_fn, Ts: list[int]) -> list[dict]:
    import fpgrad
    from fpgrad.forward import Iterate
    rows: dict[str, dict] = {}
    for T in Ts:
        forward = Iterate.exactly(T)
        for kind, label, est in estimators(T):
            with C.quiet():
                g = fpgrad.gradient(m, x, loss_fn, estimator=est, z0=z0, forward=forward)
                params = {k: v.detach().requires_grad_(True) for k, v in m.params.items()}
                with RawSaved() as raw:       # the forward alone, through fpgrad.fixed_point
                    z = fpgrad.fixed_point(m.step, params, x, z0, forward=forward, backward=est)
                    loss_fn(z)
            row = rows.setdefault(kind, {"estimator": kind, "label": label.replace(str(T), "T")})
            row[f"bytes T={T}"] = g.cost.bytes_saved
            row[f"raw bytes T={T}"] = raw.bytes
            row[f"backward steps T={T}"] = g.cost.backward_steps
    out = []
    for row in rows.values():
        row["ratio"] = row[f"bytes T={Ts[-1]}"] / row[f"bytes T={Ts[0]}"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser("memory", __doc__.splitlines()[0], dtype=True)
    p.add_argument("--T", type=int, nargs="+", default=[10, 100, 1000],
                   help="forward iteration counts (default 10 100 1000; the ratio is last / first)")
    args = p.parse_args(argv)
    run = C.Run("memory", args)
    dtype = run.dtype
    import fpgrad
    Ts = sorted(args.T)
    gen = torch.Generator().manual_seed(args.seed)
    B = 2 if args.quick else 4
    maps = []
    dim, K, N = (32, 4, 32) if args.quick else (64, 5, 64)
    sa = C.cast_map(fpgrad.maps.slot_attention(dim=dim, num_slots=K, seed=args.seed, dtype=C.DTYPE), dtype)
    x = torch.randn(B, N, dim, generator=gen, dtype=C.DTYPE).to(dtype)
    maps.append((f"slot attention d={dim} K={K} N={N} batch {B}", sa, x, sa.init_state(x, gen)))
    n = 128 if args.quick else 512
    tanh = C.cast_map(fpgrad.maps.tanh_rnn(n, 0.9, seed=args.seed), dtype)
    xt = torch.randn(B, n, generator=gen, dtype=C.DTYPE).to(dtype)
    maps.append((f"tanh n={n} batch {B}", tanh, xt, torch.zeros(B, n, dtype=dtype)))
    results = {"T": Ts, "maps": []}
    targets = []
    for label, m, xx, z0 in maps:
        target_z = torch.randn(z0.shape, generator=gen, dtype=C.DTYPE).to(dtype)

        def loss_fn(z, target_z=target_z):
            return 0.5 * ((z - target_z) ** 2).sum()
        rows = measure(m, xx, z0, loss_fn, Ts)
        results["maps"].append({"label": label, "rows": rows})
        cols = ["estimator"] + [f"bytes T={T}" for T in Ts] + ["ratio"]
        C.table([{**r, "ratio": C.fmt(r["ratio"], 4)} for r in rows], cols, f"{label}: bytes saved for backward")
        for r in rows:
            if r["estimator"] in CONSTANT:
                targets.append(C.target(
                    f"backward bytes T={Ts[-1]} / T={Ts[0]}, {r['label']}, {label}", r["ratio"] <= RATIO_LIMIT,
                    round(r["ratio"], 4), f"<= {RATIO_LIMIT}",
                    f"{r[f'bytes T={Ts[0]}']} -> {r[f'bytes T={Ts[-1]}']} bytes"))
        unrolled = next(r for r in rows if r["estimator"] == "unrolled")
        results["maps"][-1]["unrolled_ratio"] = unrolled["ratio"]
    C.table(targets, ["target", "met", "value", "threshold", "detail"], "Targets")
    run.save(results, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
