"""Reuse in exact adjoint solves (#10): VJPs and seconds per backward at equal accuracy over real training runs,
for cold GMRES, TorchDEQ's best backward solver and each reuse strategy of `Implicit` (SHINE preconditioner and
initial guess, warm start by sample id, mixed precision, GCRO-DR recycling, and combinations).

At every training step every strategy solves the SAME adjoint system (I - J^T) u = g (same params, batch,
state, g); the training step then uses the dense reference adjoint, so the run does not depend on the
strategies. Stateful strategies (a WarmStart or RecycleSpace the caller owns) run on every step; stateless ones
may be measured every K-th step only, and ratios are taken over the steps where all were measured.
- tanh maps (n = 2000, rho(J) at z* tuned to 0.9, 0.96, 0.99): SGD (lr 3e-6) on U and b (W fixed, so that
  rho(J) stays near its tuned value) with the exact gradient of L = 1/(2B) sum ||z*_i - t_i||^2, t_i the fixed
  points of a teacher map (U and b perturbed), over 8 inputs near the tuned one shuffled into batches of 4 each
  epoch, with sample ids; forward Broyden (tol 1e-10) from zero keeping every update (memory = max_iter); at
  the first and last step SHINE is also measured with the default memory 50.
- slot attention, the training study's model, data, batch and Adam (fpgrad.setting: autoencoder_settings,
  build_autoencoder, scenes) in float64, on 64 fixed scenes cycled in epochs (warm starts need samples that
  come back) with the slot-init noise fixed per scene, trained with the exact implicit gradient:
  z_T: the study's forward (T = 3 plain iterations, lr 2e-3) and adjoint system at z_T (no forward inverse
       estimate: SHINE does not apply);
  z*:  slots solved to the fixed point by Broyden (tol 1e-10, every update kept) and the adjoint there, at lr
       2e-4 (at 2e-3 rho(J) at z* passes 1 within 3 steps and the fixed point stops existing).
Equal accuracy: every solver stops at the relative residual ||g - (I - J^T) u|| / ||g|| <= tol with, per
step, tol = 1e-6 min_i sigma_min(I - J_i^T) ||u_ref,i|| / ||g_i||, which guarantees ||u - u_ref|| / ||u_ref||
<= 1e-6 (u_ref: dense LU); the error is then checked against u_ref for every sample of every measured step.
TorchDEQ's solver iterates u = J^T u + g / ||g|| with stop_mode "abs" and the same tol (at most 1000 steps).
VJPs are batched products with J^T (float32 ones counted in them and also apart; recycling's k products for
C = (I - J^T) U included); seconds are one backward (linearise, adjoint solve, pullback), one thread.

    python -m benchmarks.reuse [--quick]      (writes reports/benchmarks/reuse.json and reuse_vjps.png)
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks import _common as C
from fpgrad.jacobian import Jacobian

ACCURACY = 1e-6                  # relative error of the adjoint every strategy must reach
TARGET_RATIO = 0.5               # mean VJPs of the best reuse strategy / cold GMRES
FIGURE = "reuse_vjps.png"
DEQ_MAX_ITER = 1000              # TorchDEQ's Broyden keeps max_iter columns and applies all filled ones: O(k) a step


# ---- strategies ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    """One way of solving the adjoint system.   options: Implicit's reuse options; state: a factory of the
    object the caller owns and carries across steps ("warm_start" | "recycle")."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    state: tuple[str, ...] = ()
    reuse: bool = True               # a reuse strategy (competes for the target); False: a baseline or a peer
    peer: str | None = None          # a TorchDEQ solver name: run TorchDEQ's backward iteration instead
    settings: tuple[str, ...] = ("tanh", "slot")
    note: str = ""

    @property
    def stateful(self) -> bool:
        return bool(self.state)

    @property
    def uses_forward_inverse(self) -> bool:
        return "forward" in (self.options.get("precondition"), self.options.get("initial_guess"))

    @property
    def uses_guess(self) -> bool:
        return "warm_start" in self.state or "warm_start_batch" in self.state or "initial_guess" in self.options

    @property
    def needs_recycling(self) -> bool:
        return "recycle" in self.state


def recycling_available() -> bool:
    from fpgrad import linsolve
    return "gcrodr" in linsolve.SOLVERS


def torchdeq_best_solver() -> str:
    """TorchDEQ's backward solver with the fewest VJPs to 1e-6 in benchmarks.adjoint_solve (mean over its maps);
    broyden when that benchmark has not been run."""
    data = C.load("adjoint_solve")
    if not data:
        return "broyden"
    totals: dict[str, list[float]] = {}
    for entry in data["results"]["maps"]:
        for r in entry["solvers"]:
            hit = r["targets"].get("1e-06")
            if r["library"] == "torchdeq":
                totals.setdefault(r["solver"], []).append(math.inf if hit is None else hit["vjps"])
    return min(totals, key=lambda k: statistics.mean(totals[k])) if totals else "broyden"


def strategies(deq_solver: str | None) -> list[Strategy]:
    shine = {"precondition": "forward"}
    out = [
        Strategy("cold gmres", reuse=False, note="Implicit() default: GMRES(30) from zero"),
        Strategy("gmres restart 200", {"options": {"restart": 200}}, reuse=False,
                 note="no reuse: a longer restart (memory for 200 basis vectors)"),
        Strategy("shine precondition", shine, note="right preconditioner: the forward Broyden's inverse estimate"),
        Strategy("shine guess", {"initial_guess": "forward"}, note="initial guess: that estimate applied to g"),
        Strategy("warm start", state=("warm_start",), note="previous adjoint of the same sample id"),
        Strategy("warm start + shine precondition", shine, state=("warm_start",)),
        Strategy("warm start (previous batch)", state=("warm_start_batch",), settings=("slot",),
                 note="no ids: the previous batch's adjoints (other scenes), as on the study's data stream"),
        Strategy("mixed precision", {"mixed_precision": torch.float32},
                 note="float32 GMRES, float64 residual correction"),
        Strategy("warm start + mixed precision", {"mixed_precision": torch.float32}, state=("warm_start",),
                 settings=("slot",)),
        Strategy("recycle", state=("recycle",), note="GCRO-DR, RecycleSpace(k=10, shared) carried across the run"),
        Strategy("recycle + shine precondition", shine, state=("recycle",)),
        Strategy("recycle + warm start", state=("recycle", "warm_start")),
    ]
    if deq_solver is not None:
        out.insert(1, Strategy(f"torchdeq {deq_solver}", reuse=False, peer=deq_solver,
                               note="TorchDEQ's backward: u = J^T u + g by its solver, from zero"))
    return out


