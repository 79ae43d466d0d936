"""Silent failures: each library's default or documented usage on the cases where an implicit gradient can go
wrong, and what it returns: raised (an exception), warned (a warning), flagged-in-result (a flag or residual in
what it returns), NaN/Inf (a visibly broken number, no message), correct (a right answer: nothing to signal) or
SILENT (a plausible-looking wrong number, or a tolerance not met, with no signal). The last row (each
library's defaults) is informational: a default that is merely loose is 'inexact (defaults)', not a failure.

Maps: the tanh map (n = 300; rho(J) at z* tuned to 0.9, and to 1.05 for the unstable case), float64 except
the float32 row. The true gradient is the dense implicit one. A row is 'correct' when the parameter gradient's
relative error is below 1e-4 (1e-3 in float32) and the asked tolerance was met.
fpgrad must raise, warn or flag in every row where something is wrong: `main` exits 1 if it does not.

    python -m benchmarks.silent_failures [--quick]      (or: fpgrad bench silent-failures)
"""

from __future__ import annotations

import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from benchmarks import _common as C
from fpgrad.compare import cosine, relative_error

CLASSES = ("raised", "warned", "flagged-in-result", "nan/inf", "correct", "SILENT", "inexact (defaults)")


@dataclass
class Outcome:
    """What a call returned: a gradient (flat), and whether the result itself carries a failure flag."""

    grad: Tensor | None = None
    flagged: bool = False
    flag_text: str = ""
    tolerance_met: bool = True        # False: the library did not reach the tolerance it was asked for
    extra: dict = field(default_factory=dict)


@dataclass
class Problem:
    tuned: C.TunedMap
    keys: list[str]
    target_z: Tensor
    exact: Tensor                       # flat exact parameter gradient

    def loss(self, z: Tensor) -> Tensor:
        return 0.5 * ((z - self.target_z.to(z.dtype)) ** 2).sum()


def make_problem(tuned: C.TunedMap, seed: int) -> Problem:
    keys = sorted(tuned.params)
    gen = torch.Generator().manual_seed(seed + 11)
    target_z = torch.randn(tuned.z.shape, generator=gen, dtype=C.DTYPE)
    J = C.tanh_jacobian(tuned.params, tuned.z, tuned.x)[0]
    g = (tuned.z - target_z)[0]
    u = torch.linalg.solve(torch.eye(J.shape[0], dtype=C.DTYPE) - J.T, g)
    _, fn = torch.func.vjp(lambda p: tuned.step(p, tuned.z, tuned.x), tuned.params)
    grads = fn(u[None])[0]
    return Problem(tuned, keys, target_z, torch.cat([grads[k].reshape(-1) for k in keys]))


def leaves(problem: Problem, dtype=C.DTYPE) -> dict[str, Tensor]:
    return {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in problem.tuned.params.items()}


def flat_grad(loss: Tensor, params: dict[str, Tensor], keys: list[str]) -> Tensor:
    grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
    return torch.cat([(torch.zeros_like(params[k]) if gr is None else gr).reshape(-1)
                      for k, gr in zip(keys, grads, strict=True)])


# ---- fault injection ------------------------------------------------------------------------------------------

def nan_forward(step: Callable, first: int, count: int = 3) -> tuple[Callable, dict]:
    """The step with NaN in its output at evaluations first .. first + count - 1 (a transient overflow)."""
    state = {"calls": 0}

    def wrapped(params, z, x):
        state["calls"] += 1
        out = step(params, z, x)
        if first <= state["calls"] < first + count:
            out = out * float("nan")
        return out
    return wrapped, state


class _NaNInBackward(torch.autograd.Function):
    """Identity whose backward returns NaN from its k-th call on (an overflow inside the adjoint solve)."""

    @staticmethod
    def forward(z, state):
        return z.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.state = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        ctx.state["calls"] += 1
        if ctx.state["calls"] >= ctx.state["first"]:
            grad = grad * float("nan")
        return grad, None


def nan_backward(step: Callable, first: int) -> tuple[Callable, dict]:
    state = {"calls": 0, "first": first}

    def wrapped(params, z, x):
        return step(params, _NaNInBackward.apply(z, state), x)
    return wrapped, state


# ---- the libraries' usage ------------------------------------------------------------------------------------

