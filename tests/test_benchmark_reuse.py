"""Smoke test of benchmarks.reuse (issue #10): its quick mode runs every strategy on every setting it applies to
and each one reaches the 1e-6 adjoint accuracy on every step (the benchmark itself is run with
`python -m benchmarks.reuse`)."""

from __future__ import annotations


def test_reuse_quick_run_has_every_strategy_with_verified_accuracy(tmp_path):
    from benchmarks import _common, reuse
    assert reuse.main(["--quick", "--out", str(tmp_path / "reuse.json")]) == 0
    results = _common.load("reuse", tmp_path)["results"]
    assert (tmp_path / results["figure"]).exists()
    strategies = {s["name"]: s for s in results["strategies"]}
    assert {"cold gmres", "shine precondition", "shine guess", "warm start", "mixed precision"} <= set(strategies)
    assert ("recycle" in strategies) == results["recycling"]
    assert [s["setting"] for s in results["settings"]] == ["tanh", *reuse.SLOT_VARIANTS]
    for setting in results["settings"]:
        kind = "tanh" if setting["setting"] == "tanh" else "slot"
        applies = {name for name, s in strategies.items() if kind in s["settings"]
                   and (setting["config"].get("forward", "broyden") == "broyden"
                        or "forward" not in (s["options"].get("precondition"), s["options"].get("initial_guess")))}
        rows = {r["strategy"]: r for r in setting["summary"]}
        assert set(rows) == applies, setting["label"]
        for name, row in rows.items():
            assert row["verified"] and row["max_error"] <= results["accuracy"], (setting["label"], name, row)
            assert row["mean_vjps"] > 0
        for entry in setting["steps"]:                       # the stateful strategies ran on every step
            assert {n for n in applies if strategies[n]["state"]} <= set(entry["strategies"])
