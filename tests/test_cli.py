"""The `fpgrad` command end to end (subprocess): report folders, numbers, exit codes and messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fpgrad

SMALL = ["--dim", "8", "--slots", "3", "--inputs", "10", "--batch", "2", "--quiet"]


def fpgrad_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fpgrad", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def _numbers(text):
    return set(re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", text))


def _json_numbers(obj, out):
    if isinstance(obj, dict):
        for v in obj.values():
            _json_numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _json_numbers(v, out)
    elif isinstance(obj, float):
        out.append(obj)
    elif isinstance(obj, str):          # numbers quoted inside messages (e.g. an estimator's error)
        out.extend(float(t) for t in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", obj))
    return out


@pytest.fixture(scope="module")
def slot_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "rep"
    r = fpgrad_cli("report", "spectral", "--map", "slot-attention", *SMALL, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_report_folder_has_every_file(slot_report):
    for name in ("report.md", "report.html", "summary.json"):
        assert (slot_report / name).stat().st_size > 0
    pngs = list((slot_report / "figures").glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_numbers_in_markdown_are_in_summary_json(slot_report):
    md = (slot_report / "report.md").read_text()
    data = json.loads((slot_report / "summary.json").read_text())
    values = _json_numbers(data, [])
    assert data["n"] == 24 and data["batch"] == 2
    missing = []
    for token in _numbers(md):
        v = float(token)
        digits = len(token.split("e")[0].replace("-", "").replace(".", "").lstrip("0")) or 1
        if not any(abs(v - w) <= 0.51 * 10 ** (_exponent(v) - digits + 1) for w in values):
            missing.append(token)
    assert not missing, f"numbers shown in report.md but absent from summary.json: {missing[:10]}"


def _exponent(v):
    import math
    return math.floor(math.log10(abs(v))) if v else 0


def test_report_compares_the_estimators_against_the_exact_gradient(slot_report):
    data = json.loads((slot_report / "summary.json").read_text())
    rows = {r["estimator"]: r for r in data["estimators"]}
    assert {"OneStep", "Implicit(gmres)", "Neumann(5)"} <= set(rows)
    assert rows["Implicit(gmres)"]["relative_error"] < 1e-6
    assert "## Gradient estimators" in (slot_report / "report.md").read_text()


def test_tanh_map_report_without_gradients(tmp_path):
    r = fpgrad_cli("report", "spectral", "--map", "tanh", "--dim", "30", "--radius", "0.7", "--no-gradients",
                   "--quiet", "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert data["estimators"] == [] and max(data["spectral_radius"]) < 1.0


def test_user_map_given_as_module_function(tmp_path):
    (tmp_path / "mymap.py").write_text(
        "import torch, fpgrad\n"
        "def build():\n"
        "    A = 0.5 * torch.eye(4, dtype=torch.float64)\n"
        "    B = torch.ones(4, 2, dtype=torch.float64)\n"
        "    return fpgrad.maps.linear(A, B), torch.ones(3, 2, dtype=torch.float64)\n")
    r = fpgrad_cli("report", "spectral", "--map", "mymap:build", "--no-gradients", "--quiet", "--out", "rep",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert all(abs(r - 0.5) < 1e-9 for r in data["spectral_radius"])


def test_checkpoint_of_implicit_slot_attention(tmp_path):
    layer = fpgrad.nn.ImplicitSlotAttention(8, 3, iters=3, seed=0)
    layer.save_checkpoint(tmp_path / "sa.pt")
    r = fpgrad_cli("report", "spectral", "--map", str(tmp_path / "sa.pt"), "--inputs", "10", "--batch", "2",
                   "--no-gradients", "--quiet", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["n"] == 24


BAD_ARGUMENTS = [
    (["--map", "nonsense"], "--map 'nonsense'"),
    (["--map", "no_such_module_xyz:f"], "cannot import module"),
    (["--map", "missing.pt"], "no such checkpoint"),
    (["--device", "cuda:7"], "cuda"),
    (["--dim", "0"], "--dim must be a positive integer"),
    (["--tol", "-1"], "--tol must be positive"),
]


@pytest.mark.parametrize("args,message", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_a_message_and_leave_no_folder(tmp_path, capsys, args, message):
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    from fpgrad.cli import main
    out = tmp_path / "rep"
    assert main(["report", "spectral", *args, "--no-gradients", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fpgrad: error:" in err and message in err
    assert not out.exists() and not any(tmp_path.iterdir())


def test_a_cuda_ordinal_past_the_machines_devices_is_named(tmp_path, capsys, monkeypatch):
    # found on a one-GPU machine: --device cuda:7 reached torch's raw "invalid device ordinal" from deep inside
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    from fpgrad.cli import main
    assert main(["report", "spectral", "--device", "cuda:7", "--no-gradients", "--quiet",
                 "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:7: this machine has 1 CUDA device (cuda:0)" in err and "--device cpu" in err
    assert not (tmp_path / "rep").exists()


def test_bad_argument_in_a_subprocess_gives_no_traceback(tmp_path):
    r = fpgrad_cli("report", "spectral", "--map", "nonsense", "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and "fpgrad: error: --map 'nonsense'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "rep").exists()


def test_argparse_errors_exit_2(capsys):
    from fpgrad.cli import main
    with pytest.raises(SystemExit) as e:
        main(["report", "spectral", "--dtype", "int8"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_failed_report_leaves_an_existing_folder_untouched(tmp_path):
    from fpgrad.cli import main
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("old report")
    assert main(["report", "spectral", "--map", "nonsense", "--quiet", "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "old report" and len(list(out.iterdir())) == 1


def test_study_list_names_the_studies_and_unknown_study_is_an_error():
    r = fpgrad_cli("study", "--list")
    assert r.returncode == 0
    import studies
    assert r.stdout.split() [:1] == list(studies.available())[:1]
    r = fpgrad_cli("study", "no-such-study")
    assert r.returncode == 2 and "unknown study" in r.stderr


def test_study_without_name_is_a_usage_error(capsys):
    from fpgrad.cli import main
    assert main(["study"]) == 2 and "name a study" in capsys.readouterr().err


def test_module_entry_point_and_console_script_agree():
    exe = Path(sys.executable).parent / "fpgrad"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(exe), "study", "--list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == fpgrad_cli("study", "--list").stdout


def test_help_states_the_default_dtype(capsys):
    from fpgrad.cli import main
    with pytest.raises(SystemExit):
        main(["report", "spectral", "--help"])
    assert "default float64" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_out_whose_parent_cannot_hold_it_fails_before_the_analysis(tmp_path, capsys, monkeypatch, kind):
    import fpgrad.cli as cli
    if kind == "file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "rep"
    else:
        import os
        if os.geteuid() == 0:
            monkeypatch.setattr(os, "access", lambda path, mode: False)     # root may write anywhere
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "rep"
    monkeypatch.setattr(cli, "build_target", lambda args: pytest.fail("the analysis started"))
    assert cli.main(["report", "spectral", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fpgrad: error: --out" in err and ("is a file" in err or "cannot write" in err)


def test_killed_reports_temporary_folders_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "t"
    stale = tmp_path / ".tmp-t-abcd1234"            # what a SIGKILL inside atomic_directory leaves behind
    stale.mkdir()
    (stale / "report.md").write_text("half a report")
    other = tmp_path / ".tmp-t-x-abcd1234"          # another output's temporary folder: not ours to remove
    other.mkdir()
    r = fpgrad_cli("report", "spectral", "--map", "tanh", "--dim", "6", "--no-gradients", "--quiet", "--out",
                   str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not stale.exists() and other.exists() and (out / "summary.json").exists()
    assert not any(p.name.endswith(".fpgrad.lock") for p in tmp_path.iterdir())


def test_a_second_report_on_one_out_is_refused_naming_the_holder(tmp_path, capsys):
    from fpgrad.cli import main
    from fpgrad.study import output_lock
    out = tmp_path / "rep"
    with output_lock(tmp_path / ".rep.fpgrad.lock", "holder"):
        assert main(["report", "spectral", "--map", "tanh", "--dim", "6", "--no-gradients", "--quiet",
                     "--out", str(out)]) == 1
    import os
    assert f"pid {os.getpid()}" in capsys.readouterr().err and not out.exists()