def fpgrad_call(problem: Problem, *, step=None, z0=None, forward=None, backward=None, dtype=C.DTYPE) -> Outcome:
    """fpgrad.fixed_point(step, params, x, z0, forward=..., backward=...) then loss.backward (autograd.grad)."""
    import fpgrad
    from fpgrad.estimators import CostRecord
    t = problem.tuned
    params = leaves(problem, dtype)
    record = CostRecord()
    z0 = torch.zeros_like(t.z) if z0 is None else z0
    z = fpgrad.fixed_point(step or t.step, params, t.x.to(dtype), z0.to(dtype), forward=forward, backward=backward,
                           record=record)
    grad = flat_grad(problem.loss(z), params, problem.keys)
    bad_fwd = [fp for fp in record.forward if not bool(fp.converged.all())]
    bad_solve = [s for s in record.solves if not bool(s.converged.all())]
    # a truncated series (Neumann(k), Phantom(k)) reports the residual it leaves in the adjoint system
    bad_series = [s for s in record.series if not bool(s.solved.all())]
    flagged = bool(bad_fwd or bad_solve or bad_series or record.messages)
    text = "; ".join([fp.message for fp in bad_fwd] + [s.message for s in bad_solve] + record.messages +
                     [s.message for s in bad_series])
    return Outcome(grad, flagged, text, tolerance_met=not flagged)


def torchdeq_call(problem: Problem, *, step=None, z0=None, dtype=C.DTYPE, tol_check: float | None = None,
                  **deq_kwargs) -> Outcome:
    """torchdeq.get_deq(**deq_kwargs) on z = step(params, z, x); loss on z_out[-1]; info checked for its residual."""
    from torchdeq import get_deq
    t = problem.tuned
    params = leaves(problem, dtype)
    deq = get_deq(**deq_kwargs)
    x = t.x.to(dtype)
    z0 = (torch.zeros_like(t.z) if z0 is None else z0).to(dtype)
    writer_info: list = []
    z_out, info = deq(lambda z: (step or t.step)(params, z, x), z0, backward_writer=writer_info.append)
    grad = flat_grad(problem.loss(z_out[-1]), params, problem.keys)
    # what the result carries: the forward's lowest residual (no converged flag, no warning); the backward's
    # statistics go only to a backward_writer the user passes
    mode = deq_kwargs.get("f_stop_mode", "abs")
    res = float(info[f"{mode}_lowest"].max())
    f_tol = deq_kwargs.get("f_tol", 1e-3)
    extra = {"forward_residual": res, "forward_tol": f_tol}
    met = res <= f_tol
    if writer_info:
        b_mode = deq_kwargs.get("b_stop_mode", "abs")
        b_res = float(writer_info[-1][f"{b_mode}_lowest"].max())
        extra["backward_residual (backward_writer only)"] = b_res
        met = met and b_res <= deq_kwargs.get("b_tol", 1e-6)
    return Outcome(grad, False, "", tolerance_met=met, extra=extra)


def torchopt_call(problem: Problem, solve, *, step=None, z0=None, dtype=C.DTYPE, sign: int = 1,
                  forward_iters: int = 2000, forward_tol: float = 1e-12, rtol: float | None = None) -> Outcome:
    """torchopt.diff.implicit.custom_root(optimality, argnums, solve=solve) around a user's fixed-point loop.

    optimality = z - f(z) (sign=1) or f(z) - z (sign=-1). rtol: the linear solve's asked tolerance; the
    relative residual ||b - A u|| / ||b|| of what it returned is measured here (TorchOpt reports nothing).
    """
    checked: dict = {}
    if rtol is not None:
        inner = solve

        def flat(tree) -> Tensor:
            leaves_ = tree if isinstance(tree, (tuple, list)) else (tree,)
            return torch.cat([t.reshape(-1) for t in leaves_])

        def solve(matvec, b):
            u = inner(matvec, b)
            with torch.no_grad():
                checked["residual"] = float((flat(b) - flat(matvec(u))).norm() / flat(b).norm())
            return u
    import torchopt
    t = problem.tuned
    keys = problem.keys
    params = leaves(problem, dtype)
    x = t.x.to(dtype)
    f = step or t.step

    def optimality(z, *values):
        r = z - f(dict(zip(keys, values, strict=True)), z, x)
        return r if sign == 1 else -r

    @torchopt.diff.implicit.custom_root(optimality, argnums=tuple(range(1, len(keys) + 1)), solve=solve)
    def solver(z_init, *values):
        p = dict(zip(keys, values, strict=True))
        z = z_init
        with torch.no_grad():
            for _ in range(forward_iters):
                z_new = f(p, z, x)
                done = float((z_new - z).norm()) <= forward_tol * float(z_new.norm())
                z = z_new
                if done:
                    break
        return z
    z0 = (torch.zeros_like(t.z) if z0 is None else z0).to(dtype)
    z = solver(z0, *[params[k] for k in keys])
    grad = flat_grad(problem.loss(z), params, keys)
    if "residual" in checked:
        return Outcome(grad, False, "", tolerance_met=checked["residual"] <= rtol,
                       extra={"backward_residual (measured here)": checked["residual"], "backward_rtol": rtol})
    return Outcome(grad, False, "")


