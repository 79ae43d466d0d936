"""Study `discovery`: a setting in which the unrolled slot attention autoencoder discovers objects on one CPU thread.

    python -m studies.discovery --config NAME --steps S --out reports/discovery/NAME    # train / resume one run
    python -m studies.discovery --quick --out /tmp/q                                    # tiny, a few steps
    python -m studies.discovery --readme reports/discovery        # table.md, curves.png, README table from rows

One run = one named configuration (CONFIGS) trained with the unrolled estimator on fresh MultiShapes scenes
every step. Every `eval_every` steps (and at step 0) it appends one row to `rows.jsonl`: FG-ARI and MSE on
fixed test scenes, the mean training loss since the previous row, the learning rate, the wall and CPU time of
the training steps (CPU time is the budget on a shared machine: one thread); then it
writes `ckpt.pt` atomically (model, Adam, both generators, step). Rerunning the same command resumes from the
checkpoint and gives the same rows as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fpgrad.data import MultiShapes
from fpgrad.metrics import foreground_ari
from fpgrad.models import SlotAutoencoder

TEST_SEED = 2 ** 31 - 1          # the same test scenes (and slot noise) for every configuration

# The study's autoencoder as it is (random dark background per scene, 8x8 broadcast decoder).
DEFAULTS: dict[str, Any] = dict(
    size=32, min_objects=2, max_objects=3, scale=(0.12, 0.24), background=None,
    num_slots=4, slot_dim=64, channels=32, broadcast=8, decoder_channels=None, decoder_layers=0, decoder_kernel=3,
    decoder_first_kernel=3,
    iters=3, batch=16, lr=4e-4, warmup=500, decay_half_life=None, clip=None, seed=0,
    test_scenes=128, eval_every=500,
    # the arms (issue #20, section 2): the slot attention gradient, its forward, the spectral penalty, instruments
    estimator="unrolled", tol=None, forward="iterate", penalty=0.0, penalty_target=0.9, instruments=False,
    backward_tol=None, backward_max_iter=None, penalty_iters=2, penalty_smooth=0.0, slot_embedding=False,
    penalty_krylov=0,
)

# The arms: what differs from the discovery configuration (each run with `instruments`). The exact implicit and
# Neumann arms solve the slots to a relative residual of 1e-4 (float32) with Anderson, at most 30 steps, and
# differentiate at that z* (Implicit: by unrestarted GMRES to 1e-4, at most 100 VJPs a step, the steps that stop
# short of it counted in the rows; Neumann-5: five terms of the series, which assume a
# fixed point too); with the penalty, loss += penalty * mean_b hinge(rho_b(J) - target), the README's recipe
# (fpgrad.contraction.spectral_penalty: weight 0.05, target 0.7, a Huber hinge of width 0.1, four warm-started power
# steps a training step; a plain hinge at weight 0.1, target 0.9, two power steps let rho(J) pass 1 within 500
# steps and the run collapse: reports/discovery/arms/variants/).
ARMS: dict[str, dict[str, Any]] = {
    "unrolled": dict(estimator="unrolled"),
    "one-step": dict(estimator="one_step"),
    "implicit": dict(estimator="implicit", tol=1e-4, forward="anderson", iters=30, backward_tol=1e-4,
                     backward_max_iter=100),
    "implicit-penalty": dict(estimator="implicit", tol=1e-4, forward="anderson", iters=30, backward_tol=1e-4,
                             backward_max_iter=100, penalty=0.05, penalty_target=0.7, penalty_iters=4,
                             penalty_smooth=0.1),
    "neumann-5": dict(estimator="neumann-5", tol=1e-4, forward="anderson", iters=30),
}
# Ablations of an arm (the paper's: clipping, warm-up, the training iteration count).
ABLATIONS: dict[str, dict[str, Any]] = {
    "clip": dict(clip=0.05), "no-warmup": dict(warmup=0), "iters7": dict(iters=7),
    # not the paper's: a learned vector per slot added before its query, so that a unique (contractive) fixed point
    # need not have every slot the same (see "every slot the same at z*" in reports/discovery/arms/README.md)
    "slot-embedding": dict(slot_embedding=True),
}
TEST_TIME_ITERS = (1, 2, 3, 5, 7, 10, 15, 20)   # the last row of an arm: FG-ARI and MSE at these test-time iterations
MONITOR_SCENES = 16                             # the first test scenes: the instruments' fixed batch
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN_HISTORY = 5.0, 100, 20   # as the training study: > 5x the running median

# name -> what differs from DEFAULTS. `note` is for the README table only.
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": dict(note="the training study's autoencoder (the previous try)"),
    "plain-fullres": dict(note="plain black background; full-resolution broadcast decoder (16 ch, 3 extra 3x3)",
                          background=(0.0, 0.0, 0.0), broadcast=32, decoder_channels=16, decoder_layers=3,
                          lr=4e-4, warmup=500, decay_half_life=10_000),
    "plain-b8": dict(note="plain black background; the 8x8 broadcast decoder", background=(0.0, 0.0, 0.0),
                     lr=4e-4, warmup=500, decay_half_life=10_000),
    "plain-fullres-k6": dict(note="plain-fullres with 6 slots for at most 3 objects + background",
                             background=(0.0, 0.0, 0.0), broadcast=32, decoder_channels=16, decoder_layers=3,
                             lr=4e-4, warmup=500, decay_half_life=10_000, num_slots=6),
    "random-fullres": dict(note="random dark background; full-resolution decoder", broadcast=32, decoder_channels=16,
                           decoder_layers=3, lr=4e-4, warmup=500, decay_half_life=10_000),
}

QUICK: dict[str, Any] = dict(size=16, min_objects=1, max_objects=2, num_slots=3, slot_dim=16, channels=8, broadcast=16,
                             decoder_channels=8, decoder_layers=1, batch=4, lr=1e-3, warmup=2, decay_half_life=4,
                             background=(0.0, 0.0, 0.0), test_scenes=8, eval_every=2)


PENALTY_KEYS = ("penalty", "penalty_target", "penalty_iters", "penalty_smooth", "penalty_krylov")


def penalty_label(config: dict) -> str:
    """'w0.05-t0.7-p4-h0.1[-k16]': weight, target, power steps, Huber width (h0: the plain hinge) and, when
    set, the Arnoldi steps of a Krylov start (spectral_penalty(..., krylov=K))."""
    krylov = int(config.get("penalty_krylov") or 0)
    return (f"w{config['penalty']:g}-t{config['penalty_target']:g}-p{int(config['penalty_iters'])}"
            f"-h{config['penalty_smooth']:g}" + (f"-k{krylov}" if krylov else ""))


def config_of(name: str, quick: bool = False, seed: int | None = None, arm: str | None = None,
              ablation: str | None = None, penalty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full settings of a named configuration (DEFAULTS updated by CONFIGS[name], or by QUICK).

    arm: one of ARMS (the estimator and its forward, the penalty; instruments on), named NAME-ARM;
    ablation: one of ABLATIONS on top, named NAME-ARM-ABLATION;
    seed: overrides the configuration's seed (parameters, training scenes, slot noise; the test scenes stay
    the same); a run with seed s != 0 is named ...-sS.
    penalty: with an arm, overrides of its spectral penalty (keys PENALTY_KEYS); a run whose penalty differs
    from its arm's is named ...-W-T-P-H (penalty_label).
    """
    penalty = {k: v for k, v in (penalty or {}).items() if v is not None}
    if set(penalty) - set(PENALTY_KEYS):
        raise ValueError(f"discovery: unknown penalty settings {sorted(set(penalty) - set(PENALTY_KEYS))}; "
                         f"choose from {PENALTY_KEYS}")
    if penalty and arm is None:
        raise ValueError("discovery: penalty settings apply to an arm; give --arm too")
    if arm is not None or ablation is not None or seed is not None:
        config = config_of(name, quick)
        if ablation is not None and arm is None:
            raise ValueError("discovery: an ablation applies to an arm; give --arm too")
        if arm is not None:
            if arm not in ARMS:
                raise ValueError(f"discovery: unknown arm {arm!r}; choose one of {sorted(ARMS)}")
            config.update(ARMS[arm], instruments=True, arm=arm)
            config["name"] += f"-{arm}"
            if penalty:
                config.update(penalty)
                if not config["penalty"] or config["penalty"] < 0:
                    raise ValueError("discovery: --penalty must be a positive weight")
                if any(config[k] != ARMS[arm].get(k, DEFAULTS[k]) for k in PENALTY_KEYS):
                    config["name"] += f"-{penalty_label(config)}"
        if ablation is not None:
            if ablation not in ABLATIONS:
                raise ValueError(f"discovery: unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
            config.update(ABLATIONS[ablation], ablation=ablation)
            config["name"] += f"-{ablation}"
        if seed is not None:
            config["seed"] = int(seed)
            config["name"] += f"-s{int(seed)}" if int(seed) else ""
        return config
    if quick:
        return {**DEFAULTS, **QUICK, "name": "quick"}
    if name not in CONFIGS:
        raise ValueError(f"discovery: unknown configuration {name!r}; choose one of {sorted(CONFIGS)}")
    settings = {k: v for k, v in CONFIGS[name].items() if k != "note"}
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"discovery: configuration {name!r} sets unknown settings {sorted(unknown)}")
    return {**DEFAULTS, **settings, "name": name}


