"""How well the spectral penalty of the discovery study sees rho(J): its estimate against the dense spectral radius.

(A study instrument, like studies/discovery_reuse.py: it reruns a stored run of studies/discovery.py.)

The penalised implicit arms add `weight x spectral_penalty(..., target, iters=P, state=SpectralState)` to the
loss: P power steps a training step, warm-started from the vectors of the previous step. Each training step
draws a new batch of scenes, so the warm start comes from other scenes. This instrument loads a run's checkpoint
and repeats what training does on fresh batches (the training forward, z from it, the penalty's own call with
its state carried from batch to batch, the first batch a cold start of 20 steps as in training), and beside it
computes per scene the dense Jacobian of the slot attention step at the same z and its spectral radius
(torch.linalg.eigvals in float64), and cold power estimates with more steps. Written: per batch and scene the
dense rho, the penalty's estimate and its residual, the 20- and 100-step estimates; and summaries (the median
and smallest ratio estimate / dense, the largest dense rho against the largest estimate, the scenes whose dense
rho is >= 1 while the estimate is below the target). Beside them, k Arnoldi steps on J^T from a random start (k
VJPs, no warm start: the largest |Ritz value| of the k x k Hessenberg matrix), for k in ARNOLDI_STEPS: what a
Krylov estimate would see for the products the penalty spends (4 power steps cost 4 x 4 + 2 products); and the
penalty itself with `krylov=K, iters=1` (K Arnoldi steps on J and on J^T from its stored vectors, 2K + 6 products),
its state carried from batch to batch as training would.

    python -m studies.discovery_penalty_bias [--run RUN] [--batches 3] [--quick] [--out JSON]

RUN defaults to reports/discovery/arms/plain-fullres-k6-implicit-penalty-slot-embedding; JSON to penalty_bias.json
beside it (penalty_bias-RUN.json for another run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from studies import discovery

ARNOLDI_STEPS = (4, 8, 16)      # Krylov estimates beside the power steps: k Arnoldi steps cost k VJPs
KRYLOV = (8, 16)                # the penalty itself with krylov=K, iters=1 (2K + 6 products a call)
DEFAULT_RUN = Path("reports/discovery/arms/plain-fullres-k6-implicit-penalty-slot-embedding")


def dense_radius(step, params, z: torch.Tensor, x: torch.Tensor) -> list[float]:
    """rho(J) per sample at z: the dense Jacobian of one sample's step (jacrev) and its eigenvalues in float64."""
    out = []
    shape = z.shape[1:]
    for b in range(z.shape[0]):
        def one(flat, b=b):
            return step(params, flat.reshape(1, *shape), x[b:b + 1]).reshape(-1)
        J = torch.func.jacrev(one)(z[b].reshape(-1))
        out.append(float(torch.linalg.eigvals(J.double()).abs().max()))
    return out


def arnoldi_radius(step, params, z: torch.Tensor, x: torch.Tensor, k: int, generator: torch.Generator) -> list[float]:
    """Per sample, the largest |Ritz value| after k Arnoldi steps on J^T (k VJPs, batched; same spectrum as J)
    from a random start, classical Gram-Schmidt applied twice, the k x k Hessenberg's eigenvalues in float64."""
    B = z.shape[0]
    _, vjp = torch.func.vjp(lambda zz: step(params, zz, x), z)
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device).reshape(B, -1)
    basis = [v / v.norm(dim=1, keepdim=True)]
    H = torch.zeros(B, k + 1, k, dtype=torch.float64, device=z.device)
    for j in range(k):
        w = vjp(basis[j].reshape(z.shape))[0].reshape(B, -1)
        for _ in range(2):
            for i, q in enumerate(basis):
                h = (q * w).sum(dim=1)
                H[:, i, j] += h.double()
                w = w - h.unsqueeze(1) * q
        norm = w.norm(dim=1)
        H[:, j + 1, j] = norm.double()
        basis.append(w / norm.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(1))
    return torch.linalg.eigvals(H[:, :k, :k]).abs().amax(dim=1).tolist()