# ---- classification -------------------------------------------------------------------------------------------

def classify(fn: Callable[[], Outcome], exact: Tensor, accept: float, expect_tolerance: bool = True) -> dict:
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as e:   # noqa: BLE001 - any exception is the 'raised' outcome
            return {"class": "raised", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    "where": traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[-1]}
        caught = [f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}" for w in ws
                  if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    grad = out.grad
    err = cos = float("nan")
    if grad is not None:
        flat, ref = grad.detach().double().reshape(-1), exact.detach().double().reshape(-1)
        err, cos = relative_error(flat, ref), cosine(flat, ref)
    row = {"gradient_error": err, "cosine": cos, **out.extra}
    finite = grad is not None and bool(torch.isfinite(grad).all())
    if caught:
        row.update({"class": "warned", "detail": caught[0]})
    elif out.flagged:
        row.update({"class": "flagged-in-result", "detail": out.flag_text[:300]})
    elif not finite:
        row.update({"class": "nan/inf", "detail": "the gradient holds NaN/Inf; no exception, warning or flag"})
    elif err <= accept and (out.tolerance_met or not expect_tolerance):
        row.update({"class": "correct", "detail": f"gradient error {C.fmt(err)}"})
    else:
        why = (f"gradient error {C.fmt(err)}, cosine {C.fmt(cos)}" if err > accept else
               f"asked tolerance not met (gradient error {C.fmt(err)}: what the dtype allows)")
        row.update({"class": "SILENT", "detail": why + "; no exception, warning or flag"})
    return row


# ---- the cases --------------------------------------------------------------------------------------------------

