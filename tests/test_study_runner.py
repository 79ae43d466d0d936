"""The study runner: rows stored as they finish; an interrupted or killed study resumes losing none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_study

from fpgrad.study import LocalExecutor, RowStore, Study, config_key, run_study


def test_run_study_stores_every_row_and_finalizes(tmp_path):
    rows = run_study(toy_study.STUDY, tmp_path, quick=True, seed=1, progress=False)
    assert [r["value"] for r in rows] == [a * 10 + b + 1 for a in range(3) for b in range(2)]
    assert len(RowStore(tmp_path / "rows.jsonl").records()) == 6
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 6


def test_interrupted_study_resumes_without_rerunning_finished_rows(tmp_path):
    calls = []

    def flaky(config):
        calls.append(config)
        if len(calls) == 4:
            raise KeyboardInterrupt            # the user pressed Ctrl-C during the 4th config
        return toy_study.run(config)

    study = Study("toy", "", toy_study.grid, flaky, toy_study.finalize)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path, quick=False, progress=False)
    assert len(RowStore(tmp_path / "rows.jsonl").records()) == 3
    calls.clear()
    study = Study("toy", "", toy_study.grid, lambda c: (calls.append(c), toy_study.run(c))[1], toy_study.finalize)
    rows = run_study(study, tmp_path, quick=False, progress=False)
    assert len(calls) == 6 and len(rows) == 9
    assert len({config_key(r["config"]) for r in rows}) == 9


def test_killed_process_loses_no_finished_row(tmp_path):
    calls = tmp_path / "calls.txt"
    script = ("import sys; sys.path.insert(0, %r); import toy_study; from fpgrad.study import run_study; "
              "run_study(toy_study.STUDY, %r, quick=False, progress=False)") % (str(Path(__file__).parent),
                                                                               str(tmp_path / "out"))
    env = {**os.environ, "FPGRAD_TOY_CALLS": str(calls), "FPGRAD_TOY_SLEEP": "0.3"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    store = RowStore(tmp_path / "out" / "rows.jsonl")
    deadline = time.time() + 60
    while len(store.records()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r["key"] for r in store.records()}
    assert 3 <= len(finished) < 9
    first_calls = len(calls.read_text().splitlines())
    env["FPGRAD_TOY_SLEEP"] = "0"
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    records = store.records()
    assert len(records) == 9 and len({r["key"] for r in records}) == 9
    rerun = [json.loads(line) for line in calls.read_text().splitlines()[first_calls:]]
    assert not {config_key(c) for c in rerun} & finished          # finished rows were not recomputed


def test_torn_last_line_is_ignored_and_rerun(tmp_path):
    run_study(toy_study.STUDY, tmp_path, quick=True, progress=False)
    path = tmp_path / "rows.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert len(RowStore(path).records()) == 5
    rows = run_study(toy_study.STUDY, tmp_path, quick=True, progress=False)
    assert len(rows) == 6 and len(RowStore(path).records()) == 6


def test_process_pool_executor_gives_the_same_rows(tmp_path):
    local = run_study(toy_study.STUDY, tmp_path / "a", quick=True, progress=False)
    pooled = run_study(toy_study.STUDY, tmp_path / "b", quick=True, progress=False,
                       executor=LocalExecutor(workers=2))
    assert [r["value"] for r in local] == [r["value"] for r in pooled]


def test_rerun_drops_a_torn_last_line_from_the_file_with_a_warning(tmp_path):
    run_study(toy_study.STUDY, tmp_path, quick=True, progress=False)
    path = tmp_path / "rows.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    with pytest.warns(UserWarning, match=r"dropped 1 torn line\(s\) \(line 6\)"):
        rows = run_study(toy_study.STUDY, tmp_path, quick=True, progress=False)
    assert len(rows) == 6
    stored = path.read_text().splitlines()
    assert len(stored) == 6 and all(isinstance(json.loads(line), dict) for line in stored)   # no torn line left


@pytest.mark.parametrize("foreign", ["null", "[1, 2]", '{"key": "k"}'])
def test_a_valid_json_line_that_is_not_a_row_is_named_with_file_and_line(tmp_path, foreign):
    from fpgrad.study import RowStoreError
    run_study(toy_study.STUDY, tmp_path, quick=True, progress=False)
    path = tmp_path / "rows.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [foreign] + lines[2:]) + "\n")
    with pytest.raises(RowStoreError, match=r"rows\.jsonl, line 3: valid JSON but not a row"):
        run_study(toy_study.STUDY, tmp_path, quick=True, progress=False)


def test_second_run_on_one_out_is_refused_naming_the_holder(tmp_path):
    from fpgrad.study import OutputLockedError
    script = ("import sys; sys.path.insert(0, %r); import toy_study; from fpgrad.study import run_study; "
              "run_study(toy_study.STUDY, %r, quick=False, progress=False)") % (str(Path(__file__).parent),
                                                                               str(tmp_path / "out"))
    env = {**os.environ, "FPGRAD_TOY_SLEEP": "0.5"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        lock = tmp_path / "out" / ".fpgrad.lock"
        deadline = time.time() + 60
        while not (lock.exists() and lock.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(OutputLockedError, match=rf"pid {proc.pid} on host .*, started 20\d\d-"):
            run_study(toy_study.STUDY, tmp_path / "out", quick=False, progress=False)
    finally:
        proc.kill()
        proc.wait()
    rows = run_study(toy_study.STUDY, tmp_path / "out", quick=False, progress=False)   # a SIGKILL frees the lock
    assert len(rows) == 9 and len(RowStore(tmp_path / "out" / "rows.jsonl").records()) == 9
    assert not (tmp_path / "out" / ".fpgrad.lock").exists()
