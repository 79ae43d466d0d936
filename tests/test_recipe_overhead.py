"""The recipe-overhead benchmark's quick mode: fpgrad's slots and gradients equal the plain loop's (no timing
assertion: speed targets live in benchmarks/)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import recipe_overhead as R


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "recipe_overhead.json"
    assert R.main(["--quick", "--repeats", "3", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_run_writes_float32_rows_for_every_size_and_mode(quick_rows):
    assert quick_rows["dtype"] == "float32"
    rows = quick_rows["results"]["rows"]
    assert {(r["size"], r["mode"]) for r in rows} == {
        (f"B={B} N={N} D={D} K={K}", mode) for B, N, D, K in R.QUICK_SIZES for mode in R.MODES}
    for r in rows:
        assert r["ratio"] > 0 and r["cpu_ratio"] > 0 and len(r["fpgrad_samples"]["wall"]) == 3


def test_fpgrad_slots_and_gradients_equal_the_plain_loop(quick_rows):
    for r in quick_rows["results"]["rows"]:
        assert r["slots_max_abs_diff"] <= 1e-5 and r["grads_max_abs_diff"] <= 1e-5, r


def test_one_step_leaves_the_slot_initialisation_without_gradient_like_the_plain_loop(quick_rows):
    for r in quick_rows["results"]["rows"]:
        expected = ["slots_mu", "slots_log_sigma"] if r["mode"] == "one_step" else []
        assert r["grads_none"] == expected, r


def test_identity_check_catches_a_plain_loop_that_runs_one_step_fewer(monkeypatch):
    case = R.make_case(2, 8, 8, 3, iters=3, seed=0)
    plain = R.plain_slots

    def one_fewer(module, inputs, noise, mode):
        module.iters -= 1
        try:
            return plain(module, inputs, noise, mode)
        finally:
            module.iters += 1
    monkeypatch.setattr(R, "plain_slots", one_fewer)
    with pytest.raises(AssertionError, match="slots differ"):
        R.check_identical(case, "one_step")


def test_plain_one_step_recipe_differentiates_only_the_last_step():
    case = R.make_case(2, 8, 8, 3, iters=3, seed=0)
    module = case.modules["one_step"]
    slots = R.plain_slots(module, case.inputs, case.noise, "one_step")
    grads = torch.autograd.grad(slots.sum(), [module.slots_mu, module.to_q.weight], allow_unused=True)
    assert grads[0] is None and grads[1] is not None