def dataset(config: dict) -> MultiShapes:
    bg = config["background"]
    return MultiShapes(size=config["size"], min_objects=config["min_objects"], max_objects=config["max_objects"],
                       scale=tuple(config["scale"]), background=None if bg is None else tuple(bg))


def arm_estimator(config: dict):
    """The slot attention backward of a configuration: its estimator's name, or for the implicit arms an
    Implicit(GMRES) with the configured tolerance and cap (GMRES unrestarted within the cap)."""
    if config["estimator"] == "implicit" and config["backward_max_iter"] is not None:
        from fpgrad.estimators import Implicit
        from fpgrad.linsolve import GMRES
        cap = int(config["backward_max_iter"])
        return Implicit(solver=GMRES(restart=cap), tol=config["backward_tol"], max_iter=cap)
    return config["estimator"]


def build_model(config: dict) -> SlotAutoencoder:
    return SlotAutoencoder(resolution=config["size"], num_slots=config["num_slots"], slot_dim=config["slot_dim"],
                           channels=config["channels"], iters=config["iters"], backward=arm_estimator(config),
                           tol=config["tol"], forward=config["forward"],
                           broadcast=config["broadcast"], decoder_channels=config["decoder_channels"],
                           decoder_layers=config["decoder_layers"], decoder_kernel=config["decoder_kernel"],
                           decoder_first_kernel=config["decoder_first_kernel"], seed=config["seed"],
                           slot_embedding=config["slot_embedding"])


def learning_rate(config: dict, step: int) -> float:
    """lr * min(1, (step + 1) / warmup) * 0.5 ** (step / decay_half_life) (Locatello et al.'s schedule)."""
    lr = config["lr"]
    if config["warmup"]:
        lr *= min(1.0, (step + 1) / config["warmup"])
    if config["decay_half_life"]:
        lr *= 0.5 ** (step / config["decay_half_life"])
    return lr


def evaluate(model: SlotAutoencoder, scenes, batch: int = 64, iters: int | None = None) -> dict[str, float]:
    """FG-ARI (argmax of the alpha masks vs the true objects) and MSE on the test scenes, at `iters` plain
    iterations (default: the trained iteration count, the cap for a solved forward), with fixed slot noise."""
    model.eval()
    noise = torch.Generator().manual_seed(TEST_SEED)
    device = next(model.parameters()).device
    aris, errs = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            images = scenes.images[i:i + batch].to(device)
            out = model(images, generator=noise, iters=model.iters if iters is None else iters)
            aris.append(foreground_ari(scenes.labels[i:i + batch], out.segmentation().cpu()))
            errs.append(((out.reconstruction - images) ** 2).mean((1, 2, 3)).double().cpu())
    model.train()
    return {"fg_ari": float(torch.cat(aris).nanmean()), "mse": float(torch.cat(errs).mean())}


# ---- instruments (the arms) -----------------------------------------------------------------------------

class GradientSpikes:
    """Gradient norms of the training steps: a spike is a norm above SPIKE_FACTOR x the median of the previous
    SPIKE_WINDOW steps (trusted after SPIKE_MIN_HISTORY); `since()` summarises the steps since the last call."""

    def __init__(self, history: list[float] | None = None):
        self.history = list(history or [])[-SPIKE_WINDOW:]
        self.norms: list[float] = []
        self.spikes, self.worst = 0, 0.0

    def add(self, norm: float) -> None:
        if len(self.history) >= SPIKE_MIN_HISTORY:
            ratio = norm / max(statistics.median(self.history), 1e-30)
            self.worst = max(self.worst, ratio)
            self.spikes += ratio > SPIKE_FACTOR
        self.history = (self.history + [norm])[-SPIKE_WINDOW:]
        self.norms.append(norm)

    def since(self) -> dict[str, Any]:
        finite = [n for n in self.norms if math.isfinite(n)]
        out = {"grad_norm_median": statistics.median(finite) if finite else None,
               "grad_norm_max": max(finite) if finite else None, "spikes": self.spikes,
               "spike_ratio_max": self.worst or None}
        self.norms, self.spikes, self.worst = [], 0, 0.0
        return out


