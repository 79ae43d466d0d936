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
