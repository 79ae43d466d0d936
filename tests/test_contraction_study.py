"""studies/contraction_slot_attention.py: resumable rows + checkpoint, and its summary (rho, spikes)."""

from __future__ import annotations

import math

import pytest

from fpgrad.contraction import read_jsonl
from studies import contraction_slot_attention as study


def test_quick_run_resumes_from_its_checkpoint(tmp_path):
    common = ["--quick", "--arm", "penalty", "--probe-every", "2", "--ckpt-every", "2", "--out", str(tmp_path)]
    assert study.main([*common, "--steps", "3"]) == 0
    rows = read_jsonl(tmp_path / "penalty" / "rows.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (tmp_path / "penalty" / "ckpt.pt").exists()
    first = {r["step"]: r["loss"] for r in rows}
    assert study.main([*common, "--steps", "5"]) == 0       # resumes at 3 (the checkpoint after step 2)
    rows = read_jsonl(tmp_path / "penalty" / "rows.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(rows[i]["loss"] == first[i] for i in range(3))
    assert all("penalty" in r and r["rho_est_max"] > 0 for r in rows)
    probed = [r["step"] for r in rows if "rho_star_max" in r]
    assert probed == [0, 2, 4]
    s = study.summary(rows)
    assert s["steps"] == 5 and s["probes"] == 3 and math.isfinite(s["max_rho_star"])
    assert study.main(["--out", str(tmp_path), "--report", "--steps", "5"]) == 0
    text = (tmp_path.parent / "README.md").read_text()
    assert "penalty 5 of 5 steps" in text and "| penalty | 5 | 3 |" in text and "| 4 |" in text
    # rows without their checkpoint (e.g. a fresh clone): refused, never silently replaced
    (tmp_path / "penalty" / "ckpt.pt").unlink()
    with pytest.raises(SystemExit, match="--restart"):
        study.main([*common, "--steps", "5"])
    assert len(read_jsonl(tmp_path / "penalty" / "rows.jsonl")) == 5


def test_summary_counts_spikes_and_rho_over_one():
    rows = [{"step": i, "loss": 1.0, "seconds": 0.1, "ratio": r, "spike": r > 10, "spike5": r > 5}
            for i, r in enumerate([math.nan, 1.0, 12.0, 6.0, 1.0])]
    rows[1].update(rho_star_max=0.9, rho_T_max=0.95)
    rows[3].update(rho_star_max=1.2, rho_T_max=1.1)
    rows[4].update(rho_star_max="nan", rho_T_max=1.0)      # a failed fixed-point solve counts as not below 1
    s = study.summary(rows)
    assert s["spikes"] == 1 and s["spikes5"] == 2 and s["max_ratio"] == 12.0
    assert s["max_rho_star"] == 1.2 and s["probes_rho_star_ge_1"] == 2 and s["first_rho_star_ge_1"] == 3


def test_report_lists_the_variant_runs_beside_it_and_keeps_the_findings(tmp_path):
    """Variant folders beside the main runs get a row labelled from their stored configuration (the squared
    hinge included), and the hand-written FINDINGS.md is kept when --report rewrites the README."""
    main, variant = tmp_path / "slot_attention", tmp_path / "variant_sq"
    common = ["--quick", "--arm", "penalty", "--steps", "2", "--probe-every", "1"]
    assert study.main([*common, "--out", str(main)]) == 0
    assert study.main([*common, "--squared", "--weight", "0.5", "--target", "0.6", "--power-iters", "3",
                       "--seed", "1", "--out", str(variant)]) == 0
    (tmp_path / "FINDINGS.md").write_text("## Findings\n\nthe squared hinge helped\n")
    assert study.main(["--out", str(main), "--report", "--steps", "2"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| penalty squared, weight 0.5, target 0.6, 3 power steps, seed 1 (`variant_sq/`) | 2 |" in text
    assert "the squared hinge helped" in text and text.index("## Findings") < text.index("## Reproduce")