class SolverCosts:
    """The training steps' own solves since the last row: VJPs of the backward per step, and the steps whose
    forward solve or adjoint solve stopped short of its tolerance (at its cap)."""

    def __init__(self):
        self.steps = self.vjps = self.forward_short = self.adjoint_short = 0

    def add(self, record) -> None:
        self.steps += 1
        self.vjps += int(record.vjps)
        self.forward_short += any(not bool(fp.converged.all()) for fp in record.forward
                                  if getattr(fp, "method", "") != "iterate")      # exactly-T loops have no tolerance
        self.adjoint_short += any(not bool(sol.converged.all()) for sol in record.solves)

    def since(self) -> dict[str, Any]:
        out = {"train_vjps_per_step": self.vjps / self.steps if self.steps else None,
               "forward_short_steps": self.forward_short, "adjoint_short_steps": self.adjoint_short,
               "steps_since_row": self.steps}
        self.__init__()
        return out


def _arm_forward(config: dict, estimator):
    """The forward that training runs before the estimator's own steps (None: the estimator runs its own)."""
    from fpgrad.forward import Iterate, get_forward
    if config["tol"] is not None:
        return get_forward(config["forward"], tol=config["tol"], max_iter=config["iters"], warn=False)
    if not estimator.uses_forward:
        return None
    return Iterate.exactly(max(config["iters"] - estimator.taped_steps_after_solve, 0))


