"""Studies on Ray: the same rows as the local executor, a killed worker retried, a study's exception named, a
killed driver resumed, and `fpgrad study NAME --executor ray` end to end. One local Ray (2 CPUs) for the module."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'fpgrad[distributed]'")

import toy_study  # noqa: E402

from fpgrad.cli import main  # noqa: E402
from fpgrad.distributed import RayExecutor  # noqa: E402
from fpgrad.study import RowStore, StudyTaskError, config_key, run_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    """A Ray on loopback shared by the module's tests; yields its address for other drivers (subprocesses)."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _executor(**env):
    """A RayExecutor whose tasks see `env` (the toy study's fault hooks and call log)."""
    return RayExecutor(runtime_env={"env_vars": {k: str(v) for k, v in env.items()}} if env else None)


def _calls(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [(c["a"], c["b"]) for c in map(json.loads, path.read_text().splitlines())]


def test_ray_gives_the_rows_of_the_local_executor(cluster, tmp_path):
    local = run_study(toy_study.STUDY, tmp_path / "local", quick=True, seed=3, progress=False)
    on_ray = run_study(toy_study.STUDY, tmp_path / "ray", quick=True, seed=3, progress=False, executor=_executor())
    assert on_ray == local
    assert ray.is_initialized()                       # the executor leaves a Ray it did not start running
    records = RowStore(tmp_path / "ray" / "rows.jsonl").records()
    assert sorted(r["key"] for r in records) == sorted(config_key(r["config"]) for r in local)
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["n"] == 6


def test_a_killed_worker_is_retried_and_every_row_arrives(cluster, tmp_path):
    marker, calls = tmp_path / "killed", tmp_path / "calls.txt"
    rows = run_study(toy_study.STUDY, tmp_path / "out", quick=True, seed=1, progress=False,
                     executor=_executor(FPGRAD_TOY_KILL_ONCE=marker, FPGRAD_TOY_CALLS=calls))
    assert marker.exists()                                        # the worker running (1, 1) did die
    assert sorted(_calls(calls)) == sorted([(a, b) for a in range(3) for b in range(2)] + [(1, 1)])
    assert [r["value"] for r in rows] == [a * 10 + b + 1 for a in range(3) for b in range(2)]
    assert len({r["key"] for r in RowStore(tmp_path / "out" / "rows.jsonl").records()}) == 6


def test_a_worker_dying_more_often_than_retries_raises_naming_the_config(cluster, tmp_path):
    executor = RayExecutor(max_retries=0, runtime_env={"env_vars": {"FPGRAD_TOY_KILL_ONCE": str(tmp_path / "k")}})
    with pytest.raises(StudyTaskError, match=r'"a": 1, "b": 1.*died on each of 1 attempt') as info:
        run_study(toy_study.STUDY, tmp_path / "out", quick=True, progress=False, executor=executor)
    assert info.value.config["a"] == 1 and info.value.config["b"] == 1
    assert isinstance(info.value.__cause__, ray.exceptions.RayError)


def test_an_exception_in_the_study_is_not_retried_and_names_the_config(cluster, tmp_path):
    calls = tmp_path / "calls.txt"
    with pytest.raises(StudyTaskError, match=r'configuration \{"a": 2, "b": 0, .*\} raised ValueError: toy study '
                                             r'asked to fail') as info:
        run_study(toy_study.STUDY, tmp_path / "out", quick=True, progress=False,
                  executor=_executor(FPGRAD_TOY_RAISE="2,0", FPGRAD_TOY_CALLS=calls))
    cause = info.value.__cause__
    assert isinstance(cause, ray.exceptions.RayTaskError) and isinstance(cause, ValueError)
    assert "_fault_hooks" in str(cause) and "toy_study.py" in str(cause)     # the worker's traceback
    assert _calls(calls).count((2, 0)) == 1                                   # a bug is not retried
    assert len(RowStore(tmp_path / "out" / "rows.jsonl").records()) <= 5     # rows before the failure are kept


def test_resume_submits_only_the_configs_missing_from_the_store(cluster, tmp_path):
    out = tmp_path / "out"
    first = run_study(toy_study.STUDY, out, quick=False, progress=False)
    path = out / "rows.jsonl"
    lines = path.read_text().splitlines()
    dropped = [json.loads(lines[i])["config"] for i in (0, 4, 8)]
    path.write_text("\n".join(line for i, line in enumerate(lines) if i not in (0, 4, 8)) + "\n")
    calls = tmp_path / "calls.txt"
    resumed = run_study(toy_study.STUDY, out, quick=False, progress=False, executor=_executor(FPGRAD_TOY_CALLS=calls))
    assert sorted(_calls(calls)) == sorted((c["a"], c["b"]) for c in dropped)
    assert resumed == first


def test_a_killed_driver_resumes_losing_no_finished_row(cluster, tmp_path):
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    script = ("import sys; sys.path.insert(0, %r); import toy_study; from fpgrad.study import run_study; "
              "from fpgrad.distributed import RayExecutor; "
              "env = {'FPGRAD_TOY_CALLS': %r, 'FPGRAD_TOY_SLEEP': '0.5'}; "
              "run_study(toy_study.STUDY, %r, quick=False, progress=False, "
              "executor=RayExecutor(runtime_env={'env_vars': env}))") % (str(TESTS), str(calls), str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "RAY_ADDRESS": cluster}, cwd=tmp_path)
    store = RowStore(out / "rows.jsonl")
    deadline = time.time() + 60
    while len(store.records()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r["key"] for r in store.records()}
    assert 3 <= len(finished) < 9
    first_calls = len(calls.read_text().splitlines())
    run_study(toy_study.STUDY, out, quick=False, progress=False, executor=_executor(FPGRAD_TOY_CALLS=calls))
    records = store.records()
    assert len(records) == 9 and len({r["key"] for r in records}) == 9
    rerun = [json.loads(line) for line in calls.read_text().splitlines()[first_calls:]]
    assert not {config_key(c) for c in rerun} & finished        # finished rows were not recomputed


