"""The cost-scaling study: its quick setting runs end to end, its memory numbers say what they must, it resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpgrad.study import RowStore, config_key, run_study
from studies import cost_scaling
from studies.cost_scaling import STUDY, TRUNCATED_K

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
DETERMINISTIC = ("label", "bytes_saved", "bytes_saved_repeat", "vjps", "jvps", "forward_steps", "backward_steps",
                 "adjoint_iterations", "adjoint_converged", "loss", "forward_relative_residual", "num_params")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost-scaling")
    rows = run_study(STUDY, out, quick=True, progress=False)
    return out, rows


def _by(rows, estimator):
    return sorted((r for r in rows if r["config"]["estimator"] == estimator), key=lambda r: r["config"]["T"])


def test_study_is_registered():
    import studies
    assert studies.get_study("cost-scaling") is STUDY


def test_quick_run_writes_tables_figures_and_readme(quick):
    out, rows = quick
    assert len(rows) == len(STUDY.grid(True))
    for name in ("README.md", "tables.md", "cost.csv", "MiB_by_T.csv", "bytes_vs_unrolled_by_T.csv", "ms_by_T.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("bytes_vs_T.png", "time_vs_T.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    readme = (out / "README.md").read_text()
    assert "fpgrad study cost-scaling --quick" in readme and "## Reading" in readme
    assert "torch.set_num_threads(1)" in readme
    json.dumps(rows, allow_nan=False)


def test_unrolled_memory_grows_with_T(quick):
    _, rows = quick
    unrolled = _by(rows, "Unrolled")
    assert len(unrolled) >= 3
    bytes_ = [r["bytes_saved"] for r in unrolled]
    assert all(b > a for a, b in zip(bytes_, bytes_[1:], strict=False))
    assert [r["vjps"] for r in unrolled] == [r["config"]["T"] for r in unrolled]


@pytest.mark.parametrize("estimator", ["OneStep", "Implicit", "Neumann"])
def test_adjoint_and_one_step_memory_is_constant_in_T(quick, estimator):
    _, rows = quick
    mine = _by(rows, estimator)
    assert len({r["bytes_saved"] for r in mine}) == 1
    assert all(r["bytes_saved"] == r["bytes_saved_repeat"] for r in mine)


def test_truncated_memory_is_constant_once_T_reaches_k(quick):
    _, rows = quick
    mine = [r for r in _by(rows, "Truncated") if r["config"]["T"] >= TRUNCATED_K]
    assert len(mine) >= 2 and len({r["bytes_saved"] for r in mine}) == 1


def test_every_estimator_sees_exactly_T_forward_iterations(quick):
    _, rows = quick
    for r in rows:
        T = r["config"]["T"]
        name = r["config"]["estimator"]
        if name == "Unrolled":
            assert r["backward_steps"] == T and r["forward_steps"] == 0
        elif name == "Truncated":
            k = min(TRUNCATED_K, T)
            assert r["backward_steps"] == k
            # the T - k detached steps evaluate f T - k times: z_{T-k} feeds the taped steps, so its own
            # residual f(z_{T-k}) is not evaluated (Iterate.exactly(..., measure_last=False))
            assert r["forward_steps"] == (T - k if T > k else 0)
        else:
            assert r["forward_steps"] == T + 1                          # T iterations: f(z_0) ... f(z_T)


def test_unrolled_saves_more_than_one_step_at_the_largest_T(quick):
    _, rows = quick
    T = max(r["config"]["T"] for r in rows)
    unrolled = next(r for r in _by(rows, "Unrolled") if r["config"]["T"] == T)
    for name in ("OneStep", "Implicit", "Neumann", "Truncated"):
        other = next(r for r in _by(rows, name) if r["config"]["T"] == T)
        assert other["bytes_saved"] < unrolled["bytes_saved"], name


def test_cli_quick_run_then_resume_runs_only_the_missing_configs(tmp_path, quick):
    out = tmp_path / "cs"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "fpgrad", "study", "cost-scaling", "--quick", "--out", str(out),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "README.md").exists() and (out / "bytes_vs_T.png").exists()
    first = {r["key"]: r["row"] for r in RowStore(out / "rows.jsonl").records()}
    _, rows = quick
    for r in rows:                                  # another process, the same deterministic numbers
        assert {k: r[k] for k in DETERMINISTIC} == {k: first[config_key(r["config"])][k] for k in DETERMINISTIC}

    path = out / "rows.jsonl"
    lines = path.read_text().splitlines()
    drop = (0, 7, len(lines) - 1)
    removed = [json.loads(lines[i])["key"] for i in drop]
    path.write_text("\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n")
    calls = []

    def counting(config):
        calls.append(config_key(config))
        return cost_scaling.run(config)

    resumed = run_study(dataclasses.replace(STUDY, run=counting), out, quick=True, progress=False)
    assert sorted(calls) == sorted(removed)
    assert len(resumed) == len(STUDY.grid(True))
    for r in resumed:
        assert {k: r[k] for k in DETERMINISTIC} == {k: first[config_key(r["config"])][k] for k in DETERMINISTIC}