def new_state(strategy: Strategy) -> dict[str, Any]:
    from fpgrad.estimators import WarmStart
    state: dict[str, Any] = {}
    for kind in strategy.state:
        if kind == "warm_start":
            state["warm_start"] = WarmStart()
        elif kind == "warm_start_batch":
            state["warm_start"] = WarmStart()
            state["unkeyed"] = True
        elif kind == "recycle":
            from fpgrad.linsolve import RecycleSpace
            state["recycle"] = RecycleSpace(k=10, shared=True)
    return state


def estimator(strategy: Strategy, state: dict[str, Any], tol: float, max_iter: int):
    from fpgrad.estimators import Implicit
    kw = dict(strategy.options)
    if "warm_start" in state:
        kw["warm_start"] = state["warm_start"]
    if "recycle" in state:
        kw["recycle"] = state["recycle"]
    return Implicit(tol=tol, max_iter=max_iter, **kw)


# ---- one adjoint system and the strategies on it ---------------------------------------------------------------

@dataclass
class System:
    """The adjoint system of one training step:  (I - J^T) u = g at z* = fp.z.   g, u_ref: [B, n]."""

    step: Callable
    params: dict[str, Tensor]
    x: Tensor
    fp: Any                       # the forward FixedPoint (its inverse estimate for SHINE)
    g: Tensor
    ids: list[int]
    u_ref: Tensor
    tol: float


def tolerance(sigma_min: Tensor, u_ref: Tensor, g: Tensor) -> float:
    """The relative residual that guarantees ||u - u_ref|| <= ACCURACY ||u_ref|| for every sample:
    ||u - u_ref|| <= ||r|| / sigma_min(A)."""
    bound = sigma_min * u_ref.norm(dim=1) / g.norm(dim=1)
    return max(float(ACCURACY * bound.min()), 1e-14)


def _torchdeq(solver_name: str, lin, g: Tensor, tol: float, max_iter: int) -> Tensor:
    """TorchDEQ's backward iteration u = J^T u + g on the normalised right-hand side (its abs residual is then
    our relative one)."""
    from torchdeq.solver import get_solver
    scale = g.norm(dim=1, keepdim=True)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    gn = g / scale
    u, _, _ = get_solver(solver_name)(lambda y: lin.JT(y) + gn, torch.zeros_like(g), max_iter=max_iter, tol=tol,
                                      stop_mode="abs")
    return u.reshape(g.shape) * scale


def run_strategy(strategy: Strategy, state: dict[str, Any], system: System, max_iter: int) -> dict[str, Any]:
    """One backward (linearise, adjoint solve, pullback) by `strategy` on `system`: its cost and accuracy."""
    from fpgrad.errors import FPGradError
    from fpgrad.estimators import CostRecord, Linearisation
    record = CostRecord()
    failure = None
    space = state.get("recycle")
    solves_before = len(space.history) if space is not None else 0
    t0 = C.clock()
    with C.quiet():
        lin = Linearisation(system.step, system.params, system.x, system.fp.z, record, system.fp)
        try:
            if strategy.peer is not None:
                u = _torchdeq(strategy.peer, lin, system.g, system.tol, min(max_iter, DEQ_MAX_ITER))
            else:
                if "warm_start" in state:
                    state["warm_start"].bind(None if state.get("unkeyed") else system.ids)
                u = estimator(strategy, state, system.tol, max_iter).adjoint_vector(lin, system.g, record)
        except FPGradError as e:           # a diverged solve: recorded, never hidden
            failure = f"{type(e).__name__}: {e}"
            u = torch.full_like(system.g, math.nan)
        vjps, low = record.vjps, record.low_precision_vjps
        if failure is None:
            lin.pullback(u)
    seconds = C.clock() - t0
    err = ((u - system.u_ref).norm(dim=1) / system.u_ref.norm(dim=1))
    error = float(err.max()) if bool(torch.isfinite(err).all()) else math.inf
    row: dict[str, Any] = {"vjps": vjps, "low_precision_vjps": low, "seconds": seconds, "error": error,
                           "verified": error <= ACCURACY}
    sol = record.solves[-1] if record.solves else None
    if sol is not None:
        row["converged"] = bool(sol.converged.all())
        row["residual"] = float(sol.residual.max())
        row["initial_residual"] = [float(v) for v in sol.residuals[0]]
        row["iterations"] = int(sol.iterations.max())
        if sol.rejected_guess is not None:
            row["rejected_guess"] = int(sol.rejected_guess.sum())
        if not row["converged"]:
            row["message"] = sol.message
        extra = getattr(sol, "stats", None)
        if isinstance(extra, dict):
            row["stats"] = {k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))}
    if space is not None and len(space.history) > solves_before:
        row["recycle_matvecs"] = space.history[-1].get("recycle_matvecs")
        row["recycled_columns"] = space.history[-1].get("recycled")
    if "warm_start" in state:
        ws = state["warm_start"]
        row["warm_start_hits"], row["warm_start_misses"] = ws.hits, ws.misses
    if failure is not None:
        row["failure"] = failure
    return row


def measure(system: System, chosen: list[Strategy], states: dict[str, dict], measured: bool, offset: int,
            max_iter: int, warm_up: bool = False) -> dict[str, dict]:
    """Every stateful strategy (always: its state must follow the run) and, on measured steps, every stateless
    one, in an order rotated by `offset` (so that drift in the machine's load hits all alike)."""
    todo = [s for s in chosen if measured or s.stateful]
    if warm_up:                 # first calls pay for lazy imports and kernel selection: run each once, untimed
        for s in todo:
            run_strategy(s, new_state(s), system, max_iter)
    k = offset % len(todo) if todo else 0
    out = {}
    for s in todo[k:] + todo[:k]:
        out[s.name] = run_strategy(s, states[s.name], system, max_iter)
    return out