def backward_bytes(model: SlotAutoencoder, images: torch.Tensor, generator: torch.Generator) -> int:
    """Bytes of the tensors a training step saves for its backward (an upper bound: shared storage counts again)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")              # a measurement: the training steps warn where it matters
        model(images, generator=generator).loss(images)
    return saved[0]


def instruments(model: SlotAutoencoder, config: dict, images: torch.Tensor, step: int, monitor) -> dict[str, Any]:
    """On the fixed monitor batch: the in-loop monitor's row (the arm's gradient against the exact implicit one at
    a converged z*, rho(J) at the training iterate and at z*, forward and adjoint residuals and VJPs), ||J||_2 at
    the training iterate (the paper's Fig. 1b), and the bytes saved for a training step's backward."""
    from fpgrad.contraction import spectral_estimate
    from fpgrad.estimators import get_estimator
    sa = model.slot_attention
    with torch.no_grad():
        tokens = model.encoder(images)
    m = sa.as_map()
    z0 = m.init_state(tokens, torch.Generator().manual_seed(TEST_SEED))
    estimator = get_estimator(arm_estimator(config), iters=config["iters"])
    forward = _arm_forward(config, estimator)

    def loss_fn(z):
        return ((model.decode(z)[0] - images) ** 2).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # counted in the row (solver_warnings), not printed every row
        row = monitor.step(step, m, tokens, loss_fn, estimator, z0=z0, forward=forward, step_seconds=None)
        from fpgrad.forward import Iterate
        solver = forward if config["tol"] is not None else Iterate.exactly(config["iters"])
        z_train = solver.solve(m.step, m.params, tokens, z0).z
    norm = spectral_estimate(m.step, m.params, z_train, tokens, kind="norm", iters=30,
                             generator=torch.Generator().manual_seed(TEST_SEED))
    keep = ("cosine", "rel_error", "rho_train", "rho_star", "forward_residual", "exact_forward_residual",
            "adjoint_residual", "adjoint_converged", "adjoint_vjps", "train_vjps", "monitor_seconds",
            "solver_warnings")
    out = {k: row[k] for k in keep}
    out["jacobian_norm"] = float(norm.value.max())
    out["jacobian_norm_mean"] = float(norm.value.mean())
    out["backward_bytes"] = backward_bytes(model, images, torch.Generator().manual_seed(TEST_SEED))
    return out


def test_time_curve(model: SlotAutoencoder, scenes) -> dict[str, dict[str, float]]:
    """FG-ARI and MSE on the test scenes at each of TEST_TIME_ITERS plain iterations (the paper's Fig. 6b)."""
    return {str(T): evaluate(model, scenes, iters=T) for T in TEST_TIME_ITERS}


# ---- files --------------------------------------------------------------------------------------------

def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _atomic_write_bytes(path, lambda f: f.write(text))


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _comparable(config: dict) -> dict:
    return json.loads(json.dumps(config))


# ---- one run -------------------------------------------------------------------------------------------

COLLAPSE_ROWS = 10           # logged rows (every 500 steps: 5,000 steps) a collapsed run has stayed flat
COLLAPSE_MSE = 0.005         # relative spread of the test MSE over those rows
COLLAPSE_FG_ARI = 0.05       # and FG-ARI below this in every one of them


def collapsed_since(rows: list[dict]) -> int | None:
    """The step from which a run has stayed collapsed, or None: its last COLLAPSE_ROWS logged rows (or more) all
    have FG-ARI below COLLAPSE_FG_ARI and a test MSE within COLLAPSE_MSE of the last row's: the decoder paints
    one picture (the scenes' mean image) whatever the slots, and no gradient moves it out (seen: one-step without
    warm-up, flat at MSE 0.0681 from step 500 to 6000). Such a run is stopped and counts as finished: its last
    row is its result. (A collapsed network also runs 5-10x slower a step on a CPU, on denormal numbers.)"""
    if len(rows) < COLLAPSE_ROWS or rows[-1].get("mse") is None:
        return None
    last, flat = rows[-1]["mse"], 0
    for row in reversed(rows):
        mse, ari = row.get("mse"), row.get("fg_ari")
        if mse is None or ari is None or ari >= COLLAPSE_FG_ARI or abs(mse - last) > COLLAPSE_MSE * last:
            break
        flat += 1
    return rows[-flat]["step"] if flat >= COLLAPSE_ROWS else None


def train(config: dict, steps: int, out: Path, *, progress: bool = True,
          device: str | torch.device | None = None) -> list[dict]:
    """Train (or resume) `config` in `out` up to `steps` steps; returns every row of the run.

    out/config.json: the settings (a rerun with other settings is refused); out/rows.jsonl: one row every
    `eval_every` steps and at the last step; out/ckpt.pt: the state after the last row (atomic).
    device: where the model trains (default CPU). The scenes, slot noise and power-method vectors are drawn on the
    CPU from the same seeded generators whatever the device, so a run differs between devices only by their
    arithmetic; each row records the device it was trained on (a run may be resumed on another).
    """
    torch.set_num_threads(1)
    device = torch.device("cpu" if device is None else device)
    out.mkdir(parents=True, exist_ok=True)
    config_path, rows_path, ckpt_path = out / "config.json", out / "rows.jsonl", out / "ckpt.pt"
    config = _comparable(config)
    if config_path.exists():
        stored = _comparable({**DEFAULTS, **json.loads(config_path.read_text())})   # settings added since: defaults
        if stored != config:
            raise ValueError(f"discovery: {out} holds a run of other settings ({config_path}); use another --out")
    else:
        text = json.dumps(config, indent=1).encode()
        _atomic_write_bytes(config_path, lambda f: f.write(text))

    seed = int(config["seed"])
    data = dataset(config)
    test = data.sample(config["test_scenes"], torch.Generator().manual_seed(TEST_SEED))
    model = build_model(config).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config["lr"])
    data_gen = torch.Generator().manual_seed(1000 * seed + 1)
    noise_gen = torch.Generator().manual_seed(1000 * seed + 2)
    step, wall, cpu, loss_sum, loss_count = 0, 0.0, 0.0, 0.0, 0
    spikes = GradientSpikes()
    solver_costs = SolverCosts()
    monitor, monitor_images, penalty_state, penalty_sum = None, None, None, 0.0
    if config["instruments"]:
        from fpgrad.contraction import GradientMonitor
        monitor = GradientMonitor(every=1, seed=seed)
        monitor_images = test.images[:MONITOR_SCENES].to(device)
    if config["penalty"]:
        from fpgrad.contraction import SpectralState, spectral_penalty
        from fpgrad.maps import slot_attention_step
        penalty_state = SpectralState(generator=torch.Generator().manual_seed(1000 * seed + 3), cold_iters=20)
        sa = model.slot_attention

        def penalty_step(params, z, x):
            return slot_attention_step(params, z, x, eps=sa.eps)
    rows = read_rows(rows_path)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        data_gen.set_state(state["data_gen"].cpu())
        noise_gen.set_state(state["noise_gen"].cpu())
        step, wall, cpu = state["step"], state["wall_seconds"], state["cpu_seconds"]
        spikes = GradientSpikes(state.get("grad_history"))
        if any(r["step"] > step for r in rows):       # a row written after the last checkpoint: redone below
            rows = [r for r in rows if r["step"] <= step]
            _write_rows(rows_path, rows)
    elif rows:
        rows = []
        _write_rows(rows_path, rows)

    def record(step_now: int) -> None:
        nonlocal loss_sum, loss_count, penalty_sum
        row = {"step": step_now, **evaluate(model, test),
               "train_loss": loss_sum / loss_count if loss_count else None,
               "lr": learning_rate(config, max(step_now - 1, 0)), "wall_seconds": round(wall, 2),
               "cpu_seconds": round(cpu, 2),
               "time": time.time(), "device": device.type}
        if monitor is not None:
            row.update(instruments(model, config, monitor_images, step_now, monitor))
            row.update(spikes.since())
            row.update(solver_costs.since())
            if step_now == steps:
                row["test_time"] = test_time_curve(model, test)
        if penalty_state is not None:
            row["penalty"] = penalty_sum / loss_count if loss_count else None
            row["penalty_rho_last"] = None if penalty_state.last is None else float(penalty_state.last.max())
        rows.append(row)
        _append_row(rows_path, row)
        state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "data_gen": data_gen.get_state(),
                 "noise_gen": noise_gen.get_state(), "step": step_now, "wall_seconds": wall, "cpu_seconds": cpu,
                 "grad_history": spikes.history}
        _atomic_write_bytes(ckpt_path, lambda f: torch.save(state, f))
        loss_sum, loss_count, penalty_sum = 0.0, 0, 0.0

    if not rows:
        record(0)
    since = collapsed_since(rows)
    if since is not None and step < steps:
        print(f"discovery: {config['name']} has been collapsed since step {since} (FG-ARI < {COLLAPSE_FG_ARI}, test "
              f"MSE flat at {rows[-1]['mse']:.4f}); not resumed: it counts as finished at step {step}",
              file=sys.stderr)
        return rows
    bar = None
    if progress and step < steps:
        try:
            from tqdm import tqdm
        except ImportError:          # (a bare GPU machine's python: the rows still say how far a run got)
            tqdm = None
        bar = None if tqdm is None else tqdm(total=steps, initial=step, desc=config["name"], mininterval=10)
    while step < steps:
        t0, c0 = time.perf_counter(), time.process_time()
        images = data.sample(config["batch"], data_gen).images.to(device)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config, step)
        out_ = model(images, generator=noise_gen)
        loss = out_.loss(images)
        total = loss
        if penalty_state is not None:
            # on the slots the backward linearises at (z* for the implicit arms), through the tokens too
            penalty = spectral_penalty(penalty_step, sa.functional_params(), out_.slots, out_.tokens,
                                       target=config["penalty_target"], state=penalty_state,
                                       iters=config["penalty_iters"], smooth=config["penalty_smooth"],
                                       krylov=int(config.get("penalty_krylov") or 0))
            penalty_sum += float(penalty.detach())
            total = loss + config["penalty"] * penalty
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        if monitor is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            spikes.add(float(torch.nn.utils.get_total_norm(grads)))
            solver_costs.add(out_.record)
        if config["clip"] is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
        optimiser.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"discovery: loss is {value} at step {step} of {config['name']}; lower lr or clip")
        loss_sum, loss_count = loss_sum + value, loss_count + 1
        step += 1
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if step % config["eval_every"] == 0 or step == steps:
            record(step)
            if bar is not None:
                bar.set_postfix(fg_ari=f"{rows[-1]['fg_ari']:.3f}", mse=f"{rows[-1]['mse']:.4f}")
            since = collapsed_since(rows)
            if since is not None and step < steps:
                print(f"\ndiscovery: {config['name']} collapsed at step {since} (FG-ARI < {COLLAPSE_FG_ARI}, test MSE "
                      f"flat at {rows[-1]['mse']:.4f} over {COLLAPSE_ROWS}+ rows); stopped at step {step}, counted "
                      "as finished", file=sys.stderr)
                break
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


# ---- README ----------------------------------------------------------------------------------------------

def runs_under(root: Path) -> list[tuple[dict, list[dict]]]:
    """(config, rows) of every run directory under root, ordered by start time."""
    found = []
    for config_path in sorted(root.glob("*/config.json")):
        rows = read_rows(config_path.parent / "rows.jsonl")
        if rows:
            found.append(({**DEFAULTS, **json.loads(config_path.read_text())}, rows))
    return sorted(found, key=lambda cr: cr[1][0]["time"])


def _differences(config: dict) -> str:
    keys = [k for k in DEFAULTS if k not in ("test_scenes", "eval_every")
            and _comparable({k: config.get(k)}) != _comparable({k: DEFAULTS[k]})]
    return ", ".join(f"{k}={config[k]}" for k in keys) or "(defaults)"


