"""The `training` study end to end in its --quick setting: rows with every tracked series, files written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from fpgrad.study import RowStore, run_study
from studies.training import ESTIMATORS, STUDY, grid

SERIES = ["losses", "grad_norms", "log_step", "loss", "residual", "probe_step", "cosine_one_step_all",
          "cosine_unrolled_all", "spectral_step", "rho_T", "rho_star"]
FILES = ["README.md", "results.csv", "summary.csv", "rows.jsonl"]
FIGURES = ["loss.png", "grad_norm.png", "spectral_radius.png", "residual.png", "cosine.png", "eval_bars.png",
           "iterations.png", "ablations.png", "examples.png"]


def test_quick_grid_covers_every_estimator_and_ablation():
    configs = grid(True)
    assert {c["estimator"] for c in configs} == set(ESTIMATORS)
    assert {c["ablation"] for c in configs} == {"base", "clip", "warmup", "iters7"}
    full = grid(False)
    assert len({c["seed"] for c in full if c["ablation"] == "base"}) == 3


def test_quick_run_writes_rows_tables_figures_and_readme(tmp_path):
    rows = run_study(STUDY, tmp_path, quick=True, progress=False)
    assert len(rows) == len(grid(True))
    for row in rows:
        c = row["config"]
        for key in SERIES:
            assert isinstance(row[key], list) and row[key], key
            assert all(isinstance(v, (int, float)) for v in row[key]), key
        assert len(row["losses"]) == c["steps"] and row["diverged_at"] is None
        assert all(math.isfinite(v) for v in row["losses"])
        assert len(row["fg_ari"]) == len(row["mse"]) == len(c["eval_iters"])
        assert isinstance(row["spikes"], int)
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (tmp_path / "figures" / name).stat().st_size > 0, name
    readme = (tmp_path / "README.md").read_text()
    assert "## Reading" in readme and "fpgrad study training --quick" in readme
    assert len((tmp_path / "results.csv").read_text().splitlines()) == len(rows) + 1


def test_same_config_same_row():
    config = {**grid(True)[1], "quick": True}
    a, b = STUDY.run(config), STUDY.run(config)
    assert a["losses"] == b["losses"] and a["fg_ari"] == b["fg_ari"]


def test_cli_quick_run(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "fpgrad", "study", "training", "--quick", "--out", str(out), "--quiet"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").exists() and (out / "figures" / "loss.png").exists()
    records = RowStore(out / "rows.jsonl").records()
    assert len(records) == len(grid(True))
    assert json.loads((out / "rows.jsonl").read_text().splitlines()[0])["row"]["losses"]


def test_study_and_reuse_benchmark_share_one_setting():
    from fpgrad.setting import BASE_RUN, autoencoder_settings
    from studies.training import ablation_settings, settings
    for quick in (True, False):
        assert settings(quick) == autoencoder_settings(quick)
        assert ablation_settings("base", settings(quick)) == BASE_RUN


def test_committed_report_regenerates_from_its_stored_rows():
    """results.csv and summary.csv are rebuilt byte for byte from reports/training/rows.jsonl, and every
    paragraph of the reading is the committed README's (nothing rerun)."""
    from fpgrad.study import config_key
    from fpgrad.study_tools import csv_text
    from studies.training.reading import reading
    from studies.training.tables import run_table, summary_table
    report = Path(__file__).parents[1] / "reports" / "training"
    configs = [{**c, "quick": False} for c in grid(False)]
    by_key = {r["key"]: r["row"] for r in RowStore(report / "rows.jsonl").records()}
    rows = [{**by_key[config_key(c)], "config": c} for c in configs]
    more = max(rows[0]["eval_iters"])
    table = run_table(rows)
    summary = summary_table(table, more)
    assert csv_text(table, list(table[0])) == (report / "results.csv").read_text()
    assert csv_text(summary, list(summary[0])) == (report / "summary.csv").read_text()
    readme = (report / "README.md").read_text()
    paragraphs = reading(table, summary, more, rows[0]["config"]["iters"], rows)
    assert len(paragraphs) == 8 and all(p in readme for p in paragraphs)


def test_the_committed_report_carries_the_discovery_arms_claims_from_their_stored_rows():
    """reports/training/README.md reads the paper's claims from the discovery arms (issue #20): the table between
    its markers is claims_table of the stored arm rows, as claims.md is (nothing rerun)."""
    from studies import discovery
    report = Path(__file__).parents[1] / "reports" / "training" / "README.md"
    text = report.read_text()
    inside = text.split(discovery.CLAIMS_START, 1)[1].split(discovery.CLAIMS_END, 1)[0]
    arms = Path(__file__).parents[1] / "reports" / "discovery" / "arms"
    stored = (arms / "claims.md").read_text()
    assert inside == "\n" + discovery.claims_in_training(stored)         # written together by --arms-readme
    # the verdicts change only when a run finishes (the targets below them at every row of a running arm)
    def claims(text):
        return text.split("## The issue's targets")[0]
    assert claims(stored) == claims(discovery.claims_table(arms))


def test_refreshing_the_claims_replaces_only_the_text_between_the_markers(tmp_path):
    from studies import discovery
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{discovery.CLAIMS_START}\nold\n{discovery.CLAIMS_END}\nafter\n")
    assert discovery.refresh_training_readme("| new |\n\n## The issue's targets\n\nx\n", readme)
    assert readme.read_text() == (f"# T\n\nbefore\n{discovery.CLAIMS_START}\n| new |\n\n### The issue's targets\n\nx\n"
                                  f"{discovery.CLAIMS_END}\nafter\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    assert not discovery.refresh_training_readme("| new |\n", bare) and bare.read_text() == "no markers\n"
    assert not discovery.refresh_training_readme("| new |\n", tmp_path / "missing.md")