# ---- setting (a): tanh maps -------------------------------------------------------------------------------------

def _inverse_norm(LU: Tensor, pivots: Tensor, iters: int = 30, seed: int = 0) -> Tensor:
    """||A^{-1}||_2 per sample from A's LU factors (power iteration on A^{-T} A^{-1}): [B]."""
    B, n, _ = LU.shape
    v = torch.randn(B, n, 1, generator=torch.Generator().manual_seed(seed), dtype=LU.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    value = torch.zeros(B, dtype=LU.dtype)
    for _ in range(iters):
        w = torch.linalg.lu_solve(LU, pivots, torch.linalg.lu_solve(LU, pivots, v), adjoint=True)
        value = w.norm(dim=1).squeeze(1)
        v = w / value.reshape(B, 1, 1)
    return value.sqrt()


class Revisits:
    """Each sample's reference adjoint at its last visit, to measure how far it moved by the next one: the
    relative residual ||g - (I - J^T) u_prev|| / ||g|| of the old adjoint in the new system is the best start a
    warm start by sample id can give (what bounds its savings)."""

    def __init__(self):
        self.last: dict[int, Tensor] = {}

    def residuals(self, ids: list[int], A: Tensor, g: Tensor, u_ref: Tensor) -> list[float | None]:
        """A: [B, n, n] the dense I - J^T of this step; g, u_ref: [B, n]."""
        out: list[float | None] = []
        for i, key in enumerate(ids):
            prev = self.last.get(key)
            out.append(None if prev is None else float((g[i] - A[i] @ prev).norm() / g[i].norm()))
            self.last[key] = u_ref[i].clone()
        return out


def memory_check(system: System, forward, z0: Tensor, max_iter: int) -> dict[str, Any]:
    """Cold GMRES and the SHINE preconditioner on this step's system when the forward Broyden keeps only
    `forward.memory` updates (the default 50; older ones are dropped): the inverse estimate it leaves."""
    with C.quiet():
        fp = forward.solve(system.step, system.params, system.x, z0)
    other = System(system.step, system.params, system.x, fp, system.g, system.ids, system.u_ref, system.tol)
    out: dict[str, Any] = {"memory": forward.memory, "forward_steps": int(fp.steps.max()),
                           "inverse_rank": int(fp.inverse.U.shape[-1])}
    for s in (Strategy("cold gmres"), Strategy("shine precondition", {"precondition": "forward"})):
        out[s.name] = run_strategy(s, {}, other, max_iter)
    return out


def step_entry(step: int, ids: list[int], measured: bool, loss: float, system: System, sigma_min: Tensor,
               forward_seconds: float, revisit: list[float | None]) -> dict[str, Any]:
    """The per-step record shared by both settings (before the strategies run)."""
    fp, g, u_ref = system.fp, system.g, system.u_ref
    return {"step": step, "ids": ids, "measured": measured, "loss": loss, "tol": system.tol,
            "sigma_min": sigma_min.tolist(), "u_over_g": (u_ref.norm(dim=1) / g.norm(dim=1)).tolist(),
            "revisit_residual": revisit, "forward_steps": fp.steps.tolist(),
            "forward_converged": bool(fp.converged.all()),
            "forward_relative_residual": float(fp.relative_residuals[-1].max()), "forward_seconds": forward_seconds,
            "inverse_rank": int(fp.inverse.U.shape[-1]) if fp.inverse is not None else None}


def relative_change(before: list[Tensor], after: list[Tensor]) -> float:
    num = sum(float((a - b).norm()) ** 2 for a, b in zip(after, before, strict=True))
    den = sum(float(b.norm()) ** 2 for b in before)
    return math.sqrt(num / den) if den > 0 else math.nan


def epochs(size: int, batch: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Sample ids of each step: the data set shuffled every epoch and cut into batches (the last partial
    batch of an epoch is dropped)."""
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(size, generator=generator).tolist()
        out += [perm[i:i + batch] for i in range(0, size - batch + 1, batch)]
    return out[:steps]


def tanh_setting(rho: float, cfg: dict, chosen: list[Strategy], seed: int) -> dict[str, Any]:
    import fpgrad
    from fpgrad.estimators import Linearisation
    n, B = cfg["n"], cfg["batch"]
    t0 = C.clock()
    tuned = C.tanh_at_rho(n, rho, seed=seed)
    step_fn = fpgrad.maps.tanh_rnn(n, 1.0, seed=seed).with_params(tuned.params).step
    print(f"tanh n={n}: W radius {tuned.info['W_radius']:.4f} gives rho(J) = {tuned.rho:.4f} at the tuned input "
          f"({C.clock() - t0:.1f} s)", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(seed + 101)
    X = tuned.x + cfg["input_noise"] * torch.randn(cfg["data"], n, generator=gen, dtype=C.DTYPE)
    # targets: the fixed points of a teacher (same W, U and b perturbed), so that the regression can be learnt
    teacher = dict(tuned.params)
    teacher["U"] = teacher["U"] + cfg["teacher_noise"] * torch.randn(n, n, generator=gen, dtype=C.DTYPE) / n ** 0.5
    teacher["b"] = teacher["b"] + cfg["teacher_noise"] * 0.1 * torch.randn(n, generator=gen, dtype=C.DTYPE)
    with C.quiet():
        targets = fpgrad.forward.Broyden(tol=1e-12, max_iter=2000, memory=100).solve(
            step_fn, teacher, X, torch.zeros_like(X)).z
    schedule = epochs(cfg["data"], B, cfg["steps"], gen)
    params = {k: v.clone() for k, v in tuned.params.items()}
    forward = fpgrad.forward.Broyden(tol=cfg["forward_tol"], max_iter=cfg["forward_max_iter"],
                                     memory=cfg["memory"])
    states = {s.name: new_state(s) for s in chosen}
    small = fpgrad.forward.Broyden(tol=cfg["forward_tol"], max_iter=cfg["forward_max_iter"], memory=50)
    revisits = Revisits()
    eye = torch.eye(n, dtype=C.DTYPE)
    log = []
    for step, ids in enumerate(schedule):
        ts = C.clock()
        x, t = X[ids], targets[ids]
        with C.quiet():
            fp = forward.solve(step_fn, params, x, torch.zeros_like(x))
        forward_seconds = C.clock() - ts
        z = fp.z
        loss = 0.5 * float(((z - t) ** 2).sum()) / B
        g = (z - t) / B
        A = eye - C.tanh_jacobian(params, z, x).transpose(1, 2)
        LU, pivots = torch.linalg.lu_factor(A)
        u_ref = torch.linalg.lu_solve(LU, pivots, g.unsqueeze(2)).squeeze(2)
        sigma_min = 1.0 / _inverse_norm(LU, pivots, seed=seed + step)
        system = System(step_fn, params, x, fp, g, ids, u_ref, tolerance(sigma_min, u_ref, g))
        measured = step % cfg["measure_every"] == 0 or step == len(schedule) - 1
        entry = step_entry(step, ids, measured, loss, system, sigma_min, forward_seconds,
                           revisits.residuals(ids, A, g, u_ref))
        if step in (0, len(schedule) - 1):
            J = eye - A.transpose(1, 2)
            entry["rho"] = [float(torch.linalg.eigvals(J[i]).abs().max()) for i in range(B)]
            if cfg["memory"] > small.memory:
                entry["memory_check"] = memory_check(system, small, torch.zeros_like(x), cfg["max_iter"])
        entry["strategies"] = measure(system, chosen, states, measured, step, cfg["max_iter"],
                                      warm_up=step == 0 and cfg.get("warm_up", False))
        log.append(entry)
        _progress(f"tanh rho={rho}", step, entry)
        # SGD with the exact (dense) gradient
        grads, _ = Linearisation(step_fn, params, x, z).pullback(u_ref)
        before = [params[k] for k in cfg["trained"]]
        params = {k: params[k] - cfg["lr"] * grads[k] if k in cfg["trained"] else params[k] for k in params}
        entry["parameter_change"] = relative_change(before, [params[k] for k in cfg["trained"]])
    return {"setting": "tanh", "label": f"tanh rho={rho}", "n": n, "batch": B, "rho_tuned": tuned.rho,
            "tuning": tuned.info, "config": cfg, "steps": log}


# ---- setting (b): slot attention (the training study's model) --------------------------------------------------

SLOT_VARIANTS = {
    # the training study's implicit arm: T = 3 plain iterations, the adjoint system at z_T, Adam at the study's lr
    "slot": {"label": "slot attention z_T (study)", "forward": "iterate", "lr": None, "steps": 48, "quick_steps": 3},
    # at the fixed point (Broyden), where SHINE applies; a lower lr: rho(J) at z* passes 1 after ~20 steps at
    # 2e-4 and after 3 at the study's 2e-3 (I - J^T is then singular or nearly so and z* may not exist)
    "slot_fp": {"label": "slot attention z* (fixed point)", "forward": "broyden", "lr": 2e-4, "steps": 16,
                "quick_steps": 3},
}


def slot_config(variant: str, quick: bool, steps: int | None, data: int | None) -> dict[str, Any]:
    """The training study's setting (fpgrad.setting: its hyperparameters and base run) with this benchmark's run
    length, data set size and forward solve."""
    from fpgrad.setting import BASE_RUN, autoencoder_settings
    spec = SLOT_VARIANTS[variant]
    cfg = dict(autoencoder_settings(quick))
    cfg.update(estimator="implicit", ablation="base", seed=0, **BASE_RUN)
    cfg.update(variant=variant, label=spec["label"], forward=spec["forward"], train_gradient="implicit")
    if spec["lr"] is not None:
        cfg["lr"] = spec["lr"]
    cfg["train_steps"] = steps or (spec["quick_steps"] if quick else spec["steps"])
    cfg["data"] = data or (8 if quick else 64)
    cfg.update(forward_tol=1e-10, forward_max_iter=300 if not quick else 150)
    cfg["memory"] = cfg["forward_max_iter"]           # every Broyden update kept: SHINE's inverse estimate
    cfg["measure_every"] = 1
    cfg["warm_up"] = True
    return cfg


def slot_setting(cfg: dict, chosen: list[Strategy], seed: int, max_iter: int) -> dict[str, Any]:
    import fpgrad
    from fpgrad.estimators import Implicit
    from fpgrad.setting import build_autoencoder
    from fpgrad.setting import scenes as scene_generator
    torch.manual_seed(seed)                 # nothing below draws from it; set so that nothing can differ
    model = build_autoencoder(cfg, backward=Implicit()).double()
    scenes = scene_generator(cfg).sample(cfg["data"], torch.Generator().manual_seed(seed + 11))
    images_all = scenes.images.double()
    gen = torch.Generator().manual_seed(seed + 12)
    K, D = cfg["num_slots"], cfg["slot_dim"]
    noise = torch.randn(cfg["data"], K, D, generator=gen, dtype=C.DTYPE)      # slot init per scene, fixed
    schedule = epochs(cfg["data"], cfg["batch"], cfg["train_steps"], gen)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sa = model.slot_attention
    if cfg["forward"] == "iterate":          # the study's forward: T plain iterations, the adjoint at z_T
        forward = fpgrad.forward.Iterate.exactly(cfg["iters"])
    else:
        forward = fpgrad.forward.Broyden(tol=cfg["forward_tol"], max_iter=cfg["forward_max_iter"],
                                         memory=cfg["memory"])
    states = {s.name: new_state(s) for s in chosen}
    small = fpgrad.forward.Broyden(tol=cfg["forward_tol"], max_iter=cfg["forward_max_iter"], memory=50)
    revisits = Revisits()
    log = []
    for step, ids in enumerate(schedule):
        ts = C.clock()
        images = images_all[ids]
        tokens = model.encoder(images)
        m = sa.as_map()
        x = tokens.detach()
        z0 = m.params["slots_mu"] + m.params["slots_log_sigma"].exp() * noise[ids]
        with C.quiet():
            fp = forward.solve(m.step, m.params, x, z0)
        forward_seconds = C.clock() - ts
        z = fp.z.clone().requires_grad_(True)
        reconstruction, _, _ = model.decode(z)
        loss = torch.nn.functional.mse_loss(reconstruction, images)
        (g,) = torch.autograd.grad(loss, z, retain_graph=True)
        B = z.shape[0]
        g = g.reshape(B, -1)
        Jd = Jacobian(m.step, m.params, x, fp.z).dense()
        A = torch.eye(Jd.shape[-1], dtype=C.DTYPE) - Jd.transpose(1, 2)
        u_ref = torch.linalg.solve(A, g.unsqueeze(2)).squeeze(2)
        sigma_min = torch.linalg.svdvals(A)[:, -1]
        system = System(m.step, m.params, x, fp, g, ids, u_ref, tolerance(sigma_min, u_ref, g))
        measured = step % cfg["measure_every"] == 0 or step == len(schedule) - 1
        entry = step_entry(step, ids, measured, float(loss.detach()), system, sigma_min, forward_seconds,
                           revisits.residuals(ids, A, g, u_ref))
        entry["rho"] = torch.linalg.eigvals(Jd).abs().amax(dim=-1).tolist()
        if step in (0, len(schedule) - 1) and cfg["forward"] == "broyden" and cfg["memory"] > small.memory:
            entry["memory_check"] = memory_check(system, small, z0, max_iter)
        entry["strategies"] = measure(system, chosen, states, measured, step, max_iter,
                                      warm_up=step == 0 and cfg.get("warm_up", False))
        log.append(entry)
        _progress(cfg["label"], step, entry)
        # the training step: the exact gradient (dense adjoint) through the encoder, slot attention and decoder
        with torch.enable_grad():
            fz = m.step(sa.functional_params(), fp.z, tokens)
        optimiser.zero_grad(set_to_none=True)
        u_train = u_ref if cfg["train_gradient"] == "implicit" else g          # one-step: u = g
        (loss + (fz.reshape(B, -1) * u_train).sum()).backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimiser.step()
        entry["parameter_change"] = relative_change(before, [p.detach() for p in model.parameters()])
    keys = ("size", "num_slots", "slot_dim", "channels", "batch", "lr", "min_objects", "max_objects", "train_steps",
            "data", "forward", "iters", "forward_tol", "forward_max_iter", "memory", "measure_every", "train_gradient")
    return {"setting": cfg["variant"], "label": cfg["label"], "n": K * D, "batch": cfg["batch"],
            "config": {k: cfg[k] for k in keys}, "steps": log}


def _progress(label: str, step: int, entry: dict) -> None:
    parts = [f"{name}: {r['vjps']}{'' if r['verified'] else ' (MISSED ' + C.fmt(r['error']) + ')'}"
             for name, r in entry["strategies"].items()]
    print(f"  {label} step {step}: loss {entry['loss']:.4g}, tol {entry['tol']:.2e}, forward "
          f"{max(entry['forward_steps'])} steps; VJPs " + ", ".join(parts), file=sys.stderr, flush=True)


# ---- summary, targets, figure ------------------------------------------------------------------------------------

def _median(values) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return statistics.median(v) if v else None


def summarise(setting: dict, chosen: list[Strategy]) -> list[dict]:
    """Per strategy: mean VJPs / seconds over the steps where every strategy was measured (the ratios' common
    support), the stateful ones also over every step; accuracy over every step it ran. An initial guess
    counts as used when its relative residual is below 1 (a rejected or absent guess starts at 1)."""
    steps = setting["steps"]
    common = [e for e in steps if e["measured"]]
    cold = [e["strategies"]["cold gmres"] for e in common if "cold gmres" in e["strategies"]]
    cold_vjps = statistics.mean(r["vjps"] for r in cold) if cold else math.nan
    cold_seconds = statistics.mean(r["seconds"] for r in cold) if cold else math.nan
    # where cold GMRES stopped short (capped or stagnated), its VJPs are a lower bound: the ratio on the others
    fair = [e for e in common if e["strategies"].get("cold gmres", {}).get("verified")]
    fair_cold = statistics.mean(e["strategies"]["cold gmres"]["vjps"] for e in fair) if fair else math.nan
    rows = []
    for s in chosen:
        ran = [e["strategies"][s.name] for e in steps if s.name in e["strategies"]]
        if not ran:
            continue
        here = [e["strategies"][s.name] for e in common if s.name in e["strategies"]]
        vjps = statistics.mean(r["vjps"] for r in here)
        seconds = statistics.mean(r["seconds"] for r in here)
        missed = [e["step"] for e in steps if s.name in e["strategies"] and not e["strategies"][s.name]["verified"]]
        r0 = [v for r in ran for v in r.get("initial_residual", [])]
        used = [v for v in r0 if v < 1.0]
        recycle = [r["recycle_matvecs"] for r in ran if r.get("recycle_matvecs") is not None]
        rows.append({
            "strategy": s.name, "reuse": s.reuse, "stateful": s.stateful, "note": s.note,
            "measured_steps": len(here), "steps_run": len(ran),
            "mean_vjps": vjps, "mean_low_precision_vjps": statistics.mean(r["low_precision_vjps"] for r in here),
            "mean_vjps_all_steps": statistics.mean(r["vjps"] for r in ran),
            "mean_seconds": seconds, "vjp_ratio": vjps / cold_vjps, "time_ratio": seconds / cold_seconds,
            "cold_verified_steps": len(fair),
            "vjp_ratio_where_cold_verified": statistics.mean(
                e["strategies"][s.name]["vjps"] for e in fair if s.name in e["strategies"]) / fair_cold
            if fair and all(s.name in e["strategies"] for e in fair) else None,
            "max_error": max(r["error"] for r in ran), "steps_missed": missed, "verified": not missed,
            "guess_used": len(used) / len(r0) if r0 and s.uses_guess else None,
            "median_initial_residual_used": _median(used),
            "rejected_guesses": sum(r.get("rejected_guess", 0) for r in ran),
            "mean_recycle_matvecs": statistics.mean(recycle) if recycle else None,
            "failures": sum("failure" in r for r in ran)})
    return rows


def context(setting: dict) -> dict[str, Any]:
    """The run around the adjoint systems, from its per-step records: losses, rho(J), tolerances, forward
    solves, how far the parameters and the adjoints moved, and the SHINE memory check."""
    steps = setting["steps"]
    rhos = [(e["step"], e["rho"]) for e in steps if e.get("rho")]
    revisit = [v for e in steps for v in e["revisit_residual"] if v is not None]
    out: dict[str, Any] = {
        "steps": len(steps), "measured_steps": sum(e["measured"] for e in steps),
        "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
        "rho_first": rhos[0][1] if rhos else None, "rho_last": rhos[-1][1] if rhos else None,
        "rho_max": max(max(r) for _, r in rhos) if rhos else None,
        "steps_rho_above_1": [st for st, r in rhos if max(r) >= 1.0] if setting["setting"] != "tanh" else None,
        "tol_median": _median(e["tol"] for e in steps), "tol_min": min(e["tol"] for e in steps),
        "forward_steps_median": _median(max(e["forward_steps"]) for e in steps),
        "forward_unconverged_steps": [e["step"] for e in steps if not e["forward_converged"]],
        "forward_relative_residual_max": max(e["forward_relative_residual"] for e in steps),
        "parameter_change_median": _median(e.get("parameter_change") for e in steps),
        "revisits": len(revisit), "revisit_residual_median": _median(revisit),
        "sigma_min_min": min(min(e["sigma_min"]) for e in steps)}
    checks = [(e["step"], e["memory_check"]) for e in steps if "memory_check" in e]
    out["memory_check"] = [
        {"step": st, "forward memory": c["memory"], "forward steps": c["forward_steps"],
         "inverse rank": c["inverse_rank"], "cold gmres": c["cold gmres"]["vjps"],
         "shine precondition": c["shine precondition"]["vjps"],
         "run's forward memory": setting["config"]["memory"],
         "run's shine precondition": next(e for e in steps if e["step"] == st)["strategies"].get(
             "shine precondition", {}).get("vjps")} for st, c in checks]
    return out


def best_reuse(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["reuse"] and r["verified"]]
    return min(ok, key=lambda r: r["mean_vjps"]) if ok else None


def bound_text(rows: list[dict], setting: dict) -> str:
    """What limits the VJP savings, from the stored numbers: how far the adjoints move between visits (the best
    start a warm start can have), SHINE's inverse estimate, recycling's C = A U products."""
    by = {r["strategy"]: r for r in rows}
    ctx = setting["context"]
    tol = ctx["tol_median"]
    parts = []
    r0 = ctx["revisit_residual_median"]
    if r0 is not None and "warm start" in by:
        saving = max(0.0, math.log(min(r0, 1.0)) / math.log(tol)) if tol < 1 else 0.0
        change = C.fmt(ctx["parameter_change_median"])
        parts.append(f"warm start: between two visits of a sample the parameters move (median {change} "
                     f"relative per step) and its old adjoint has a median relative residual {C.fmt(r0)} in the new "
                     f"system, so at an unchanged convergence rate it saves at most log(r0)/log(tol) = {saving:.0%} of "
                     f"the iterations to tol {C.fmt(tol)}; the residual left by a good guess is mostly the slow "
                     "components, and a batch runs until its slowest sample converges, so a sample whose guess was "
                     "missing or rejected costs the cold count (guess used for "
                     f"{by['warm start']['guess_used'] or 0:.0%} of the sample solves; measured ratio "
                     f"{by['warm start']['vjp_ratio']:.2f})")
    sp = by.get("shine precondition")
    if sp:
        parts.append(f"SHINE preconditioner (inverse estimate of rank ~{C.fmt(ctx['forward_steps_median'])}, every "
                     f"Broyden update kept): ratio {sp['vjp_ratio']:.2f}")
    rc = by.get("recycle")
    if rc:
        parts.append(f"recycling: ratio {rc['vjp_ratio']:.2f}, of which {C.fmt(rc['mean_recycle_matvecs'])} VJPs per "
                     "solve recompute C = (I - J^T) U for the new system")
    else:
        parts.append("recycling not measured (no 'gcrodr' solver in fpgrad.linsolve)")
    longer = by.get("gmres restart 200")
    if longer:
        parts.append(f"for scale: GMRES with restart 200 and no reuse has ratio {longer['vjp_ratio']:.2f}")
    return "; ".join(parts)


def targets_for(setting: dict, rows: list[dict]) -> dict:
    best = best_reuse(rows)
    label = f"{setting['label']} (n={setting['n']}, batch {setting['batch']}, {len(setting['steps'])} steps)"
    name = f"adjoint VJPs at 1e-6, best reuse strategy / cold GMRES, {label}"
    unverified = [f"{r['strategy']} ({len(r['steps_missed'])} steps)" for r in rows if not r["verified"]]
    tail = f"; missed 1e-6 on some step: {', '.join(unverified)}" if unverified else "; every strategy verified"
    if best is None:
        return C.target(name, False, None, f"<= {TARGET_RATIO}", "no reuse strategy verified" + tail,
                        bound_text(rows, setting))
    ratio = best["vjp_ratio"]
    met = ratio <= TARGET_RATIO
    detail = (f"{best['strategy']}: {C.fmt(best['mean_vjps'])} vs {C.fmt(best['mean_vjps'] / ratio)} VJPs per "
              f"backward (time ratio {best['time_ratio']:.2f}, max error {C.fmt(best['max_error'])})")
    by = {r["strategy"]: r for r in rows}
    cold = by.get("cold gmres")
    if cold and cold["cold_verified_steps"] < cold["measured_steps"]:
        detail += (f"; cold GMRES(30) stopped short of the tolerance on {len(cold['steps_missed'])} steps (its VJPs "
                   f"there are a lower bound); on the {cold['cold_verified_steps']} steps where it converged the "
                   f"ratio is {C.fmt(best['vjp_ratio_where_cold_verified'])}")
    longer = by.get("gmres restart 200")
    if longer:
        detail += (f"; GMRES(restart 200) without reuse: ratio {C.fmt(longer['vjp_ratio'])}"
                   + (" (fewer VJPs than the best reuse strategy)" if longer["mean_vjps"] < best["mean_vjps"] else ""))
    return C.target(name, met, round(ratio, 3), f"<= {TARGET_RATIO}", detail + tail,
                    "" if met else bound_text(rows, setting))


# colour by what is reused, line style by the combination (baselines dashed / dotted in greys)
STYLE = {
    "cold gmres": ("black", "--", "o"), "torchdeq broyden": ("0.55", "--", "s"),
    "gmres restart 200": ("0.35", ":", "D"),
    "shine precondition": ("tab:blue", "-", "^"), "shine guess": ("tab:cyan", ":", "v"),
    "warm start": ("tab:green", "-", "o"), "warm start + shine precondition": ("tab:olive", "-.", "^"),
    "warm start (previous batch)": ("tab:green", ":", "x"), "mixed precision": ("tab:orange", "-", "P"),
    "warm start + mixed precision": ("tab:orange", "-.", "o"), "recycle": ("tab:red", "-", "*"),
    "recycle + shine precondition": ("tab:purple", "-.", "^"), "recycle + warm start": ("tab:brown", "-.", "o"),
}


def figure(settings_out: list[dict], path) -> str:
    """VJPs (top) and seconds (bottom) per backward at every training step, one column per setting."""
    from matplotlib.ticker import MaxNLocator

    from fpgrad.report import figure_style, new_figure, save_figure
    handles: dict[str, Any] = {}
    with figure_style():
        fig, axes = new_figure(3.9 * len(settings_out), 7.2, nrows=2, ncols=len(settings_out))
        for col, s in enumerate(settings_out):
            for r in s["summary"]:
                name = r["strategy"]
                pts = [(e["step"], e["strategies"][name]) for e in s["steps"] if name in e["strategies"]]
                colour, ls, marker = STYLE.get(name, ("tab:pink", "-", "o"))
                style = dict(color=colour, ls=ls, lw=1.3, marker=marker, ms=3.5 if len(pts) < 25 else 2,
                             markevery=1 if len(pts) < 25 else max(1, len(pts) // 12))
                xs = [p[0] for p in pts]
                (line,) = axes[0, col].plot(xs, [p[1]["vjps"] for p in pts], label=name, **style)
                axes[1, col].plot(xs, [p[1]["seconds"] for p in pts], **style)
                handles.setdefault(name, line)
                bad = [(p[0], p[1]["vjps"]) for p in pts if not p[1]["verified"]]
                if bad:
                    axes[0, col].scatter(*zip(*bad), marker="x", color="red", zorder=5, s=40, lw=1.5)
            axes[0, col].set_title(f"{s['label']}\nn={s['n']}, batch {s['batch']}", fontsize=9)
            axes[0, col].set_yscale("log")
            axes[1, col].set_yscale("log")
            axes[1, col].set_xlabel("training step")
            for ax in axes[:, col]:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, 0].set_ylabel("VJPs per backward (log)")
        axes[1, 0].set_ylabel("seconds per backward (log)")
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(5, len(handles)),
                   fontsize=7.5)
        fig.suptitle(f"Adjoint solves to {ACCURACY:g} relative error at every step of a training run "
                     "(stateless strategies on the steps where all were measured; red x: accuracy missed)",
                     fontsize=10)
        save_figure(fig, path)
    return str(path)


COLUMNS = ["strategy", "VJPs", "of them float32", "VJP ratio", "s / backward", "time ratio", "max error",
           "verified", "guess used", "r0 of used guesses", "C = AU VJPs", "steps run"]


def table_rows(setting: dict) -> list[dict]:
    """The strategy table of one setting, formatted (printed here, and in the README by benchmarks.targets)."""
    out = []
    for r in setting["summary"]:
        missed = r["steps_missed"]
        out.append({"strategy": r["strategy"], "VJPs": C.fmt(r["mean_vjps"]),
                    "of them float32": C.fmt(r["mean_low_precision_vjps"]) if r["mean_low_precision_vjps"] else "-",
                    "VJP ratio": C.fmt(r["vjp_ratio"]), "s / backward": C.fmt(r["mean_seconds"]),
                    "time ratio": C.fmt(r["time_ratio"]), "max error": C.fmt(r["max_error"]),
                    "verified": "yes" if not missed else f"**no**: {len(missed)} steps ({missed[:4]}...)",
                    "guess used": "-" if r["guess_used"] is None else f"{r['guess_used']:.0%}",
                    "r0 of used guesses": C.fmt(r["median_initial_residual_used"]),
                    "C = AU VJPs": C.fmt(r["mean_recycle_matvecs"]), "steps run": r["steps_run"]})
    return out


def context_line(setting: dict) -> str:
    c = setting["context"]
    rho = (f"rho(J) at the first step {C.fmt(min(c['rho_first']))}-{C.fmt(max(c['rho_first']))}, at the last "
           f"{C.fmt(min(c['rho_last']))}-{C.fmt(max(c['rho_last']))} (max {C.fmt(c['rho_max'])})"
           if c["rho_first"] else "rho(J) not measured")
    above = c.get("steps_rho_above_1")
    text = (f"{c['steps']} training steps ({c['measured_steps']} with every strategy measured); loss "
            f"{C.fmt(c['loss_first'])} -> {C.fmt(c['loss_last'])}; {rho}"
            + (f"; rho(J) >= 1 at {len(above)} of {c['steps']} steps" if above else "")
            + f"; adjoint tol median {C.fmt(c['tol_median'])} (min {C.fmt(c['tol_min'])}), sigma_min(I - J) down to "
            f"{C.fmt(c['sigma_min_min'])}; forward median {C.fmt(c['forward_steps_median'])} steps"
            + (f", unconverged at {len(c['forward_unconverged_steps'])} steps (relative residual up to "
               f"{C.fmt(c['forward_relative_residual_max'])})" if c["forward_unconverged_steps"] else "")
            + f"; parameters move {C.fmt(c['parameter_change_median'])} (relative, median) per step; "
            f"{c['revisits']} revisits of a sample, where its previous adjoint has a median relative residual "
            f"{C.fmt(c['revisit_residual_median'])} in the new system.")
    return text


def print_setting(s: dict) -> None:
    print(f"\n{context_line(s)}")
    C.table(table_rows(s), COLUMNS, f"{s['label']}: n={s['n']}, batch {s['batch']}")
    if s["context"]["memory_check"]:
        C.table(s["context"]["memory_check"], list(s["context"]["memory_check"][0]),
                "SHINE with the forward Broyden's default memory 50 vs every update kept")


def markdown(data: dict) -> list[str]:
    """The README section of this benchmark (called by benchmarks.targets; nothing is recomputed)."""
    from fpgrad.report import markdown_table
    res = data["results"]
    out = [f"Accuracy {res['accuracy']:g} (relative error of the adjoint vs dense LU, every sample of every measured "
           f"step); TorchDEQ solver: {res['torchdeq_solver']}; recycling (GCRO-DR) "
           f"{'measured' if res['recycling'] else 'not available in this run'}. VJP ratio and time ratio are to "
           "cold GMRES(30) over the steps where every strategy was measured; a strategy that missed the accuracy "
           "on any step is marked **no**.", ""]
    if res.get("figure"):
        out += [f"![VJPs and seconds per backward over the training runs]({res['figure']})", ""]
    for s in res["settings"]:
        out += [f"#### {s['label']}: n = {s['n']}, batch {s['batch']}", "", context_line(s), "",
                markdown_table(table_rows(s), COLUMNS), ""]
        if s["context"]["memory_check"]:
            out += ["SHINE when the forward Broyden keeps only its default 50 updates (same step, same g):", "",
                    markdown_table(s["context"]["memory_check"], list(s["context"]["memory_check"][0])), ""]
    return out


# ---- main ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = C.parser("reuse", __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="tanh map size (default 2000; 200 with --quick)")
    p.add_argument("--rho", type=float, nargs="*", default=None, help="tanh rho(J) (default 0.9 0.96 0.99)")
    p.add_argument("--tanh-steps", type=int, default=None, help="training steps per tanh map (default 12)")
    p.add_argument("--tanh-every", type=int, default=None, help="measure the stateless strategies every K steps")
    p.add_argument("--slot-steps", type=int, default=None, help="slot attention (z_T) training steps (default 48)")
    p.add_argument("--slot-fp-steps", type=int, default=None, help="slot attention (z*) training steps (default 16)")
    p.add_argument("--slot-data", type=int, default=None, help="scenes in the slot attention data set (default 64)")
    p.add_argument("--lr", type=float, default=None, help="tanh SGD learning rate")
    p.add_argument("--skip", nargs="*", default=[], choices=["tanh", *SLOT_VARIANTS])
    args = p.parse_args(argv)
    run = C.Run("reuse", args)
    quick = args.quick
    have_deq = C.have("torchdeq")
    deq = torchdeq_best_solver() if have_deq else None
    recycling = recycling_available()
    if not recycling:
        print("note: fpgrad.linsolve has no 'gcrodr' solver (GCRO-DR recycling): the recycling strategies are "
              "skipped in this run", flush=True)
    if not have_deq:
        print("note: torchdeq is not installed: its backward solver is skipped", flush=True)
    every = [s for s in strategies(deq) if recycling or not s.needs_recycling]
    tanh_cfg = {"n": args.n or (200 if quick else 2000), "batch": 2 if quick else 4, "data": 4 if quick else 8,
                "steps": args.tanh_steps or (4 if quick else 12), "measure_every": args.tanh_every or (2 if quick
                                                                                                    else 3),
                "input_noise": 0.1, "teacher_noise": 0.2, "trained": ["U", "b"],
                "lr": args.lr if args.lr is not None else 3e-6,
                "forward_tol": 1e-10, "forward_max_iter": 1000, "memory": 1000, "max_iter": 3000}
    rhos = args.rho or ([0.9] if quick else [0.9, 0.96, 0.99])
    results: dict[str, Any] = {"accuracy": ACCURACY, "target_ratio": TARGET_RATIO, "recycling": recycling,
                               "torchdeq_solver": deq, "strategies": [
                                   {"name": s.name, "options": {k: str(v) for k, v in s.options.items()},
                                    "state": list(s.state), "reuse": s.reuse, "peer": s.peer, "note": s.note,
                                    "settings": list(s.settings)} for s in every],
                               "settings": []}
    out: list[dict] = []
    if "tanh" not in args.skip:
        for rho in rhos:
            chosen = [s for s in every if "tanh" in s.settings]
            t0 = C.clock()
            setting = tanh_setting(rho, {**tanh_cfg, "warm_up": rho == rhos[0]}, chosen, args.seed)
            setting["seconds"] = C.clock() - t0
            setting["summary"] = summarise(setting, chosen)
            setting["context"] = context(setting)
            out.append(setting)
            print_setting(setting)
    for variant in SLOT_VARIANTS:
        if variant in args.skip:
            continue
        cfg = slot_config(variant, quick, args.slot_steps if variant == "slot" else args.slot_fp_steps,
                          args.slot_data)
        chosen = [s for s in every if "slot" in s.settings and (cfg["forward"] == "broyden"
                                                                 or not s.uses_forward_inverse)]
        t0 = C.clock()
        setting = slot_setting(cfg, chosen, args.seed, max_iter=3000)
        setting["seconds"] = C.clock() - t0
        setting["summary"] = summarise(setting, chosen)
        setting["context"] = context(setting)
        out.append(setting)
        print_setting(setting)
    targets = [targets_for(s, s["summary"]) for s in out]
    results["settings"] = out
    from pathlib import Path
    json_path = Path(args.out) if args.out else C.REPORTS / "reuse.json"
    if out:
        results["figure"] = Path(figure(out, json_path.with_name(FIGURE))).name
    C.table(targets, ["target", "met", "value", "threshold", "detail"], "Targets")
    run.save(results, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
