"""Smoke test of the benchmarks: every module imports, and silent_failures (the one benchmark that asserts
correctness: fpgrad raises, warns or flags in every row where something is wrong) runs in its quick mode.

The benchmarks themselves are not part of the test suite; run them with `python -m benchmarks.run_all`.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

MODULES = ["_common", "adjoint_solve", "solver_overhead", "forward_solve", "memory", "spectral_radius",
           "silent_failures", "vmap", "targets", "run_all", "contraction", "recipe_overhead", "gpu", "dispatch"]



@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    if name != "_common":
        assert callable(module.main)


@pytest.fixture(scope="module")
def silent_rows(tmp_path_factory):
    pytest.importorskip("torchdeq", reason="the bench extra (torchdeq) is not installed")
    pytest.importorskip("torchopt", reason="the bench extra (torchopt) is not installed")
    from benchmarks import _common, silent_failures
    out_dir = tmp_path_factory.mktemp("bench")
    silent_failures.main(["--quick", "--out", str(out_dir / "silent_failures.json")])
    return _common.load("silent_failures", out_dir)["results"]["rows"]


def test_fpgrad_raises_warns_or_flags_in_every_failure_row(silent_rows):
    for r in silent_rows:
        if r["informational"] or r["fpgrad"]["class"] == "n/a":
            continue
        assert r["fpgrad"]["class"] in ("raised", "warned", "flagged-in-result"), r


def test_truncated_series_at_unstable_fixed_point_carry_their_residual(silent_rows):
    # k terms cannot tell rho(J) >= 1; what fpgrad returns says the adjoint system is not solved, and how far
    row = next(r for r in silent_rows if r["case"].startswith("truncated Neumann"))
    assert row["fpgrad"]["class"] == "flagged-in-result", row["fpgrad"]
    assert "leaves a relative residual" in row["fpgrad"]["detail"]



def test_dispatch_counts_what_a_gpu_step_would_dispatch_with_cuda_check_periods(tmp_path):
    """The dispatch benchmark's counts move with what it claims to count: emulating the CUDA check period cuts
    fpgrad's host syncs (checks every 8 iterations, not every one), and the counts are positive integers."""
    import json

    import fpgrad
    from benchmarks import dispatch
    from benchmarks.gpu import tanh_case
    from fpgrad.estimators import Implicit
    case = tanh_case(64, 8, torch.device("cpu"), 0)
    run_ = lambda: fpgrad.fixed_point(case.step, case.params, case.x, case.z0,            # noqa: E731
                                      forward=fpgrad.forward.get_forward("anderson", tol=1e-4, max_iter=300),
                                      backward=Implicit(solver="gmres", tol=1e-4))
    plain = dispatch.count(run_)
    from fpgrad._checks import emulate_cuda_checks
    with emulate_cuda_checks():
        emulated = dispatch.count(run_)
    assert 0 < emulated["host_syncs"] < plain["host_syncs"]
    assert 0 < emulated["kernel_like_ops"] < emulated["top_level_ops"] * 3
    dispatch.main(["--quick", "--out", str(tmp_path / "dispatch.json")])
    rows = json.loads((tmp_path / "dispatch.json").read_text())["results"]["rows"]
    assert {r["library"] for r in rows} >= {"fpgrad"} and all(r["top_level_ops"] > 0 for r in rows)


def test_every_stored_benchmark_gets_its_table_in_the_rendered_readme():
    """Each committed JSON's section of reports/benchmarks/README.md carries its numbers, not only its description:
    a benchmark whose results have no renderer would show an empty section."""
    from pathlib import Path

    from benchmarks import targets

    out = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"
    text = targets.render(out)
    for name in ("recipe_overhead", "dispatch", "contraction", "memory", "vmap", "solver_overhead"):
        if not (out / f"{name}.json").exists():
            continue
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert "\n| " in section, f"{name}: no table rendered"
    rows = json.loads((out / "recipe_overhead.json").read_text())["results"]["rows"]
    section = text.split("\n## recipe_overhead\n", 1)[1].split("\n## ", 1)[0]
    assert all(f"| {r['size']} | {r['mode']} |" in section for r in rows)
