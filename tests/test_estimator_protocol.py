"""The estimator protocol: one entry point (`Estimator.apply`), the properties callers ask instead of isinstance,
third-party estimators through every public call, and imports that run one way (autograd -> estimators -> forward).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import linear_problem

import fpgrad
from fpgrad.compare import compare_estimators, describe
from fpgrad.estimators import Estimator, FiniteDifference, Implicit, Neumann, OneStep, Phantom, Truncated, Unrolled
from fpgrad.forward import Anderson, Iterate
from fpgrad.nn import ImplicitSlotAttention

ROOT = Path(__file__).resolve().parents[1]
TIGHT = Anderson(tol=1e-13, max_iter=1000, warn=False)

# estimator, taped_steps_after_solve, reaches_initial_state, runs_solver_loop, uses_forward, adjoint, is_reference,
# describe(): the values ImplicitSlotAttention (iterations to solve, parameters without grad), fixed_point (eager
# under torch.compile) and compare (row labels, also the studies' table keys) rely on
PROPERTIES = [
    (Unrolled(7), 0, True, False, False, False, False, "Unrolled(7)"),
    (Truncated(2), 2, False, True, True, False, False, "Truncated(2)"),
    (Truncated(2, T=5), 0, False, True, False, False, False, "Truncated(2/5)"),
    (Truncated(3, T=3), 0, True, False, False, False, False, "Truncated(3/3)"),
    (OneStep(), 1, False, True, True, False, False, "OneStep"),
    (OneStep(straight_through=True), 1, True, True, True, False, False, "OneStep(ST)"),
    (Neumann(4), 0, True, True, True, True, False, "Neumann(4)"),
    (Phantom(3, 0.7), 0, True, True, True, True, False, "Phantom(3, 0.7)"),
    (Implicit(), 0, True, True, True, True, False, "Implicit(gmres)"),
    (Implicit(solver="dense", tol=1e-9), 0, True, True, True, True, False, "Implicit(dense, tol=1e-09)"),
    (FiniteDifference(), 0, True, True, False, False, True, "FiniteDifference"),
]
DIFFERENTIABLE = [row[0] for row in PROPERTIES if not row[0].is_reference]


@pytest.mark.parametrize("est,taped,reaches,loop,uses_forward,adjoint,reference,label", PROPERTIES,
                         ids=[row[-1] for row in PROPERTIES])
def test_every_estimator_answers_the_properties_callers_rely_on(est, taped, reaches, loop, uses_forward, adjoint,
                                                                reference, label):
    assert est.taped_steps_after_solve == taped
    assert est.reaches_initial_state is reaches
    assert est.runs_solver_loop is loop
    assert est.uses_forward is uses_forward
    assert est.adjoint is adjoint
    assert est.is_reference is reference
    assert est.describe() == label == describe(est)


@dataclass(frozen=True)
class _CountingIterate(Iterate):
    """Plain iteration that counts its solves (to see which estimators use the forward solver they are given)."""

    calls: list = None

    def solve(self, *args, **kwargs):
        self.calls.append(1)
        return super().solve(*args, **kwargs)


@pytest.mark.parametrize("est", DIFFERENTIABLE, ids=lambda e: e.describe())
def test_the_properties_describe_what_apply_does(est):
    # uses_forward: whether the given solver runs; taped_steps_after_solve: steps on the tape after it;
    # reaches_initial_state: whether z0 gets a gradient (the adjoint kind: an exact zero)
    m, x, _ = linear_problem(n=4, batch=2, spectral_radius=0.5)
    params = {k: v.clone().requires_grad_() for k, v in m.params.items()}
    z0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    calls: list = []
    forward = _CountingIterate(tol=1e-12, max_iter=500, warn=False, calls=calls)
    record = fpgrad.estimators.CostRecord()
    z = est.apply(m.step, params, x, z0, forward, record)
    assert (len(calls) > 0) is est.uses_forward
    if est.uses_forward:
        assert record.backward_steps == est.taped_steps_after_solve
    g_z0 = torch.autograd.grad(z.square().sum(), z0, allow_unused=True)[0]
    assert (g_z0 is not None) is est.reaches_initial_state
    if est.adjoint:
        assert torch.equal(g_z0, torch.zeros_like(z0))


# ---- third-party estimators: defined here, used through every public call with no change to fpgrad ----------

@dataclass(frozen=True)
class RichardsonAdjoint(Estimator):
    """An adjoint estimator with only the adjoint hook: u <- g + J^T u, `sweeps` times."""

    sweeps: int = 120
    name = "richardson"

    def adjoint_vector(self, lin, g, record):
        u = g.clone()
        for _ in range(self.sweeps):
            u = g + lin.JT(u)
        return u


@dataclass(frozen=True)
class TapedIterations(Estimator):
    """A native estimator with only `apply`: T plain steps from z0 on the tape (the forward solver unused)."""

    T: int = 120
    name = "taped_iterations"

    def apply(self, step, params, x, z0, forward, record):
        z = z0
        for _ in range(self.T):
            z = step(params, z, x)
        record.backward_steps += self.T
        return z

    @property
    def uses_forward(self) -> bool:
        return False


@dataclass(frozen=True)
class LegacyNative(Estimator):
    """A native estimator written for the earlier protocol (the `differentiate` hook)."""

    T: int = 120
    name = "legacy"

    def differentiate(self, step, params, x, z0, forward, record):
        z = z0
        for _ in range(self.T):
            z = step(params, z, x)
        return z


THIRD_PARTY = [RichardsonAdjoint(), TapedIterations(), LegacyNative()]


def _closed_form_gradient(m, x, w):
    """d/d(A, B, x) of <w, z*> with z* = (I - A)^{-1} B x by dense algebra (the independent reference)."""
    A, B, xx = (t.detach().clone().requires_grad_() for t in (m.params["A"], m.params["B"], x))
    z = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - A, B @ xx.T).T
    return torch.autograd.grad((w * z).sum(), (A, B, xx))


@pytest.mark.parametrize("est", THIRD_PARTY, ids=lambda e: e.name)
def test_third_party_estimator_through_fixed_point_matches_the_closed_form(est):
    m, x, _ = linear_problem(n=5, batch=3, spectral_radius=0.5)
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A, B = (t.clone().requires_grad_() for t in (m.params["A"], m.params["B"]))
    xx = x.clone().requires_grad_()
    z = fpgrad.fixed_point(m.step, {"A": A, "B": B}, xx, torch.zeros(3, 5, dtype=torch.float64), forward=TIGHT,
                           backward=est)
    got = torch.autograd.grad((w * z).sum(), (A, B, xx))
    for g, ref in zip(got, _closed_form_gradient(m, x, w)):
        assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("est", THIRD_PARTY, ids=lambda e: e.name)
def test_third_party_estimator_through_fpgrad_gradient_and_compare(est):
    m, x, _ = linear_problem(n=5, batch=3, spectral_radius=0.5)
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = fpgrad.gradient(m, x, lambda z: (w * z).sum(), estimator=est, forward=TIGHT)
    ref_A, ref_B, ref_x = _closed_form_gradient(m, x, w)
    assert torch.allclose(g.params["A"], ref_A, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g.params["B"], ref_B, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g.x, ref_x, rtol=1e-9, atol=1e-12)
    assert g.estimator == est.name
    if est.adjoint:                                   # sweeps products with J^T, then one pullback
        assert g.cost.vjps == est.sweeps + 1
    row, = compare_estimators(m, x, lambda z: (w * z).sum(), [est], forward=TIGHT)
    assert row["estimator"] == repr(est) and row["relative_error"] < 1e-8


def _contractive_module(backward, **kw) -> ImplicitSlotAttention:
    module = ImplicitSlotAttention(8, 3, backward=backward, seed=0, **kw).double()
    with torch.no_grad():                  # shrink the recurrent weights: a clearly contractive step
        for p in (module.gru.weight_hh, module.to_q.weight, module.mlp[2].weight):
            p.mul_(0.3)
    return module


def _module_grads(module, inputs, noise):
    module.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (module(inputs, noise=noise) ** 2).sum().backward()
    return {k: p.grad for k, p in module.named_parameters()}


def test_third_party_adjoint_estimator_in_the_slot_attention_module_matches_implicit():
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen)
    noise = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen)
    kw = dict(iters=300, tol=1e-12, forward="anderson")
    ours = _module_grads(_contractive_module(RichardsonAdjoint(sweeps=150), **kw), inputs, noise)
    ref = _module_grads(_contractive_module(Implicit(solver="dense"), **kw), inputs, noise)
    for k, g in ref.items():
        assert ours[k] is not None, k
        assert torch.allclose(ours[k], g, rtol=1e-7, atol=1e-10), k
    assert _contractive_module(RichardsonAdjoint()).parameters_without_grad() == []


@pytest.mark.parametrize("est", [TapedIterations(T=4), LegacyNative(T=4)], ids=lambda e: e.name)
def test_third_party_native_estimator_in_the_slot_attention_module_matches_unrolled(est):
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen)
    noise = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen)
    ours = _module_grads(_contractive_module(est, iters=4), inputs, noise)
    ref = _module_grads(_contractive_module("unrolled", iters=4), inputs, noise)
    for k, g in ref.items():
        assert ours[k] is not None, k
        assert torch.allclose(ours[k], g, rtol=1e-10, atol=1e-12), k
    assert _contractive_module(est).parameters_without_grad() == []


def test_an_estimator_without_either_hook_says_what_to_implement():
    @dataclass(frozen=True)
    class Empty(Estimator):
        name = "empty"

    m, x, _ = linear_problem(n=3, batch=2)
    with pytest.raises(NotImplementedError, match=r"apply\(.*adjoint_vector\("):
        fpgrad.fixed_point(m.step, m.params, x, torch.zeros(2, 3, dtype=torch.float64), backward=Empty())


def test_fixed_point_refuses_a_reference_estimator_and_names_the_exact_backward():
    m, x, _ = linear_problem(n=3, batch=2)
    with pytest.raises(ValueError, match=r"reference for fpgrad.gradient.*Implicit\(solver='dense'\)"):
        fpgrad.fixed_point(m.step, m.params, x, torch.zeros(2, 3, dtype=torch.float64), backward=FiniteDifference())


def test_fpgrad_gradient_asks_is_reference_not_the_class():
    @dataclass(frozen=True)
    class ConstantReference(Estimator):
        name = "constant"
        is_reference = True

        def compute(self, m, x, loss_fn, z0=None, generator=None):
            zero = {k: torch.zeros_like(v) for k, v in m.params.items()}
            return fpgrad.estimators.Gradient(zero, torch.zeros_like(x), x, torch.tensor(0.0), fpgrad.estimators.Cost(),
                                             self.name)

    m, x, _ = linear_problem(n=3, batch=2)
    g = fpgrad.gradient(m, x, lambda z: z.sum(), estimator=ConstantReference())
    assert g.estimator == "constant" and float(g.flat().abs().sum()) == 0.0


# ---- imports run one way: autograd -> estimators -> forward ---------------------------------------------------

_IMPORT_PROBE = """
import sys, types, torch
pkg = types.ModuleType("fpgrad"); pkg.__path__ = [{path!r}]; sys.modules["fpgrad"] = pkg   # skip fpgrad/__init__
import fpgrad.estimators as E
from fpgrad.forward import Iterate
A = torch.tensor([[0.5, 0.1], [0.0, 0.4]], dtype=torch.float64)
step = lambda p, z, x: z @ p["A"].T + x
for est in (E.Unrolled(3), E.Truncated(2), E.Truncated(1, T=3), E.OneStep(), E.OneStep(straight_through=True),
            E.Neumann(2), E.Phantom(2, 0.5), E.Implicit(solver="dense")):
    p = {{"A": A.clone().requires_grad_()}}
    z = est.apply(step, p, torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64),
                  Iterate(tol=1e-12, max_iter=200), E.CostRecord())
    z.sum().backward()
    assert p["A"].grad is not None, est
assert "fpgrad.autograd" not in sys.modules, sorted(m for m in sys.modules if m.startswith("fpgrad"))
print("ok")
"""


def test_estimators_import_and_run_without_importing_autograd():
    probe = _IMPORT_PROBE.format(path=str(ROOT / "fpgrad"))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("package", ["estimators", "forward"])
def test_no_module_of_the_lower_layers_imports_autograd(package):
    # also catches an import inside a function (the old cycle was a lazy import in Truncated / OneStep)
    for path in sorted((ROOT / "fpgrad" / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [(node.module or "")] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("autograd" in n.split(".") and "torch" not in n for n in names), (path.name, names)


def test_solve_detached_is_the_forward_package_one_and_still_importable_from_autograd():
    from fpgrad.autograd import solve_detached as old
    from fpgrad.forward import solve_detached
    assert old is solve_detached
