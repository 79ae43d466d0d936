"""studies/discovery_batch.py: several arms at once within a budget, packed into one archive (the GPU lease's
runner), resumable where they stopped."""

from __future__ import annotations

import json
import tarfile

import pytest

from studies import discovery, discovery_batch


def test_run_specs_are_parsed_and_bad_ones_named():
    assert discovery_batch.parse_run("one-step") == ("one-step", None, 0)
    assert discovery_batch.parse_run("unrolled:iters7@2") == ("unrolled", "iters7", 2)
    for bad, said in (("exact@1", "unknown arm"), ("one-step:fast", "unknown ablation"), ("one-step@x", "not an int")):
        with pytest.raises(ValueError, match=said):
            discovery_batch.parse_run(bad)


def test_a_batch_trains_its_runs_packs_them_and_a_stopped_one_resumes(tmp_path):
    root, archive = tmp_path / "arms", tmp_path / "out" / "arms.tar.gz"
    summary = discovery_batch.run_batch(["one-step", "neumann-5@1"], config="", steps=2, device=None, budget=300,
                                        root=root, archive=archive, quick=True, poll=0.2,
                                        per_archive=1)
    assert {s: r["finished"] for s, r in summary["runs"].items()} == {"one-step": True, "neumann-5@1": True}
    assert json.loads((tmp_path / "out" / "arms.json").read_text())["runs"]["one-step"]["last_row_step"] == 2
    assert summary["archives"] == ["arms.tar.gz", "arms-2.tar.gz"]          # one run an archive here
    with tarfile.open(archive) as tar:
        assert {"quick-one-step/rows.jsonl", "quick-one-step/ckpt.pt", "quick-one-step.log"} <= set(tar.getnames())
    with tarfile.open(tmp_path / "out" / "arms-2.tar.gz") as tar:
        assert "quick-neumann-5-s1/config.json" in tar.getnames()
    # the same runs through the study itself give the same rows (the batch only starts them)
    direct = discovery.train(discovery.config_of("", True, 1, "neumann-5"), 2, tmp_path / "direct", progress=False)
    batched = discovery.read_rows(root / "quick-neumann-5-s1" / "rows.jsonl")
    assert [(r["fg_ari"], r["mse"]) for r in batched] == [(r["fg_ari"], r["mse"]) for r in direct]
    # a budget that runs out stops the run; it keeps what it wrote and resumes from it
    stopped = discovery_batch.run_batch(["one-step"], config="", steps=10 ** 6, device=None, budget=0.5,
                                        root=root, archive=tmp_path / "again.tar.gz", quick=True, poll=0.1)
    assert not stopped["runs"]["one-step"]["finished"] and stopped["runs"]["one-step"]["last_row_step"] >= 2