def measure(run: Path, batches: int, seed: int = 7, quick: bool = False) -> dict:
    from fpgrad.contraction import SpectralState, spectral_estimate, spectral_penalty
    from fpgrad.maps import slot_attention_step
    torch.set_num_threads(1)
    config = {**discovery.DEFAULTS, **json.loads((run / "config.json").read_text())}
    if not config.get("penalty"):
        raise SystemExit(f"discovery_penalty_bias: {run} is not a penalised run (its config has no penalty)")
    model = discovery.build_model(config)
    ckpt = torch.load(run / "ckpt.pt", weights_only=False, map_location="cpu")
    model.load_state_dict(ckpt["model"])
    model.train()
    data = discovery.dataset(config)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    sa = model.slot_attention

    def step(params, z, x):
        return slot_attention_step(params, z, x, eps=sa.eps)
    state = SpectralState(generator=torch.Generator().manual_seed(seed + 2), cold_iters=20)
    # the same penalty with a Krylov start (spectral_penalty(..., krylov=K, iters=1)), each with its own state
    krylov_states = {K: SpectralState(generator=torch.Generator().manual_seed(seed + 2), cold_iters=20)
                     for K in KRYLOV}
    target, iters = config["penalty_target"], config["penalty_iters"]
    rows = []
    batch = 4 if quick else config["batch"]
    for k in range(batches + 1):
        images = data.sample(batch, gen).images
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # the forward's cap warnings: a training step's, not news here
            out = model(images, generator=noise)
        z, tokens = out.slots.detach(), out.tokens.detach()
        params = {n: p.detach() for n, p in sa.functional_params().items()}
        spectral_penalty(step, params, z, tokens, target=target, state=state, iters=iters,
                         smooth=config["penalty_smooth"])
        for K, st in krylov_states.items():
            spectral_penalty(step, params, z, tokens, target=target, state=st, iters=1, krylov=K,
                             smooth=config["penalty_smooth"])
        if k == 0:                                  # the cold start: training's first step, not its usual one
            continue
        estimate, residual = state.last.tolist(), state.residual.tolist()
        cold = {n: spectral_estimate(step, params, z, tokens, iters=n,
                                     generator=torch.Generator().manual_seed(seed + 3)).value.detach().tolist()
                for n in (20, 100)}
        arnoldi = {n: arnoldi_radius(step, params, z, tokens, n, torch.Generator().manual_seed(seed + 4))
                   for n in ARNOLDI_STEPS}
        dense = dense_radius(step, params, z, tokens)
        rows += [{"batch": k, "scene": i, "dense": d, "penalty_estimate": e, "penalty_residual": r,
                  "cold_20": c20, "cold_100": c100, **{f"arnoldi_{n}": arnoldi[n][i] for n in ARNOLDI_STEPS},
                  **{f"penalty_krylov_{K}": krylov_states[K].last[i].item() for K in KRYLOV}}
                 for i, (d, e, r, c20, c100) in enumerate(zip(dense, estimate, residual, cold[20], cold[100]))]
        print(f"batch {k}: dense rho max {max(dense):.3f}, the penalty's estimate max {max(estimate):.3f}",
              file=sys.stderr)
    ratios = [r["penalty_estimate"] / r["dense"] for r in rows]
    blind = [r for r in rows if r["dense"] >= 1.0 and r["penalty_estimate"] < target]
    summary = {
        "scenes": len(rows), "penalty_iters": iters, "target": target,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "dense_max": max(r["dense"] for r in rows), "dense_mean": statistics.fmean(r["dense"] for r in rows),
        "estimate_max": max(r["penalty_estimate"] for r in rows),
        "estimate_mean": statistics.fmean(r["penalty_estimate"] for r in rows),
        "cold_20_ratio_median": statistics.median(r["cold_20"] / r["dense"] for r in rows),
        "cold_100_ratio_median": statistics.median(r["cold_100"] / r["dense"] for r in rows),
        **{f"arnoldi_{n}_ratio_median": statistics.median(r[f"arnoldi_{n}"] / r["dense"] for r in rows)
           for n in ARNOLDI_STEPS},
        **{f"arnoldi_{n}_ratio_min": min(r[f"arnoldi_{n}"] / r["dense"] for r in rows) for n in ARNOLDI_STEPS},
        **{f"penalty_krylov_{K}_ratio_median": statistics.median(r[f"penalty_krylov_{K}"] / r["dense"] for r in rows)
           for K in KRYLOV},
        **{f"penalty_krylov_{K}_ratio_min": min(r[f"penalty_krylov_{K}"] / r["dense"] for r in rows) for K in KRYLOV},
        **{f"penalty_krylov_{K}_products": 2 * K + 6 for K in KRYLOV},
        "dense_at_least_1": sum(r["dense"] >= 1.0 for r in rows),
        "dense_at_least_1_estimate_below_target": len(blind),
        "residual_median": statistics.median(r["penalty_residual"] for r in rows),
    }
    return {"study": "discovery_penalty_bias", "run": str(run), "checkpoint_step": int(ckpt["step"]),
            "batches": batches, "seed": seed, "quick": quick,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.discovery_penalty_bias", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="a penalised arm run (its config.json and ckpt.pt)")
    p.add_argument("--batches", type=int, default=3, help="measured batches after the cold start (default 3)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="batches of 4 scenes")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: penalty_bias.json beside the run)")
    args = p.parse_args(argv)
    if not (args.run / "ckpt.pt").exists():
        raise SystemExit(f"discovery_penalty_bias: {args.run} has no ckpt.pt; train it first (python -m studies."
                         "discovery --arm implicit-penalty ...)")
    result = measure(args.run, args.batches, args.seed, args.quick)
    out = args.out or args.run.parent / f"penalty_bias{'' if args.run == DEFAULT_RUN else '-' + args.run.name}.json"
    text = json.dumps(result, indent=1) + "\n"
    discovery._atomic_write_bytes(out, lambda f: f.write(text.encode()))
    s = result["summary"]
    print(f"{s['scenes']} scenes at step {result['checkpoint_step']}: the penalty's estimate ({s['penalty_iters']} "
          f"warm power steps) / dense rho(J): median {s['ratio_median']:.2f}, min {s['ratio_min']:.2f}; dense max "
          f"{s['dense_max']:.3f} vs estimate max {s['estimate_max']:.3f}; {s['dense_at_least_1']} scenes with dense "
          f"rho >= 1, {s['dense_at_least_1_estimate_below_target']} of them estimated below the target "
          f"{s['target']}; 20 / 100 cold steps: median ratio {s['cold_20_ratio_median']:.2f} / "
          f"{s['cold_100_ratio_median']:.2f}; Arnoldi " + ", ".join(
              f"{n} VJPs: median {s[f'arnoldi_{n}_ratio_median']:.2f} (min {s[f'arnoldi_{n}_ratio_min']:.2f})"
              for n in ARNOLDI_STEPS) + "; the penalty with krylov=K, iters=1: " + ", ".join(
              f"K={K} ({s[f'penalty_krylov_{K}_products']} products): median "
              f"{s[f'penalty_krylov_{K}_ratio_median']:.2f} (min {s[f'penalty_krylov_{K}_ratio_min']:.2f})"
              for K in KRYLOV) + f". Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
