"""`python -m benchmarks.gpu --dry-run`: the GPU check's CPU-side parts at tiny sizes write every section's JSON,
with host syncs per iteration counted for each forward and Krylov loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu
from benchmarks._sync import SyncCounter, syncs_per_iteration


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    assert gpu.main(["--dry-run", "--out", str(out)]) == 0
    return out, {name: json.loads((out / f"{name}.json").read_text()) for name in gpu.SECTIONS}


def test_dry_run_writes_every_section_and_the_readme(dry_run):
    out, sections = dry_run
    for name, payload in sections.items():
        assert payload["section"] == name and payload["dry_run"] is True and payload["dtype"] == "float32"
        assert payload["skipped_for_time"] == []
    assert "## GPU check (cpu, dry run on tiny sizes)" in (out / "README.md").read_text()
    assert all(v["status"].startswith("skipped (dry run") for v in sections["tests"]["results"].values())


def test_dry_run_counts_syncs_per_iteration_for_every_forward_and_krylov_loop(dry_run):
    rows = dry_run[1]["syncs"]["results"]
    maps = {r["map"] for r in rows}
    for m in maps:
        solvers = {(r["loop"], r["solver"].split(" ")[0]) for r in rows if r["map"] == m and r["library"] == "fpgrad"}
        assert {("forward", "iterate"), ("forward", "anderson"), ("forward", "broyden"), ("adjoint", "gmres"),
                ("adjoint", "bicgstab"), ("adjoint", "cg_normal"), ("adjoint", "neumann")} <= solvers
    for r in rows:
        assert math.isfinite(r["per_iteration"]) and r["per_iteration"] >= 0, r
        assert r["counts"][1] >= r["counts"][0], r


def test_dry_run_reaches_the_adjoint_tolerance_with_fpgrad_gmres(dry_run):
    rows = dry_run[1]["adjoint"]["results"]
    for r in rows:
        if r["library"] == "fpgrad" and r["solver"].startswith("gmres"):
            assert r["reached"] and r["relative_residual"] <= gpu.TOL, r


def test_dry_run_end_to_end_rows_agree_with_fpgrad_implicit_where_they_solve_the_same_system(dry_run):
    rows = [r for r in dry_run[1]["end_to_end"]["results"] if r["map"].startswith("tanh")]
    implicit = next(r for r in rows if "Implicit" in r["method"])
    assert implicit["difference_to_fpgrad_implicit"] == 0.0 and implicit["seconds_median"] > 0
    for r in rows:
        if r["library"] in ("torchdeq", "torchopt"):
            assert r["difference_to_fpgrad_implicit"] <= 1e-2, r


def test_memory_rows_show_unrolled_saving_more_as_T_grows_and_one_step_not(dry_run):
    rows = [r for r in dry_run[1]["memory"]["results"] if r["map"].startswith("slot")]
    saved = {(r["estimator"], r["T"]): r["saved_bytes_upper_bound"] for r in rows}
    (t1, t2) = sorted({r["T"] for r in rows})
    assert saved[("unrolled", t2)] > 2 * saved[("unrolled", t1)]
    assert saved[("one_step", t2)] == saved[("one_step", t1)]


def test_sync_counter_counts_item_bool_tolist_and_nonzero_on_cpu():
    t = torch.tensor([1.0, 0.0])
    with SyncCounter("cpu") as counter:
        t.sum().item()
        bool(t.any())
        t.tolist()
        t.nonzero()
        float(t[0])
    assert counter.count == 5 and counter.by_kind["nonzero"] == 1
    t.sum().item()                    # outside the block: no longer counted (the patches are undone)
    assert counter.count == 5


def test_syncs_per_iteration_separates_per_iteration_from_per_call_syncs():
    t = torch.ones(2)

    def run(T):
        bool(t.all())                 # once per call
        for _ in range(T):
            t.sum().item()            # twice per iteration
            bool(t.any())
    r = syncs_per_iteration(run, "cpu", low=2, high=6)
    assert r["per_iteration"] == 2 and r["per_call"] == 1


def test_sync_section_silences_solver_warnings_but_keeps_the_sync_debug_warnings():
    import warnings
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        with gpu._quiet_but_syncs():
            warnings.warn("called a synchronizing CUDA operation")
            warnings.warn("fpgrad.solve: did not converge")
    assert [str(r.message) for r in records] == ["called a synchronizing CUDA operation"]


def test_dry_run_times_each_check_period_with_the_device_default_marked(dry_run):
    rows = dry_run[1]["check_every"]["results"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["map"], r["loop"], r["solver"]), []).append(r)
    assert {k[2] for k in groups} == {"anderson", "iterate", "gmres", "bicgstab"}
    for key, group in groups.items():
        assert [r["check_every"] for r in group] == list(gpu.CHECK_PERIODS), key
        assert [r["check_every"] for r in group if r["default"]] == [1], key       # the CPU default
        for r in group:
            assert r["relative_residual"] <= 2 * gpu.TOL and r["seconds_median"] > 0, r


def test_readme_is_rewritten_from_the_stored_json_alone(dry_run, tmp_path):
    out, _ = dry_run
    for name in gpu.SECTIONS:
        (tmp_path / f"{name}.json").write_text((out / f"{name}.json").read_text())
    assert gpu.main(["--readme-from", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == (out / "README.md").read_text()
    assert "fpgrad's end-to-end gradient time <= TorchDEQ's" in (tmp_path / "README.md").read_text() or \
        not any(r["library"] == "torchdeq" for r in json.loads((out / "end_to_end.json").read_text())["results"])


def test_a_case_that_raises_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(case, s):
        if case.name.startswith("slot"):
            raise RuntimeError("CUDA error: an illegal memory access")
        return [{"map": case.name, "estimator": "x", "T": 1, "saved_bytes_upper_bound": 0, "peak_bytes": None,
                 "seconds_median": 1.0}]
    monkeypatch.setattr(gpu, "run_memory", broken)
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--only", "memory"]) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())["results"]
    assert "illegal memory access" in rows[0]["error"] and rows[1]["seconds_median"] == 1.0
    assert "illegal memory access" in (tmp_path / "README.md").read_text()


def test_cases_left_after_the_budget_are_marked_skipped(tmp_path):
    # a section starts only within the budget: at 0 s it is skipped whole and listed as such
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--only", "memory", "--budget-seconds", "0"]) == 0
    assert not (tmp_path / "memory.json").exists()
    assert "Sections skipped when the time budget was spent: memory." in (tmp_path / "README.md").read_text()
    # and within a section, the cases left once the budget is spent are rows marked skipped
    s = gpu.Settings(torch.device("cpu"), True, 1, 10, (10,), (3,))
    cases = gpu.cases(s, 0)
    rows = gpu._run_section("memory", gpu.run_memory, cases, s, started=0.0, budget=-1.0)
    assert rows == [{"map": c.name, "skipped_for_time": True} for c in cases]


def test_dry_run_profiles_fpgrad_and_torchdeq_end_to_end(dry_run):
    rows = dry_run[1]["profile"]["results"]
    assert rows and all(r["aten_ops"] > 0 and r["host_self_ms"] > 0 and r["top"] for r in rows)
    assert any("Implicit" in r["method"] for r in rows)


def test_benchmarks_readme_gains_a_gpu_section_from_the_stored_run(dry_run, tmp_path):
    from benchmarks.targets import gpu_section
    assert gpu_section(tmp_path) == []                     # no GPU run stored: no section
    out, _ = dry_run
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "end_to_end.json").write_text((out / "end_to_end.json").read_text())
    (tmp_path / "gpu" / "NOTES.md").write_text("## Reading\n\nthe numbers say\n")
    lines = gpu_section(tmp_path)
    assert lines[0] == "## GPU" and "### Reading" in lines and "the numbers say" in lines
    if any(r["library"] == "torchdeq" for r in json.loads((out / "end_to_end.json").read_text())["results"]):
        assert any("ratio" in line for line in lines)
