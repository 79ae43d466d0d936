"""studies/discovery.py: a run stopped and rerun gives the rows of an uninterrupted run; settings are checked."""

from __future__ import annotations

import json

import pytest

from studies import discovery

VOLATILE = ("time", "wall_seconds", "cpu_seconds")       # measured, not computed


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_resumed_run_gives_the_same_rows_as_an_uninterrupted_run(tmp_path):
    config = discovery.config_of("", quick=True)
    whole = discovery.train(config, 6, tmp_path / "whole", progress=False)
    discovery.train(config, 2, tmp_path / "split", progress=False)
    split = discovery.train(config, 6, tmp_path / "split", progress=False)
    assert [r["step"] for r in whole] == [0, 2, 4, 6]
    assert stable(split) == stable(whole)
    assert stable(discovery.read_rows(tmp_path / "split" / "rows.jsonl")) == stable(whole)


def test_a_row_written_after_the_last_checkpoint_is_redone_on_resume(tmp_path):
    config = discovery.config_of("", quick=True)
    whole = discovery.train(config, 4, tmp_path / "whole", progress=False)
    discovery.train(config, 2, tmp_path / "cut", progress=False)
    with open(tmp_path / "cut" / "rows.jsonl", "a") as f:         # killed after the row, before the checkpoint
        f.write(json.dumps({**whole[-1], "fg_ari": -1.0}) + "\n")
    cut = discovery.train(config, 4, tmp_path / "cut", progress=False)
    assert stable(cut) == stable(whole)


def test_rerun_with_other_settings_is_refused(tmp_path):
    config = discovery.config_of("", quick=True)
    discovery.train(config, 2, tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        discovery.train({**config, "lr": 0.5}, 4, tmp_path, progress=False)


def test_a_run_stored_before_a_setting_was_added_resumes_with_its_default(tmp_path):
    config, run = discovery.config_of("", quick=True), tmp_path / "run"
    discovery.train(config, 2, run, progress=False)
    stored = json.loads((run / "config.json").read_text())
    del stored["decoder_first_kernel"]                            # as written before the setting existed
    (run / "config.json").write_text(json.dumps(stored))
    assert [r["step"] for r in discovery.train(config, 4, run, progress=False)] == [0, 2, 4]
    assert "decoder_first_kernel" not in discovery.table(tmp_path)


def test_learning_rate_warms_up_linearly_then_halves_every_half_life():
    config = {**discovery.DEFAULTS, "lr": 1e-3, "warmup": 10, "decay_half_life": 100}
    assert discovery.learning_rate(config, 0) == pytest.approx(1e-4 * 0.5 ** (0 / 100))
    assert discovery.learning_rate(config, 4) == pytest.approx(5e-4 * 0.5 ** (4 / 100))
    assert discovery.learning_rate(config, 200) == pytest.approx(1e-3 / 4)


def test_every_named_configuration_builds_and_unknown_names_are_refused():
    for name in discovery.CONFIGS:
        config = discovery.config_of(name)
        discovery.build_model(config)
        discovery.dataset(config)
    with pytest.raises(ValueError, match="unknown configuration"):
        discovery.config_of("no-such-run")


def test_cli_quick_writes_rows_and_the_readme_table(tmp_path):
    discovery.main(["--quick", "--out", str(tmp_path / "quick")])
    rows = discovery.read_rows(tmp_path / "quick" / "rows.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    text = discovery.table(tmp_path)
    assert "| quick |" in text and text.count("\n") == 3


def test_readme_table_is_replaced_between_its_markers_only():
    readme = f"intro\n{discovery.TABLE_START}\nold | table\n{discovery.TABLE_END}\nreading\n"
    out = discovery.fill_table(readme, "| new |\n")
    assert out == f"intro\n{discovery.TABLE_START}\n| new |\n{discovery.TABLE_END}\nreading\n"
    assert discovery.fill_table("no markers", "| new |\n") == "no markers"


def test_seed_override_names_the_run_and_changes_the_training(tmp_path):
    base = discovery.config_of("plain-fullres")
    one = discovery.config_of("plain-fullres", seed=1)
    assert one["name"] == "plain-fullres-s1" and one["seed"] == 1
    assert {k: v for k, v in one.items() if k not in ("seed", "name")} == \
        {k: v for k, v in base.items() if k not in ("seed", "name")}
    assert discovery.config_of("plain-fullres", seed=0)["name"] == "plain-fullres"
    quick0, quick1 = discovery.config_of("", quick=True), discovery.config_of("", quick=True, seed=1)
    a = discovery.train(quick0, 2, tmp_path / "a", progress=False)
    b = discovery.train(quick1, 2, tmp_path / "b", progress=False)
    assert a[0]["mse"] != b[0]["mse"]            # other parameters at step 0; the test scenes are the same
