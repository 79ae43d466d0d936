"""GradientMonitor: rows with correct cosines, warnings, adaptive weight, estimator switch, JSONL rows."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch

import fpgrad
from fpgrad.contraction import (
    AdaptiveWeight,
    EstimatorSwitch,
    GradientMonitor,
    MonitorWarning,
    append_jsonl,
    read_jsonl,
)
from fpgrad.estimators import OneStep


def _problem(n=8, batch=4, seed=0, rho=0.9):
    m = fpgrad.maps.tanh_rnn(n, rho, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n, generator=g, dtype=torch.float64)
    t = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return m, x, t


def _independent_cosine(m, x, loss_fn):
    """OneStep vs exact implicit gradient by dense algebra: z* to 1e-13, J by jacrev, (I - J^T) u = g."""
    z = fpgrad.solve(m, x, tol=1e-13, max_iter=5000).z
    zz = z.detach().requires_grad_(True)
    g = torch.autograd.grad(loss_fn(zz), zz)[0]
    params = {k: v.detach() for k, v in m.params.items()}
    u = torch.empty_like(g)
    for b in range(z.shape[0]):
        J = torch.func.jacrev(lambda s, b=b: m.step(params, s[None], x[b:b + 1])[0])(z[b])
        u[b] = torch.linalg.solve(torch.eye(J.shape[0], dtype=J.dtype) - J.T, g[b])
    _, pull = torch.func.vjp(lambda p: m.step(p, z, x), params)
    exact = pull(u)[0]
    one = pull(g)[0]
    a = torch.cat([one[k].reshape(-1) for k in sorted(params)])
    b = torch.cat([exact[k].reshape(-1) for k in sorted(params)])
    return float(a @ b / (a.norm() * b.norm()))


def test_monitor_rows_in_a_training_loop_have_the_independently_computed_cosine(tmp_path):
    m, x, t = _problem()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    path = tmp_path / "monitor.jsonl"
    monitor = GradientMonitor(path, every=3)

    def loss_fn(z):
        return 0.5 * (z - t).pow(2).sum()
    expected = {}
    for i in range(8):
        current = m.with_params({k: v.detach() for k, v in params.items()})
        if monitor.due(i):
            expected[i] = _independent_cosine(current, x, loss_fn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MonitorWarning)
            monitor.step(i, current, x, loss_fn, OneStep())
        opt.zero_grad()
        z = fpgrad.fixed_point(m.step, params, x, torch.zeros_like(t), backward=OneStep())
        loss_fn(z).backward()
        opt.step()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 3, 6]
    for r in rows:
        assert abs(r["cosine"] - expected[r["step"]]) < 1e-7, (r["cosine"], expected[r["step"]])
        assert r["estimator"] == repr(OneStep()) and r["rho_star"] < 1.0
        assert r["adjoint_converged"] and r["adjoint_vjps"] > 0 and r["exact_forward_converged"]
    # rows survive a reread: every line is valid JSON and equals the row kept in memory
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows == json.loads(json.dumps(monitor.rows))
    # the step time is measured between checks, and the monitor's cost reported against it
    assert rows[0]["step_seconds"] is None and rows[1]["step_seconds"] > 0
    assert rows[1]["amortised_fraction"] == pytest.approx(rows[1]["monitor_seconds"] / (3 * rows[1]["step_seconds"]))


def test_monitor_leaves_the_parameters_and_their_grads_alone():
    m, x, t = _problem()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.params.items()}
    for p in params.values():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.detach().clone() for k, v in params.items()}
    GradientMonitor(every=1).step(0, m.with_params(params), x, lambda z: (z - t).pow(2).sum(), "one_step")
    for k, p in params.items():
        assert torch.equal(p.grad, torch.full_like(p, 7.0)) and torch.equal(p.detach(), before[k])


def _expanding_linear(rho=1.2, n=6):
    A = fpgrad.maps.random_matrix_with_radius(n, rho, torch.Generator().manual_seed(0))
    B = torch.eye(n, dtype=torch.float64)
    x = torch.zeros(3, n, dtype=torch.float64)                     # z* = 0 exactly: the forward solve is trivial
    return fpgrad.maps.linear(A, B), x


def test_monitor_warns_once_when_rho_reaches_one_and_counts_the_rest():
    m, x = _expanding_linear()
    monitor = GradientMonitor(every=1, cosine_threshold=-2.0)
    with pytest.warns(MonitorWarning, match="rho") as caught:
        for i in range(3):
            row = monitor.step(i, m, x, lambda z: z.sum(), "one_step")
    assert len([w for w in caught if "rho" in str(w.message)]) == 1
    assert row["warnings_rho"] == 3 and row["rho_star"] == pytest.approx(1.2, rel=1e-6)


def test_adaptive_weight_rises_while_rho_is_above_target_and_holds_below():
    m, x = _expanding_linear()
    weight = AdaptiveWeight(value=0.1, target=0.9, factor=2.0)
    monitor = GradientMonitor(every=1, adaptive=weight, cosine_threshold=-2.0, rho_threshold=10.0)
    for i in range(3):
        monitor.step(i, m, x, lambda z: z.sum(), "one_step")
    assert weight.history == pytest.approx([0.2, 0.4, 0.8])
    assert [r["penalty_weight"] for r in monitor.rows] == pytest.approx([0.2, 0.4, 0.8])
    m2, x2 = _expanding_linear(rho=0.5)
    monitor.step(3, m2, x2, lambda z: z.sum(), "one_step")
    assert weight.value == pytest.approx(0.8)


def test_monitor_warns_on_a_low_cosine_and_switches_the_estimator():
    m, x, t = _problem(rho=0.95)
    switch = EstimatorSwitch(fallback="implicit", below=0.9999, patience=2)
    monitor = GradientMonitor(every=2, switch=switch, cosine_threshold=0.9999)
    with pytest.warns(MonitorWarning, match="cosine"):
        rows = [monitor.step(i, m, x, lambda z: (z - t).pow(2).sum(), "one_step") for i in range(5)]
    assert rows[1] is None and rows[3] is None                     # the period is respected
    assert rows[0]["next_estimator"] == "one_step" and rows[2]["next_estimator"] == "implicit"
    assert switch.switched_at == 2 and monitor.estimator("one_step") == "implicit"
    assert rows[4]["warnings_low_cosine"] == 3


def test_tensorboard_is_used_when_it_imports_and_skipped_with_a_reason_otherwise(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.warns(MonitorWarning, match="TensorBoard logging skipped"):
            monitor = GradientMonitor(tensorboard=tmp_path / "tb")
        assert "pip install tensorboard" in monitor.tensorboard_skipped and monitor.writer is None
    else:
        monitor = GradientMonitor(tensorboard=tmp_path / "tb")
        assert monitor.writer is not None and monitor.tensorboard_skipped is None


def test_append_jsonl_drops_a_torn_last_line_with_a_warning_and_keeps_every_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, {"step": 0, "value": float("nan")})
    with open(path, "a") as f:
        f.write('{"step": 1, "val')                                   # a crash mid-row
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(path) == [{"step": 0, "value": "nan"}]
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        append_jsonl(path, {"step": 2, "value": torch.tensor(0.5)})
    assert read_jsonl(path) == [{"step": 0, "value": "nan"}, {"step": 2, "value": 0.5}]
    assert path.read_text() == '{"step":0,"value":"nan"}\n{"step":2,"value":0.5}\n'
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # whole lines: no warning
        append_jsonl(path, {"step": 3})
        assert len(read_jsonl(path)) == 3


def test_read_jsonl_refuses_a_bad_line_that_is_not_the_tail(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_jsonl(path)


def test_the_contraction_rows_are_the_io_module_s():
    import fpgrad._io
    import fpgrad.contraction
    assert fpgrad.contraction.append_jsonl is fpgrad._io.append_jsonl
    assert fpgrad.contraction.read_jsonl is fpgrad._io.read_jsonl


def test_monitor_rejects_a_zero_period():
    with pytest.raises(ValueError, match="every"):
        GradientMonitor(every=0)
