"""Smoke test of the benchmarks: every module imports, and silent_failures (the one benchmark that asserts
correctness: fpgrad raises, warns or flags in every row where something is wrong) runs in its quick mode.

The benchmarks themselves are not part of the test suite; run them with `python -m benchmarks.run_all`.
"""

from __future__ import annotations

import importlib

import pytest

MODULES = ["_common", "adjoint_solve", "solver_overhead", "forward_solve", "memory", "spectral_radius",
           "silent_failures", "vmap", "targets", "run_all", "contraction", "recipe_overhead", "gpu"]



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

