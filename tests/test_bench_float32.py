"""The benchmarks' --dtype option (issue #19 part 2): float32 reaches the maps, the solvers and the JSON, the
references stay float64, float64 stays the default, and benchmarks.targets / run_all know the float32 folder."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import _common as C


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory):
    """benchmarks.memory --quick at T = 5, 8 in both dtypes, laid out as reports/benchmarks is."""
    from benchmarks import memory
    root = tmp_path_factory.mktemp("reports")
    memory.main(["--quick", "--T", "5", "8", "--out", str(root / "memory.json")])
    memory.main(["--quick", "--T", "5", "8", "--dtype", "float32", "--out", str(root / "float32" / "memory.json")])
    return root, C.load("memory", root), C.load("memory", root / "float32")


def test_float32_run_says_so_and_its_saved_tensors_are_float32(memory_runs):
    _, d64, d32 = memory_runs
    assert d64["dtype"] == "float64" and d32["dtype"] == "float32"
    pairs = [(r64, r32) for m64, m32 in zip(d64["results"]["maps"], d32["results"]["maps"], strict=True)
             for r64, r32 in zip(m64["rows"], m32["rows"], strict=True)]
    assert len(pairs) == 12
    for r64, r32 in pairs:
        for T in (5, 8):
            # the same tensors saved, each of 4 bytes per element instead of 8: params, inputs and z0 were float32
            assert r64[f"bytes T={T}"] == 2 * r32[f"bytes T={T}"], (r64["estimator"], T)
            assert r64[f"raw bytes T={T}"] == 2 * r32[f"raw bytes T={T}"], (r64["estimator"], T)


def test_default_is_float64_and_the_default_path_follows_the_dtype(tmp_path, monkeypatch):
    p = C.parser("memory", "x", dtype=True)
    args = p.parse_args([])
    assert args.dtype == "float64" and C.dtype_of(args) is torch.float64
    assert C.dtype_of(p.parse_args(["--dtype", "float32"])) is torch.float32
    monkeypatch.setattr(C, "REPORTS", tmp_path)
    for argv, path in (([], tmp_path / "probe.json"), (["--dtype", "float32"], tmp_path / "float32" / "probe.json")):
        run = C.Run("probe", argparse.Namespace(**{**vars(p.parse_args(["--quick", *argv])), "out": None}))
        assert run.save({}) == path
        assert C.load("probe", path.parent)["dtype"] == ("float32" if argv else "float64")


def test_benchmarks_without_the_option_reject_it_and_stay_float64():
    p = C.parser("reuse", "x")
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "float32"])
    assert C.dtype_of(p.parse_args([])) is torch.float64


@pytest.fixture(scope="module")
def tanh_problem():
    """A small tanh map at its float64 fixed point, and the adjoint problem of its float32 cast."""
    import fpgrad
    from benchmarks.adjoint_solve import make_problem
    from fpgrad.maps.toy import _tanh_step
    m = fpgrad.maps.tanh_rnn(40, 0.8, seed=3)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = C._tanh_fixed_point(m, x)
    tuned = C.TunedMap("tanh n=40", _tanh_step, dict(m.params), x, z, 0.8)
    return tuned, make_problem(tuned.to(torch.float32), seed=0)


def test_cast_map_keeps_float64_references(tanh_problem):
    from fpgrad.jacobian import Jacobian
    tuned, problem = tanh_problem
    assert problem.tuned.dtype is torch.float32 and problem.tuned.ref is tuned
    assert problem.g.dtype is torch.float32 and problem.target_z.dtype is torch.float32
    assert all(v.dtype is torch.float32 for v in problem.tuned.params.values())
    assert problem.u_ref.dtype is torch.float64
    # u_ref solves the float64 system (an independent dense solve here, from the float64 map)
    J = Jacobian(tuned.step, tuned.params, tuned.x, tuned.z).dense()[0]
    g64 = (tuned.z - problem.target_z.double()).reshape(-1)
    u = torch.linalg.solve(torch.eye(40, dtype=torch.float64) - J.T, g64)
    assert torch.allclose(problem.u_ref[0], u, rtol=1e-5, atol=1e-6)
    # the products the solvers see are float32
    assert problem.jac.JT(problem.g).dtype is torch.float32


def test_float32_solver_is_judged_against_the_float64_reference_at_float32_targets(tanh_problem):
    from benchmarks.adjoint_solve import TOLERANCES, Solver, _fpgrad, cost_to_targets, make_problem
    _, problem = tanh_problem
    tol = TOLERANCES[torch.float32]
    assert tol.targets == (1e-3, 1e-4)
    gmres = Solver("gmres", "fpgrad", _fpgrad("gmres", restart="budget"), cap=200)
    res = cost_to_targets(gmres, problem.jac, problem.g, problem.u_ref, tol.targets)
    hit = res["targets"]["0.0001"]
    assert hit is not None and hit["error"] <= 1e-4
    # float32 round-off: the error against the float64 reference levels off far above float64's
    floor = res["floor"]
    assert floor["error"] == min(e["error"] for e in res["evaluations"])
    assert floor["largest_budget"] >= min(4 * hit["budget"], 200)
    assert 1e-9 < floor["error"] < 1e-4
    # the same solver on the float64 problem (same map, same g) goes far below it
    tuned, _ = tanh_problem
    p64 = make_problem(tuned, seed=0)
    assert p64.g.dtype is torch.float64
    res64 = cost_to_targets(gmres, p64.jac, p64.g, p64.u_ref, TOLERANCES[torch.float64].targets)
    assert res64["floor"]["error"] < 1e-10


def test_targets_for_judges_a_float32_run_at_its_own_tolerance():
    from benchmarks.adjoint_solve import TOLERANCES, targets_for, tolerances_of
    tol = TOLERANCES[torch.float32]
    stored = {"tolerances": {"targets": list(tol.targets), "forward_tol": tol.forward_tol,
                             "backward_tol": tol.backward_tol, "gradient_accept": tol.gradient_accept}}
    assert tolerances_of(stored) == tol and tolerances_of({}) == TOLERANCES[torch.float64]

    def row(library, products):
        hit = {"vjps": products, "jvps": 0, "seconds_median": products * 1e-3}
        return {"library": library, "solver": "s", "exact": True,
                "targets": {"0.001": hit, "0.0001": hit, "1e-06": None}}
    rows = [row("fpgrad", 20), row("torchdeq", 25)]
    out = targets_for("m", rows, None, tol)
    assert [t["target"] for t in out] == ["adjoint products (VJP + JVP) to 1e-4, m", "adjoint time to 1e-4, m"]
    assert all(t["met"] for t in out)
    # the same rows judged at float64's 1e-6, which nobody reached: not measured
    t64 = targets_for("m", rows, None)
    assert [(t["target"], t["met"]) for t in t64] == [("adjoint products to 1e-6, m", None)]


def test_readme_pairs_float32_with_float64(memory_runs, tmp_path):
    from benchmarks import targets
    root, d64, d32 = memory_runs
    text = targets.render(root)
    assert "## float32 beside float64" in text
    section = text.split("## float32 beside float64")[1]
    first = d32["targets"][0]
    line = next(ln for ln in section.splitlines() if first["target"] in ln)
    twin = next(t for t in d64["targets"] if t["target"] == first["target"])
    assert f"| {twin['value']} (met) | {first['value']} (met) |" in line
    assert "| adjoint_solve | (float32 not run) |" in section
    met = sum(t["met"] is True for t in d32["targets"])
    missed = sum(t["met"] is False for t in d32["targets"])
    assert f"float32: {met} met, {missed} missed" in section
    assert "float32's sizes" not in section
    # a float64 run at the float32 run's sizes beside it (float32/NAME.float64.json) gets its own column
    twin_dir = tmp_path / "twin"
    (twin_dir / "float32").mkdir(parents=True)
    (twin_dir / "float32" / "memory.json").write_text((root / "float32" / "memory.json").read_text())
    (twin_dir / "float32" / "memory.float64.json").write_text((root / "memory.json").read_text())
    section = targets.render(twin_dir).split("## float32 beside float64")[1]
    line = next(ln for ln in section.splitlines() if first["target"] in ln)
    assert f"| - | {twin['value']} (met) | {first['value']} (met) |" in line
    # without a float32 folder there is no section
    (tmp_path / "memory.json").write_text((root / "memory.json").read_text())
    assert "float32 beside float64" not in targets.render(tmp_path)


def test_run_all_float32_runs_only_the_dtype_benchmarks_in_float32(monkeypatch):
    import importlib

    from benchmarks import run_all
    from benchmarks.targets import FLOAT32
    calls = []
    for name in run_all.BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        monkeypatch.setattr(module, "main", lambda argv, name=name: calls.append((name, argv)) or 0)
    monkeypatch.setattr(importlib.import_module("benchmarks.targets"), "main",
                        lambda argv: calls.append(("targets", argv)))
    assert run_all.main(["--quick", "--dtype", "float32"]) == 0
    assert calls == [(n, ["--quick", "--dtype", "float32"]) for n in run_all.BENCHMARKS if n in FLOAT32] + [
        ("targets", [])]
    calls.clear()
    run_all.main(["--only", "vmap", "reuse"])
    assert calls == [("vmap", []), ("reuse", []), ("targets", [])]