def cases(p09: Problem, p105: Problem, p09_f32: Problem) -> list[dict]:
    """Each case: what can go wrong, and per library the call (None: the library has no such usage)."""
    from fpgrad.estimators import Implicit, Neumann
    from fpgrad.forward import Anderson
    have_deq, have_opt = C.have("torchdeq"), C.have("torchopt")
    if have_opt:
        from torchopt import linear_solve as ls
    deq_ok = dict(core="indexing", ift=True, f_solver="anderson", f_max_iter=1000, f_tol=1e-12, f_stop_mode="rel",
                  b_max_iter=1000, b_tol=1e-10, b_stop_mode="rel")
    z105 = p105.tuned.z
    out: list[dict] = []

    def add(name, note, problem, fp, deq, opt, accept=1e-4, tolerance=True, informational=False):
        out.append({"case": name, "note": note, "problem": problem, "accept": accept, "tolerance": tolerance,
                    "informational": informational,
                    "calls": {"fpgrad": fp, "torchdeq": deq if have_deq else None,
                              "torchopt": opt if have_opt else None}})

    add("non-symmetric system given to CG",
        "rho(J)=0.9; fpgrad Implicit(solver='cg'); TorchOpt custom_root(solve=solve_cg()) (its README's 'conjugate "
        "gradient' option); TorchDEQ has no CG",
        p09, lambda: fpgrad_call(p09, backward=Implicit(solver="cg")), None,
        lambda: torchopt_call(p09, ls.solve_cg()))
    add("Neumann series iterated at rho(J) >= 1",
        "rho(J)=1.05 at an unstable fixed point (forward started at z*); fpgrad Implicit(solver='neumann'); TorchDEQ "
        "ift with b_solver='fixed_point_iter' (its default backward), 1000 iterations; TorchOpt "
        "solve_inv(ns=True, maxiter=1000)",
        p105, lambda: fpgrad_call(p105, z0=z105, backward=Implicit(solver="neumann")),
        lambda: torchdeq_call(p105, z0=z105, **{**deq_ok, "b_solver": "fixed_point_iter"}),
        lambda: torchopt_call(p105, ls.solve_inv(ns=True, maxiter=1000), z0=z105, forward_iters=0))
    add("truncated Neumann / phantom estimator at rho(J) >= 1",
        "rho(J)=1.05, forward started at z*; fpgrad Neumann(5); TorchDEQ phantom gradient grad=5 (tau 1); TorchOpt "
        "solve_inv(ns=True) with its default maxiter=10. Approximations by design: wrong here since the series "
        "diverges. fpgrad's result carries the residual its series leaves in (I - J^T) u = g (record.series): a "
        "flag that the implicit system is not solved, not a detection of rho >= 1 (k terms cannot see it)",
        p105, lambda: fpgrad_call(p105, z0=z105, backward=Neumann(5)),
        lambda: torchdeq_call(p105, z0=z105, **{**deq_ok, "ift": False, "grad": 5}),
        lambda: torchopt_call(p105, ls.solve_inv(ns=True), z0=z105, forward_iters=0))
    add("Neumann series with the optimality written f(z) - z",
        "rho(J)=0.9; only TorchOpt asks for an optimality function (fpgrad and TorchDEQ take the step itself): "
        "solve_inv(ns=True) default maxiter=10 and maxiter=1000",
        p09, None, None, lambda: torchopt_call(p09, ls.solve_inv(ns=True), sign=-1))
    add("Neumann series with f(z) - z, 1000 terms", "as above with maxiter=1000", p09, None, None,
        lambda: torchopt_call(p09, ls.solve_inv(ns=True, maxiter=1000), sign=-1))
    add("forward solve does not converge",
        "rho(J)=0.9, forward capped at 5 iterations; fpgrad fixed_point(forward=Anderson(max_iter=5)); TorchDEQ "
        "f_max_iter=5; TorchOpt custom_root around a 5-iteration loop (default solve_normal_cg)",
        p09, lambda: fpgrad_call(p09, forward=Anderson(tol=1e-10, max_iter=5)),
        lambda: torchdeq_call(p09, **{**deq_ok, "f_max_iter": 5, "b_solver": "broyden"}),
        lambda: torchopt_call(p09, ls.solve_normal_cg(), forward_iters=5))
    step_nan_f, _ = nan_forward(p09.tuned.step, 20)
    add("NaN appearing mid-solve (forward)",
        "rho(J)=0.9; the step's output is NaN at evaluations 20-22 (a transient overflow); defaults otherwise "
        "(TorchDEQ: anderson forward)",
        p09, lambda: fpgrad_call(p09, step=nan_forward(p09.tuned.step, 20)[0]),
        lambda: torchdeq_call(p09, step=nan_forward(p09.tuned.step, 20)[0], **{**deq_ok, "b_solver": "broyden"}),
        lambda: torchopt_call(p09, ls.solve_normal_cg(), step=nan_forward(p09.tuned.step, 20)[0]))
    add("NaN appearing mid-solve (backward)",
        "rho(J)=0.9; the VJP returns NaN from its 10th call on; fpgrad default backward (gmres); TorchDEQ "
        "b_solver='broyden'; TorchOpt default solve_normal_cg",
        p09, lambda: fpgrad_call(p09, step=nan_backward(p09.tuned.step, 10)[0]),
        lambda: torchdeq_call(p09, step=nan_backward(p09.tuned.step, 10)[0], **{**deq_ok, "b_solver": "broyden"}),
        lambda: torchopt_call(p09, ls.solve_normal_cg(), step=nan_backward(p09.tuned.step, 10)[0]))
    f32 = torch.float32
    add("float32 round-off stalls a tight tolerance (1e-10)",
        "rho(J)=0.9 in float32, backward asked for relative residual 1e-10; fpgrad Implicit(tol=1e-10); TorchDEQ "
        "b_tol=1e-10 (broyden, 1000 iterations); TorchOpt solve_normal_cg(rtol=1e-10)",
        p09_f32, lambda: fpgrad_call(p09_f32, backward=Implicit(tol=1e-10), dtype=f32,
                                     forward=Anderson(tol=1e-6, max_iter=500)),
        lambda: torchdeq_call(p09_f32, dtype=f32, **{**deq_ok, "f_tol": 1e-6, "b_solver": "broyden"}),
        lambda: torchopt_call(p09_f32, ls.solve_normal_cg(rtol=1e-10), dtype=f32, forward_tol=1e-6, rtol=1e-10),
        accept=1e-3)
    add("backward solve stops at its iteration cap",
        "rho(J)=0.9, backward capped at 5 iterations; fpgrad Implicit(max_iter=5); TorchDEQ b_max_iter=5 "
        "(broyden); TorchOpt solve_normal_cg(maxiter=5)",
        p09, lambda: fpgrad_call(p09, backward=Implicit(max_iter=5)),
        lambda: torchdeq_call(p09, **{**deq_ok, "b_solver": "broyden", "b_max_iter": 5}),
        lambda: torchopt_call(p09, ls.solve_normal_cg(maxiter=5)))
    add("library defaults for an exact gradient",
        "rho(J)=0.9; fpgrad fixed_point() defaults; TorchDEQ get_deq(ift=True) otherwise default (fixed_point_iter "
        "forward and backward, 40 iterations each, tol 1e-3 / 1e-6 'abs'); TorchOpt custom_root default "
        "(solve_normal_cg) around a converged loop",
        p09, lambda: fpgrad_call(p09),
        lambda: torchdeq_call(p09, ift=True),
        lambda: torchopt_call(p09, None), informational=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser("silent_failures", __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="tanh map size (default 300; 100 with --quick)")
    args = p.parse_args(argv)
    run = C.Run("silent_failures", args)
    n = args.n or (100 if args.quick else 300)
    t09 = C.tanh_at_rho(n, 0.9, seed=args.seed)
    t105 = C.tanh_at_rho(n, 1.05, seed=args.seed)
    p09, p105 = make_problem(t09, args.seed), make_problem(t105, args.seed)
    p09_f32 = p09       # same map and exact gradient; the calls cast to float32
    rows = []
    for case in cases(p09, p105, p09_f32):
        row = {"case": case["case"], "note": case["note"], "rho": case["problem"].tuned.rho}
        for lib, call in case["calls"].items():
            if call is None:
                row[lib] = {"class": "n/a", "detail": "no such usage in this library" if C.have(lib) or
                            lib == "fpgrad" else f"{lib} not installed"}
                continue
            row[lib] = classify(call, case["problem"].exact, case["accept"], case["tolerance"])
            if case["informational"] and row[lib]["class"] == "SILENT":
                row[lib]["class"] = "inexact (defaults)"
        row["informational"] = case["informational"]
        rows.append(row)
        print(f"  {case['case']}: " + ", ".join(f"{lib} {row[lib]['class']}" for lib in ("fpgrad", "torchdeq",
                                                                                           "torchopt")),
              file=sys.stderr, flush=True)
    libs = ("fpgrad", "torchdeq", "torchopt")
    C.table([{"case": r["case"], **{lib: r[lib]["class"] for lib in libs}} for r in rows], ["case", *libs],
            "What each library does (raised / warned / flagged-in-result / nan/inf / correct / SILENT)")
    C.table([{"case": r["case"], "library": lib, "class": r[lib]["class"], "detail": r[lib].get("detail", ""),
              "grad error": C.fmt(r[lib].get("gradient_error"))} for r in rows for lib in libs],
            ["case", "library", "class", "grad error", "detail"], "Details")
    silent = [r["case"] for r in rows if r["fpgrad"]["class"] == "SILENT"]
    counts = {lib: {c: sum(1 for r in rows if r[lib]["class"] == c) for c in CLASSES} for lib in libs}
    peers = "; ".join(f"{lib}: {counts[lib]['SILENT']} SILENT, {counts[lib]['nan/inf']} nan/inf" for lib in libs)
    targets = [C.target("silent failures: no SILENT row for fpgrad", not silent, len(silent), "0 rows",
                        (("fpgrad silent in: " + "; ".join(silent) + ". ") if silent else "") + peers)]
    C.table(targets, ["target", "met", "value", "threshold", "detail"], "Targets")
    run.save({"n": n, "rho": {"0.9": t09.rho, "1.05": t105.rho}, "rows": rows, "counts": counts}, targets)
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