def table(root: Path) -> str:
    """Markdown: one line per run: its settings beyond DEFAULTS, steps, CPU and wall time, final and best FG-ARI,
    final MSE, and the first step with FG-ARI >= 0.85."""
    lines = ["| run | differs from the study's autoencoder | steps | CPU (min) | wall (min) | FG-ARI last | "
             "FG-ARI best | MSE last | first step FG-ARI >= 0.85 |", "|---|---|---|---|---|---|---|---|---|"]
    for config, rows in runs_under(root):
        last = rows[-1]
        best = max(r["fg_ari"] for r in rows)
        hit = next((r["step"] for r in rows if r["fg_ari"] >= 0.85), None)
        minutes = f"{last['cpu_seconds'] / 60:.1f} | {last['wall_seconds'] / 60:.1f}"
        lines.append(f"| {config['name']} | {_differences(config)} | {last['step']} | {minutes} | "
                     f"{last['fg_ari']:.3f} | {best:.3f} | {last['mse']:.4f} | {'-' if hit is None else hit} |")
    return "\n".join(lines) + "\n"


TABLE_START, TABLE_END = "<!-- table: python -m studies.discovery --readme -->", "<!-- /table -->"


def fill_table(readme: str, text: str, start: str = TABLE_START, end: str = TABLE_END) -> str:
    """`readme` with the text between `start` and `end` replaced by `text` (unchanged without them)."""
    if start not in readme or end not in readme:
        return readme
    head, rest = readme.split(start, 1)
    return head + start + "\n" + text + end + rest.split(end, 1)[1]


# The training study's README (reports/training) carries the claims table between these markers
# (studies/training/reading.py writes them); --arms-readme refreshes it there too.
CLAIMS_START, CLAIMS_END = "<!-- claims: python -m studies.discovery --arms-readme reports/discovery/arms -->", \
    "<!-- /claims -->"
TRAINING_README = Path(__file__).resolve().parents[1] / "reports" / "training" / "README.md"


def claims_in_training(claims: str) -> str:
    """claims.md as the training study's README carries it (its targets heading one level down)."""
    return claims.replace("\n## The issue's targets", "\n### The issue's targets").rstrip() + "\n"


def refresh_training_readme(claims: str, path: Path = TRAINING_README) -> bool:
    """Replace the claims table in the training study's README (between CLAIMS_START and CLAIMS_END); False
    where the README or its markers are missing (then nothing is written)."""
    if not path.exists():
        return False
    text = path.read_text()
    new = fill_table(text, claims_in_training(claims), CLAIMS_START, CLAIMS_END)
    if new == text:
        return CLAIMS_START in text
    _atomic_write_bytes(path, lambda f: f.write(new.encode()))
    return True


