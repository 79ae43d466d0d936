"""benchmarks/contraction.py runs in its quick mode and writes its JSON with the measured rows."""

from __future__ import annotations

import json


def test_contraction_benchmark_quick_mode_writes_its_rows(tmp_path):
    from benchmarks import contraction
    out = tmp_path / "contraction.json"
    assert contraction.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True
    results = data["results"]
    assert {r["method"] for r in results["frobenius"]["rows"]} >= {"fpgrad vjp", "fpgrad jvp"}
    assert all(abs(r["z_score"]) < 6 for r in results["frobenius"]["rows"])
    if results["frobenius"]["torchdeq"]:
        assert results["frobenius"]["max_rel_diff_same_probes"] < 1e-10
    assert results["spectral"]["products_per_warm_step"] == 10
    assert results["monitor"]["fraction_at_default_period"] > 0
    assert any(t["target"].startswith("Monitor cost") for t in data["targets"])
    # more warm power steps on the same trajectory: 4 products a step each (radius: a block of 2, both sides),
    # and 16 of them estimate rho better than the 2 the penalty trains with
    sweep = {int(k): v for k, v in results["spectral"]["warm_steps_sweep"].items()}
    assert [sweep[k]["products_per_step"] for k in (4, 8, 16)] == [4 * k + 2 for k in (4, 8, 16)]
    assert sweep[16]["median_rel_error_after_first"] < results["spectral"]["median_rel_error_after_first"]
