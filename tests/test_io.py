"""fpgrad._io: atomic writes and standard JSON for every part of fpgrad, without importing plotting."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpgrad._io import from_jsonable, json_default, jsonable, write_json

ROOT = Path(__file__).resolve().parents[1]


def test_jsonable_writes_nan_and_inf_as_strings_and_tensors_as_numbers():
    obj = {"a": math.nan, 1: [math.inf, -math.inf, 2.5], "t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3),
           "np": np.float32(0.5), "i": np.int64(7), "arr": np.arange(3), "c": 1 + 2j, "b": True, "none": None}
    out = jsonable(obj)
    assert out == {"a": "nan", "1": ["inf", "-inf", 2.5], "t": [1.0, 2.0], "s": 3, "np": 0.5, "i": 7,
                   "arr": [0, 1, 2], "c": {"real": 1.0, "imag": 2.0}, "b": True, "none": None}
    json.dumps(out, allow_nan=False)                       # standard JSON: raises on a NaN literal


def test_from_jsonable_undoes_the_nan_strings():
    back = from_jsonable(jsonable({"x": [math.nan, math.inf, 1.0], "y": {"z": -math.inf}}))
    assert math.isnan(back["x"][0]) and back["x"][1:] == [math.inf, 1.0] and back["y"]["z"] == -math.inf


def test_json_default_turns_tensors_and_numpy_scalars_into_values():
    text = json.dumps({"t": torch.tensor([1, 2]), "n": np.float64(0.25), "o": object}, default=json_default)
    loaded = json.loads(text)
    assert loaded["t"] == [1, 2] and loaded["n"] == 0.25 and "object" in loaded["o"]


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"v": math.nan})
    assert json.loads(path.read_text()) == {"v": "nan"} and path.read_text().endswith("\n")

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr("os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": "nan"} and [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_io_does_not_import_plotting():
    code = ("import sys, fpgrad._io; bad = [m for m in ('seaborn', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_keeps_its_atomic_names():
    import fpgrad._io as io
    import fpgrad.report as report
    assert report.atomic_write_text is io.atomic_write_text and report.atomic_directory is io.atomic_directory
    assert report.atomic_write_bytes is io.atomic_write_bytes


def test_no_benchmark_imports_a_study():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "studies" or n.startswith("studies.") for n in names), path.name