def figure(root: Path, path: Path) -> None:
    """FG-ARI and test MSE against steps, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for config, rows in runs_under(root):
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["fg_ari"] for r in rows], label=config["name"], marker=".")
        axes[1].plot(steps, [r["mse"] for r in rows], label=config["name"], marker=".")
    axes[0].axhline(0.85, color="grey", ls=":", lw=1)
    axes[0].set(xlabel="step", ylabel="FG-ARI (test scenes)", ylim=(0, 1))
    axes[1].set(xlabel="step", ylabel="MSE (test scenes)", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- the arms' tables and figure ------------------------------------------------------------------------------

def _arm_of(config: dict) -> str:
    """The arm of a run (stored in its config by config_of), with its ablation."""
    arm = config.get("arm", "?")
    if config.get("penalty") and any(config.get(k, DEFAULTS[k]) != ARMS.get(arm, {}).get(k, DEFAULTS[k])
                                     for k in PENALTY_KEYS):
        arm += f" ({penalty_label(config)})"
    return arm if not config.get("ablation") else f"{arm} + {config['ablation']}"


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _mean_per_step(rows: list[dict], key: str) -> float | None:
    """The per-step mean of `key` over the rows, weighted by the steps each row summarises."""
    pairs = [(r[key], r["steps_since_row"]) for r in rows if r.get(key) is not None and r.get("steps_since_row")]
    steps = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / steps if steps else None


def _capped_percent(rows: list[dict]) -> float | None:
    steps = sum(r.get("steps_since_row") or 0 for r in rows)
    return 100.0 * sum(r.get("adjoint_short_steps") or 0 for r in rows) / steps if steps else None


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def arms_table(root: Path) -> str:
    """Markdown: one line per arm run (seed, ablation): steps, FG-ARI and MSE (last, best), rho(J) at z* and at
    the training iterate (max over rows), ||J||_2 (max), the cosine to the exact implicit gradient (min, last),
    gradient spikes (total, largest ratio to the running median), backward bytes and CPU seconds per step."""
    head = ("| arm | seed | steps | FG-ARI last | FG-ARI best | MSE last | rho* max | rho(z_T) max | norm J max | "
            "cosine min | cosine last | spikes | spike ratio max | backward VJPs / step | adjoint capped (% steps) | "
            "backward MB | CPU s / step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for config, rows in runs_under(root):
        if not config.get("instruments"):
            continue
        last = rows[-1]
        ratios = _values(rows, "spike_ratio_max")
        per_step = last["cpu_seconds"] / last["step"] if last["step"] else None
        largest = {k: max(_values(rows, k), default=None) for k in ("fg_ari", "rho_star", "rho_train", "jacobian_norm")}
        cells = [_arm_of(config), config["seed"], last["step"], _f(last["fg_ari"]), _f(largest["fg_ari"]),
                 _f(last["mse"], 4), _f(largest["rho_star"]), _f(largest["rho_train"]), _f(largest["jacobian_norm"]),
                 _f(min(_values(rows, "cosine"), default=None)), _f(last.get("cosine")),
                 sum(int(r.get("spikes") or 0) for r in rows), _f(max(ratios) if ratios else None, 1),
                 _f(_mean_per_step(rows, "train_vjps_per_step"), 1), _f(_capped_percent(rows), 1),
                 _f((last.get("backward_bytes") or 0) / 2 ** 20, 1), _f(per_step, 3)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def penalised_runs(root: Path) -> list[tuple[dict, list[dict]]]:
    """The runs that penalties.png compares: every penalised z* run under root and root/variants (the arm, its
    ablations, the settings tried beside it), beside seed 0 of unrolled and one-step."""
    variants = root / "variants"
    runs = runs_under(root) + (runs_under(variants) if variants.is_dir() else [])
    base = [(c, rows) for c, rows in runs if _arm_of(c) in ("unrolled", "one-step") and int(c["seed"]) == 0]
    return base + [(c, rows) for c, rows in runs if c.get("instruments") and c.get("arm") == "implicit-penalty"]


def arms_figure(root: Path, path: Path, runs: list[tuple[dict, list[dict]]] | None = None) -> None:
    """FG-ARI, MSE, rho(J) at z*, ||J||_2 at the training iterate and the cosine to the exact gradient against
    steps (one line per run, one colour per arm), and FG-ARI against test-time iterations (the last rows).
    `runs` (default: every arm run under root): with them, one colour per labelled run (e.g. penalised_runs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("fg_ari", "FG-ARI (test scenes)"), ("mse", "MSE (test scenes)"), ("rho_star", "rho(J) at z*"),
              ("jacobian_norm", "||J||_2 at z_T"), ("cosine", "cosine to exact implicit gradient"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = dict(zip(ARMS, cycle))
    by_label = runs is not None
    if runs is None:
        runs = runs_under(root)
    else:
        labels = list(dict.fromkeys(_arm_of(c) for c, _ in runs))
        colours = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    seen = set()
    for config, rows in runs:
        if not config.get("instruments"):
            continue
        arm = _arm_of(config)
        colour = colours.get(arm if by_label else arm.split(" + ")[0], "grey")
        style = "-" if " + " not in arm or by_label else ":"
        label = arm if arm not in seen else None
        seen.add(arm)
        for ax, (key, title) in zip(axes.flat, panels):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=label, marker=".", ms=3)
            ax.set(title=title, xlabel="step")
        curve = next((r["test_time"] for r in reversed(rows) if "test_time" in r), None)
        if curve:
            its = sorted(curve, key=int)
            axes.flat[5].plot([int(t) for t in its], [curve[t]["fg_ari"] for t in its], style, color=colour,
                              marker="o", ms=3, label=label)
    axes.flat[5].set(title="FG-ARI vs test-time iterations (last row)", xlabel="iterations")
    axes.flat[1].set_yscale("log")
    axes.flat[2].axhline(1.0, color="grey", ls=":", lw=1)
    if by_label:
        # the penalised runs live near rho = 1, the unpenalised ones reach 12: cut the axis to read the former
        axes.flat[2].set_ylim(0.5, 1.5)
        axes.flat[2].set_title("rho(J) at z* (axis cut at 1.5)")
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---- the reading (issue #20, section 3): a verdict per claim, from the stored rows only --------------------

CLAIMS = (
    ("stability without clipping or warm-up",
     "spikes and max rho(J) at z* per run (arms table, curves.png); the no-warmup and clip ablations",
     "one-step has no more gradient spikes than unrolled on every seed, and one-step + no-warmup ends within 10% of "
     "one-step's FG-ARI"),
    ("constant backward memory and time",
     "backward MB and CPU s / step (arms table) at 3 and at 7 training iterations (iters7 ablation)",
     "one-step's backward bytes at 7 iterations equal those at 3, while unrolled's grow"),
    ("better reconstruction",
     "MSE last (arms table)", "one-step's final MSE is below unrolled's on every seed"),
    ("robustness to more test-time iterations",
     "FG-ARI against test-time iterations 1-20 (last panel of curves.png)",
     "one-step loses less FG-ARI than unrolled from 3 to 20 test-time iterations on every seed"),
    ("insensitivity to the training iteration count",
     "FG-ARI last at 3 vs 7 training iterations (iters7 ablation)",
     "one-step + iters7 ends within 10% of one-step's FG-ARI, unrolled + iters7 further from unrolled's"),
)
PAPER_SETTING = ("the paper: SLATE (and slot attention) on CLEVR-Mirror and others, 250k steps, GPUs; here: slot "
                 "attention autoencoder on 32x32 MultiShapes, 14,000 steps, one CPU thread")


def _finished(root: Path, steps: int) -> dict[tuple[str, int], list[dict]]:
    """(arm [+ ablation], seed) -> rows of the arm runs under root that reached `steps` or collapsed (see
    collapsed_since: stopped early, their last row is their result)."""
    return {(_arm_of(c), int(c["seed"])): rows for c, rows in runs_under(root)
            if c.get("instruments") and (rows[-1]["step"] >= steps or collapsed_since(rows) is not None)}


_PAIR = ("unrolled", "one-step")
_ITERS = ("unrolled", "one-step", "unrolled + iters7", "one-step + iters7")


def _verdict_rows(done: dict, steps: int) -> list[tuple[str, str]]:
    """(values, verdict) per claim, each decided only from finished runs; 'pending' names what is missing."""
    def seeds(arm):
        return sorted(s for a, s in done if a == arm)

    def last(arm, seed, key):
        return done[(arm, seed)][-1].get(key)

    common = sorted(set(seeds("unrolled")) & set(seeds("one-step")))

    def per_seed(value):                      # unrolled and one-step on their common seeds
        return {a: {s: value(a, s) for s in common} for a in _PAIR}

    def at_first_seed(key):                   # the iteration-count comparison: one seed of each
        return {a: last(a, seeds(a)[0], key) for a in _ITERS}

    def said(ok, seeded=True):
        return ("supported" if ok else "not supported") + (f" (seeds {common})" if seeded else "")

    def listed(values, digits):
        return ", ".join(f"{v:.{digits}f}" for v in values.values())

    def stability():
        spikes = per_seed(lambda a, s: sum(int(r.get("spikes") or 0) for r in done[(a, s)]))
        nw = [last("one-step + no-warmup", s, "fg_ari") / max(last("one-step", s, "fg_ari"), 1e-9)
              for s in seeds("one-step + no-warmup") if s in seeds("one-step")]
        ok = all(spikes["one-step"][s] <= spikes["unrolled"][s] for s in common) and nw and min(nw) >= 0.9
        return (f"spikes unrolled {spikes['unrolled']}, one-step {spikes['one-step']}; no-warmup / base FG-ARI "
                f"{', '.join(f'{v:.2f}' for v in nw)}", said(ok))

    def memory():
        b = at_first_seed("backward_bytes")
        ok = b["one-step + iters7"] == b["one-step"] and b["unrolled + iters7"] > b["unrolled"]
        return (f"backward MB one-step {b['one-step'] / 2**20:.1f} -> {b['one-step + iters7'] / 2**20:.1f}, "
                f"unrolled {b['unrolled'] / 2**20:.1f} -> {b['unrolled + iters7'] / 2**20:.1f}", said(ok, False))

    def reconstruction():
        mse = per_seed(lambda a, s: last(a, s, "mse"))
        ok = all(mse["one-step"][s] < mse["unrolled"][s] for s in common)
        return f"MSE unrolled {listed(mse['unrolled'], 4)}; one-step {listed(mse['one-step'], 4)}", said(ok)

    def robustness():
        def drop(a, s):
            curve = next((r["test_time"] for r in reversed(done[(a, s)]) if "test_time" in r), None)
            return None if curve is None else curve["3"]["fg_ari"] - curve["20"]["fg_ari"]
        drops = per_seed(drop)
        if any(v is None for d in drops.values() for v in d.values()):
            return "-", "pending: a finished run has no test-time curve"
        ok = all(drops["one-step"][s] < drops["unrolled"][s] for s in common)
        return (f"FG-ARI lost from 3 to 20 iterations: unrolled {listed(drops['unrolled'], 3)}; one-step "
                f"{listed(drops['one-step'], 3)}", said(ok))

    def iterations():
        r = at_first_seed("fg_ari")
        one = abs(r["one-step + iters7"] - r["one-step"]) / max(r["one-step"], 1e-9)
        unr = abs(r["unrolled + iters7"] - r["unrolled"]) / max(r["unrolled"], 1e-9)
        return (f"FG-ARI change 3 -> 7 iterations: one-step {one:.1%}, unrolled {unr:.1%}",
                said(one <= 0.1 and one < unr, False))

    checks = (((*_PAIR, "one-step + no-warmup"), stability), (_ITERS, memory), (_PAIR, reconstruction),
              (_PAIR, robustness), (_ITERS, iterations))
    out = []
    for arms, decide in checks:
        missing = [a for a in arms if not seeds(a)]
        out.append(("-", f"pending: no finished run ({steps} steps) of {', '.join(missing)}") if missing
                   else decide())
    return out


def targets_table(root: Path, steps: int = 14_000) -> str:
    """Markdown: the issue's targets (the unrolled baseline's FG-ARI, the penalised implicit arm's rho(J) at z*
    at every logged step, three seeds an arm), measured on every arm run under root, finished or not."""
    runs = [(c, rows) for c, rows in runs_under(root) if c.get("instruments")]
    lines = ["| target | runs | measured | verdict |", "|---|---|---|---|"]

    def progress(rows):
        return f"{rows[-1]['step']} of {steps} steps"

    unrolled = [(c, rows) for c, rows in runs if _arm_of(c) == "unrolled"]
    if unrolled:
        best = {int(c["seed"]): max(_values(rows, "fg_ari"), default=float("nan")) for c, rows in unrolled}
        hit = any(v >= 0.85 for v in best.values())
        done = all(rows[-1]["step"] >= steps for _, rows in unrolled)
        verdict = "met" if hit else ("missed" if done else "not yet")
        lines.append(f"| unrolled baseline FG-ARI >= 0.85 | seeds {sorted(best)} | best FG-ARI "
                     f"{', '.join(f'{v:.3f}' for v in best.values())} | {verdict} |")
    # every penalised z* run: the arm, then its ablations and the penalty settings tried beside it (root/variants),
    # each labelled with what differs from the arm, so that a setting that missed is listed with the one that met
    variants = root / "variants"
    beside = [(c, rows) for c, rows in runs_under(variants) if c.get("instruments")] if variants.is_dir() else []
    penalised = [(c, rows) for c, rows in runs + beside if c.get("arm") == "implicit-penalty"]
    penalised.sort(key=lambda cr: _arm_of(cr[0]) != "implicit-penalty")        # the arm itself first
    for c, rows in penalised:
        rho = _values(rows, "rho_star")
        above = sum(v >= 1.0 for v in rho)
        finished = rows[-1]["step"] >= steps
        verdict = "missed" if above else ("met" if finished else f"holds so far ({progress(rows)})")
        extra = _arm_of(c)[len("implicit-penalty"):].strip()
        label = "implicit at z* with the penalty" + (f" [{extra}]" if extra else "")
        lines.append(f"| {label}: rho(J) at z* < 1 at every logged step | seed {c['seed']}, "
                     f"{progress(rows)} | max {max(rho, default=float('nan')):.3f}; >= 1 at {above} of {len(rho)} "
                     f"logged steps | {verdict} |")
    seeds: dict[str, set[int]] = {}
    for c, rows in runs:
        if not c.get("ablation"):
            done = rows[-1]["step"] >= steps or collapsed_since(rows) is not None    # a collapsed run is decided
            seeds.setdefault(_arm_of(c), set()).update([int(c["seed"])] if done else [])
    counts = ", ".join(f"{a} {len(seeds.get(a, ()))}" for a in ARMS)
    lines.append(f"| every arm on 3 seeds ({steps} steps) | {len(runs)} arm runs | finished seeds: {counts} | "
                 f"{'met' if all(len(seeds.get(a, ())) >= 3 for a in ARMS) else 'not yet'} |")
    return "\n".join(lines) + "\n"


def slot_cosine(slots: torch.Tensor) -> torch.Tensor:
    """[B]: the mean cosine between distinct slots of each sample (1: every slot the same direction)."""
    unit = slots / slots.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    K = slots.shape[1]
    pairs = (unit @ unit.transpose(1, 2))[:, ~torch.eye(K, dtype=torch.bool, device=slots.device)]
    return pairs.reshape(slots.shape[0], K * (K - 1)).mean(1)


SYMMETRY_SCENES = 64


def slot_symmetry(run: Path, scenes: int = SYMMETRY_SCENES) -> dict[str, Any]:
    """A stored run's checkpoint on the first `scenes` test scenes: the slots as the model makes them (its trained
    forward) and at a solved z* (Anderson to 1e-4, at most 100 steps, from the same initial slots): the mean
    pairwise slot cosine, the fraction of z* solves that converged, and FG-ARI of both.

    Slot attention is equivariant under permuting the slots, so a unique fixed point has every slot equal (a
    permuted fixed point is a fixed point too); objects can be told apart only by a transient from the random
    initial slots or at one of several fixed points. This measures which a trained model uses."""
    config = {**DEFAULTS, **json.loads((run / "config.json").read_text())}
    state = torch.load(run / "ckpt.pt", weights_only=False, map_location="cpu")
    test = dataset(config).sample(config["test_scenes"], torch.Generator().manual_seed(TEST_SEED))
    images, labels = test.images[:scenes], test.labels[:scenes]
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.eval()
    out = {"step": state["step"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")               # a z* solve that stops short is counted, not printed
        trained = model(images, generator=torch.Generator().manual_seed(TEST_SEED))
        # z* of the same map from the same initial slots, whatever the arm's estimator
        from fpgrad.forward import Anderson
        m = model.slot_attention.as_map()
        tokens = model.encoder(images)
        z0 = m.init_state(tokens, torch.Generator().manual_seed(TEST_SEED))
        solved = Anderson(tol=1e-4, max_iter=100, warn=False).solve(m.step, m.params, tokens, z0)
        masks = model.decode(solved.z)[1]
    out["cosine_trained"] = float(slot_cosine(trained.slots).mean())
    out["fg_ari_trained"] = float(foreground_ari(labels, trained.segmentation()).nanmean())
    out["cosine_z_star"] = float(slot_cosine(solved.z).mean())
    out["fg_ari_z_star"] = float(foreground_ari(labels, masks.argmax(1)).nanmean())
    out["z_star_converged"] = float(solved.converged.float().mean())
    return out


def symmetry_table(root: Path) -> str:
    """Markdown: slot_symmetry of every arm run under root (and root/variants), from their checkpoints."""
    lines = ["| arm | seed | step | slot cosine (trained forward) | FG-ARI | slot cosine at z* | FG-ARI at z* | "
             "z* solves converged |", "|---|---|---|---|---|---|---|---|"]
    folders = sorted(p.parent for p in root.glob("*/config.json")) + sorted(
        p.parent for p in (root / "variants").glob("*/config.json"))
    for folder in folders:
        config = {**DEFAULTS, **json.loads((folder / "config.json").read_text())}
        if not config.get("instruments") or not (folder / "ckpt.pt").exists():
            continue
        m = slot_symmetry(folder)
        lines.append(f"| {_arm_of(config)} | {config['seed']} | {m['step']} | {_f(m['cosine_trained'])} | "
                     f"{_f(m['fg_ari_trained'])} | {_f(m['cosine_z_star'])} | {_f(m['fg_ari_z_star'])} | "
                     f"{_f(m['z_star_converged'], 2)} |")
    return "\n".join(lines) + "\n"


def claims_table(root: Path, steps: int = 14_000) -> str:
    """Markdown: per claim of the paper, what decides it here, the rule, the measured values and the verdict
    (from the finished arm runs under root; 'pending' names the runs still missing)."""
    done = _finished(root, steps)
    lines = ["| claim | decided by | supported when | measured | verdict |", "|---|---|---|---|---|"]
    for (claim, figure, rule), (values, verdict) in zip(CLAIMS, _verdict_rows(done, steps)):
        lines.append(f"| {claim} | {figure} | {rule} | {values} | {verdict} |")
    def named(arm, seed):
        since = collapsed_since(done[(arm, seed)])
        return f"{arm} s{seed}" + ("" if since is None else f" (collapsed at step {since}, stopped at "
                                                            f"{done[(arm, seed)][-1]['step']})")
    lines += ["", f"What differs: {PAPER_SETTING}. Finished runs ({steps} steps): "
              + (", ".join(named(a, s) for a, s in sorted(done)) or "none yet") + ".",
              "", "## The issue's targets", "", targets_table(root, steps)]
    return "\n".join(lines)


def write_readme(root: Path, make_table, make_figure) -> str:
    """root/table.md and root/curves.png from the stored rows, and the table filled into root/README.md."""
    text = make_table(root)
    _atomic_write_bytes(root / "table.md", lambda f: f.write(text.encode()))
    readme = root / "README.md"
    if readme.exists():
        new = fill_table(readme.read_text(), text).encode()
        _atomic_write_bytes(readme, lambda f: f.write(new))
    make_figure(root, root / "curves.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m studies.discovery", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="plain-fullres", help=f"one of {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default 20000; 4 with --quick)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default reports/discovery/CONFIG)")
    parser.add_argument("--arm", default=None, help=f"train an arm of the study: one of {sorted(ARMS)} (instruments "
                        "on; default --out reports/discovery/arms/CONFIG-ARM[-ABLATION][-sSEED])")
    parser.add_argument("--ablation", default=None, help=f"with --arm: one of {sorted(ABLATIONS)}")
    parser.add_argument("--seed", type=int, default=None,
                        help="override the configuration's seed (default: its own, 0); the run is named CONFIG-sSEED")
    parser.add_argument("--penalty", type=float, default=None, metavar="W",
                        help="with --arm: the spectral penalty's weight (implicit-penalty: 0.05; a run whose penalty "
                        "differs from its arm's is named ...-wW-tT-pP-hH)")
    parser.add_argument("--penalty-target", type=float, default=None, metavar="T", help="its target (0.7)")
    parser.add_argument("--penalty-iters", type=int, default=None, metavar="P", help="its warm power steps (4)")
    parser.add_argument("--penalty-smooth", type=float, default=None, metavar="H",
                        help="its Huber width (0.1; 0: the plain hinge)")
    parser.add_argument("--penalty-krylov", type=int, default=None, metavar="K",
                        help="Arnoldi steps on J and J^T before its power steps (0: none; e.g. 16 with "
                        "--penalty-iters 1: the run is named ...-kK)")
    parser.add_argument("--symmetry", type=Path, default=None, metavar="ROOT",
                        help="write ROOT/symmetry.md: the slots' mean pairwise cosine (trained forward and solved z*) "
                        "from the checkpoint of every arm run under ROOT")
    parser.add_argument("--device", default=None, help="train on this device (default cpu; e.g. cuda); the scenes "
                        "and noise are drawn on the CPU from the same seeds")
    parser.add_argument("--quick", action="store_true", help="tiny model and scenes, a few steps")
    parser.add_argument("--readme", type=Path, default=None, metavar="ROOT",
                        help="write ROOT/table.md and ROOT/curves.png from the rows of every run under ROOT")
    parser.add_argument("--arms-readme", type=Path, default=None, metavar="ROOT",
                        help="write ROOT/table.md and ROOT/curves.png from the rows of every arm run under ROOT")
    args = parser.parse_args(argv)
    if args.arms_readme is not None:
        print(write_readme(args.arms_readme, arms_table, arms_figure))
        variants = args.arms_readme / "variants"
        if variants.is_dir() and runs_under(variants):      # settings tried beside the arms: their own table
            text = arms_table(variants)
            _atomic_write_bytes(variants / "table.md", lambda f: f.write(text.encode()))
        arms_figure(args.arms_readme, args.arms_readme / "penalties.png", penalised_runs(args.arms_readme))
        claims = claims_table(args.arms_readme)
        _atomic_write_bytes(args.arms_readme / "claims.md", lambda f: f.write(claims.encode()))
        if args.arms_readme.resolve() == (Path(__file__).resolve().parents[1] / "reports" / "discovery" / "arms"):
            refresh_training_readme(claims)          # the same table in reports/training/README.md
        print(claims)
        return
    if args.readme is not None:
        print(write_readme(args.readme, table, figure))
        return
    if args.symmetry is not None:
        text = symmetry_table(args.symmetry)
        _atomic_write_bytes(args.symmetry / "symmetry.md", lambda f: f.write(text.encode()))
        print(text)
        return
    penalty = dict(penalty=args.penalty, penalty_target=args.penalty_target, penalty_iters=args.penalty_iters,
                   penalty_smooth=args.penalty_smooth, penalty_krylov=args.penalty_krylov)
    config = config_of(args.config, args.quick, args.seed, args.arm, args.ablation, penalty)
    steps = args.steps if args.steps is not None else (4 if args.quick else 20_000)
    root = Path("reports/discovery") / ("arms" if args.arm else "")
    out = args.out if args.out is not None else root / config["name"]
    if args.device is not None and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}); "
                     "leave --device out to train on the CPU")
    rows = train(config, steps, out, device=args.device)
    last = rows[-1]
    print(f"{config['name']}: step {last['step']}, FG-ARI {last['fg_ari']:.3f}, MSE {last['mse']:.4f}, "
          f"{last['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