def test_cli_runs_a_registered_study_on_ray(cluster, tmp_path):
    from studies import cost_scaling
    out = tmp_path / "cs"
    proc = subprocess.run([sys.executable, "-m", "fpgrad", "study", "cost-scaling", "--quick", "--executor", "ray",
                           "--address", cluster, "--out", str(out), "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "README.md").exists()
    records = RowStore(out / "rows.jsonl").records()
    assert len(records) == len({r["key"] for r in records}) == len(cost_scaling.grid(True))
    config = records[0]["config"]                       # the numbers that do not depend on timing, as in-process
    local = cost_scaling.run(config)
    for key in ("vjps", "jvps", "forward_steps", "backward_steps", "bytes_saved", "loss"):
        assert records[0]["row"][key] == pytest.approx(local[key]), key


def test_a_study_without_a_module_is_refused():
    study = dataclasses.replace(toy_study.STUDY, module="")
    with pytest.raises(ValueError, match="module=__name__"):
        list(RayExecutor().map(study, toy_study.grid(True)))


def test_missing_ray_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)                   # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fpgrad\[distributed\]'"):
        RayExecutor()
    assert main(["study", "cost-scaling", "--quick", "--executor", "ray"]) == 2
    assert "pip install 'fpgrad[distributed]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--address", "auto"], "--address: only with --executor ray"),
    (["--retries", "3", "--cpus-per-task", "2"], "--cpus-per-task, --retries: only with --executor ray"),
    (["--executor", "ray", "--workers", "2"], "--workers is for the local executor"),
    (["--executor", "ray", "--cpus-per-task", "0"], "--cpus-per-task must be positive"),
    (["--executor", "ray", "--retries", "-1"], "--retries must be >= 0"),
])
def test_ray_options_are_checked_before_anything_runs(argv, message, capsys, tmp_path):
    assert main(["study", "cost-scaling", "--quick", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
