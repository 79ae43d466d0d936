"""studies/discovery.py: a run stopped and rerun gives the rows of an uninterrupted run; settings are checked."""

from __future__ import annotations

import json

import pytest
import torch

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


# ---- the arms (issue #20, section 2) --------------------------------------------------------------------------

def test_arm_and_ablation_names_and_settings():
    config = discovery.config_of("plain-fullres", arm="implicit", seed=2)
    assert config["name"] == "plain-fullres-implicit-s2"
    assert config["estimator"] == "implicit" and config["tol"] == 1e-4 and config["instruments"]
    ablated = discovery.config_of("plain-fullres", arm="one-step", ablation="no-warmup")
    assert ablated["name"] == "plain-fullres-one-step-no-warmup" and ablated["warmup"] == 0
    with pytest.raises(ValueError, match="unknown arm 'exact'"):
        discovery.config_of("plain-fullres", arm="exact")
    with pytest.raises(ValueError, match="give --arm too"):
        discovery.config_of("plain-fullres", ablation="clip")
    assert not discovery.config_of("plain-fullres")["instruments"]     # the discovery runs stay as they were


def test_an_arm_records_its_instruments_and_the_test_time_curve(tmp_path):
    config = discovery.config_of("", quick=True, arm="one-step")
    rows = discovery.train(config, 4, tmp_path, progress=False)
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert -1.0 <= row["cosine"] <= 1.0 and row["rho_star"] > 0 and row["jacobian_norm"] > 0
        assert row["backward_bytes"] > 0 and row["adjoint_vjps"] > 0
    assert rows[-1]["grad_norm_median"] > 0 and rows[-1]["spikes"] == 0
    assert sorted(map(int, rows[-1]["test_time"])) == list(discovery.TEST_TIME_ITERS)
    assert "test_time" not in rows[1]
    # the row at the trained iteration count is the evaluation's own
    assert rows[-1]["test_time"][str(config["iters"])]["mse"] == pytest.approx(rows[-1]["mse"])


def test_a_resumed_arm_trains_as_an_uninterrupted_one(tmp_path):
    config = discovery.config_of("", quick=True, arm="neumann-5")
    whole = discovery.train(config, 4, tmp_path / "whole", progress=False)
    discovery.train(config, 2, tmp_path / "split", progress=False)
    split = discovery.train(config, 4, tmp_path / "split", progress=False)
    for a, b in zip(whole, split):
        assert (a["fg_ari"], a["mse"], a["train_loss"]) == (b["fg_ari"], b["mse"], b["train_loss"])


def test_the_spectral_penalty_arm_trains_differently_when_the_penalty_is_active(tmp_path):
    config = discovery.config_of("", quick=True, arm="implicit-penalty")
    active = {**config, "penalty_target": 0.0, "penalty": 1.0}        # rho > 0 always: the penalty acts
    off = {**config, "penalty": 0.0}
    a = discovery.train(active, 2, tmp_path / "active", progress=False)
    b = discovery.train(off, 2, tmp_path / "off", progress=False)
    assert a[-1]["penalty"] > 0 and a[-1]["penalty_rho_last"] > 0
    assert a[-1]["mse"] != b[-1]["mse"]


def test_penalty_overrides_name_the_run_label_its_row_and_reach_the_penalty(tmp_path, monkeypatch):
    recipe = discovery.config_of("plain-fullres", arm="implicit-penalty")
    assert recipe["name"] == "plain-fullres-implicit-penalty"          # the README's recipe: no suffix
    assert (recipe["penalty"], recipe["penalty_target"], recipe["penalty_iters"], recipe["penalty_smooth"]) == \
        (0.05, 0.7, 4, 0.1)
    same = discovery.config_of("plain-fullres", arm="implicit-penalty", penalty=dict(penalty=0.05))
    assert same["name"] == recipe["name"]
    strong = discovery.config_of("plain-fullres", arm="implicit-penalty", seed=1, penalty=dict(penalty=0.5))
    assert strong["name"] == "plain-fullres-implicit-penalty-w0.5-t0.7-p4-h0.1-s1" and strong["penalty"] == 0.5
    assert discovery._arm_of(strong) == "implicit-penalty (w0.5-t0.7-p4-h0.1)"
    assert discovery._arm_of(recipe) == "implicit-penalty"
    with pytest.raises(ValueError, match="give --arm too"):
        discovery.config_of("plain-fullres", penalty=dict(penalty=0.5))
    with pytest.raises(ValueError, match="positive weight"):
        discovery.config_of("plain-fullres", arm="implicit-penalty", penalty=dict(penalty=0.0))
    with pytest.raises(ValueError, match="unknown penalty settings"):
        discovery.config_of("plain-fullres", arm="implicit-penalty", penalty=dict(weight=1.0))

    import fpgrad.contraction
    seen = []
    real = fpgrad.contraction.spectral_penalty

    def spy(*args, **kwargs):
        seen.append((kwargs["target"], kwargs["iters"], kwargs["smooth"], kwargs["krylov"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(fpgrad.contraction, "spectral_penalty", spy)
    config = discovery.config_of("", quick=True, arm="implicit-penalty",
                                 penalty=dict(penalty_target=0.3, penalty_iters=3, penalty_smooth=0.2))
    discovery.train(config, 1, tmp_path, progress=False)
    assert seen == [(0.3, 3, 0.2, 0)]
    krylov = discovery.config_of("plain-fullres", arm="implicit-penalty", penalty=dict(penalty_krylov=16,
                                                                                      penalty_iters=1))
    assert krylov["name"] == "plain-fullres-implicit-penalty-w0.05-t0.7-p1-h0.1-k16"
    quick = discovery.config_of("", quick=True, arm="implicit-penalty", penalty=dict(penalty_krylov=5))
    discovery.train(quick, 1, tmp_path / "krylov", progress=False)
    assert seen[-1][-1] == 5


def test_gradient_spikes_are_counted_against_the_running_median():
    spikes = discovery.GradientSpikes()
    for _ in range(discovery.SPIKE_MIN_HISTORY):
        spikes.add(1.0)
    spikes.add(discovery.SPIKE_FACTOR * 2)
    spikes.add(1.0)
    summary = spikes.since()
    assert summary["spikes"] == 1 and summary["spike_ratio_max"] == pytest.approx(discovery.SPIKE_FACTOR * 2)
    assert summary["grad_norm_max"] == discovery.SPIKE_FACTOR * 2 and spikes.since()["spikes"] == 0


def test_the_arms_table_and_figure_come_from_the_stored_rows(tmp_path):
    for arm, ablation in (("one-step", None), ("one-step", "clip")):
        config = discovery.config_of("", quick=True, arm=arm, ablation=ablation)
        discovery.train(config, 2, tmp_path / config["name"], progress=False)
    discovery.train(discovery.config_of("", quick=True), 2, tmp_path / "plain", progress=False)   # no instruments
    text = discovery.arms_table(tmp_path)
    lines = text.strip().splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| one-step | 0 | 2 |" in text and "| one-step + clip | 0 | 2 |" in text
    discovery.arms_figure(tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # the penalised runs' figure: seed 0 of one-step beside every penalised z* run, the variants/ folder included
    config = discovery.config_of("", quick=True, arm="implicit-penalty", penalty=dict(penalty_krylov=2))
    discovery.train(config, 2, tmp_path / "variants" / config["name"], progress=False)
    runs = discovery.penalised_runs(tmp_path)
    assert [discovery._arm_of(c) for c, _ in runs] == ["one-step", "implicit-penalty (w0.05-t0.7-p4-h0.1-k2)"]
    discovery.arms_figure(tmp_path, tmp_path / "penalties.png", runs)
    assert (tmp_path / "penalties.png").stat().st_size > 10_000


def test_the_implicit_arm_caps_its_adjoint_solve_and_counts_the_steps_it_capped(tmp_path):
    from fpgrad.estimators import Implicit
    est = discovery.arm_estimator(discovery.config_of("plain-fullres", arm="implicit"))
    assert isinstance(est, Implicit) and est.max_iter == 100 and est.tol == 1e-4
    assert discovery.arm_estimator(discovery.config_of("plain-fullres", arm="one-step")) == "one_step"
    config = {**discovery.config_of("", quick=True, arm="implicit"), "backward_max_iter": 1}   # capped at once
    rows = discovery.train(config, 2, tmp_path / "run", progress=False)
    assert rows[-1]["steps_since_row"] == 2 and rows[-1]["adjoint_short_steps"] == 2
    assert rows[-1]["train_vjps_per_step"] >= 1
    assert "| 100.0 |" in discovery.arms_table(tmp_path)          # every training step capped


def test_the_claims_table_decides_from_finished_runs_only_and_names_what_is_missing(tmp_path):
    for arm, ablation in (("unrolled", None), ("one-step", None), ("one-step", "no-warmup"), ("unrolled", "iters7"),
                          ("one-step", "iters7")):
        config = discovery.config_of("", quick=True, arm=arm, ablation=ablation)
        discovery.train(config, 2, tmp_path / config["name"], progress=False)
    text = discovery.claims_table(tmp_path, steps=2)
    claims = text.split("## The issue's targets")[0]
    rows = [line for line in claims.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [c[0] for c in discovery.CLAIMS]
    verdicts = [r.rstrip(" |").rsplit(" | ", 1)[1] for r in rows]
    assert all(v.startswith(("supported", "not supported")) for v in verdicts), verdicts
    # one-step's backward saves the same bytes at 7 iterations as at 3 (one taped step); unrolled's grow
    assert verdicts[1] == "supported"
    assert "Finished runs (2 steps): one-step s0, one-step + iters7 s0" in text
    # a run short of the target steps decides nothing: every claim is pending, naming the runs it waits for
    pending = discovery.claims_table(tmp_path, steps=14_000)
    assert pending.count("pending: no finished run (14000 steps) of unrolled, one-step") == 5
    assert "Finished runs (14000 steps): none yet." in pending


def _rows(values):
    return [dict(step=500 * i, fg_ari=ari, mse=mse) for i, (ari, mse) in enumerate(values)]


def test_a_run_flat_at_one_picture_for_ten_rows_is_collapsed_and_no_other():
    n = discovery.COLLAPSE_ROWS
    flat = _rows([(0.04, 0.2)] + [(0.001, 0.0681 * (1 + 0.002 * (-1) ** i)) for i in range(n)])
    assert discovery.collapsed_since(flat) == 500
    assert discovery.collapsed_since(flat[:-1]) is None                              # one row short of the span
    assert discovery.collapsed_since(_rows([(0.001, 0.0681)] * (n - 1) + [(0.001, 0.0600)])) is None   # MSE moved
    assert discovery.collapsed_since(_rows([(0.001, 0.0681)] * (n - 1) + [(0.2, 0.0681)])) is None     # objects found
    falling = _rows([(0.01, 0.05 * 0.98 ** i) for i in range(3 * n)])                # still learning: not flat
    assert discovery.collapsed_since(falling) is None


def test_a_collapsed_run_is_stopped_not_resumed_and_counts_as_finished(tmp_path, monkeypatch):
    config = {**discovery.config_of("", quick=True, arm="one-step", ablation="no-warmup"), "eval_every": 1}
    monkeypatch.setattr(discovery, "collapsed_since", lambda rows: 1 if len(rows) >= 2 else None)
    rows = discovery.train(config, 6, tmp_path / config["name"], progress=False)
    assert [r["step"] for r in rows] == [0, 1]                                        # stopped at its first row
    assert [r["step"] for r in discovery.train(config, 6, tmp_path / config["name"], progress=False)] == [0, 1]
    assert discovery._finished(tmp_path, 6)                                          # decided though short of 6
    assert "one-step + no-warmup s0 (collapsed at step 1, stopped at 1)" in discovery.claims_table(tmp_path, 6)


def _fake_run(root, arm, seed, values):
    """A stored arm run: config.json and one row per (step, fg_ari, rho_star)."""
    run = root / f"{arm}-{seed}"
    run.mkdir()
    config = discovery.config_of("plain-fullres", arm=arm, seed=seed)
    (run / "config.json").write_text(json.dumps(config))
    (run / "rows.jsonl").write_text("".join(json.dumps(dict(step=step, fg_ari=ari, rho_star=rho, time=step)) + "\n"
                                            for step, ari, rho in values))


def test_a_collapsed_seed_counts_as_finished_in_the_targets_table(tmp_path, monkeypatch):
    _fake_run(tmp_path, "neumann-5", 0, [(0, 0.0, 0.9), (10, 0.01, 1.5)])
    _fake_run(tmp_path, "neumann-5", 1, [(0, 0.0, 0.9), (10, 0.3, 1.5)])
    assert "neumann-5 0 | not yet |" in discovery.targets_table(tmp_path, steps=20)
    monkeypatch.setattr(discovery, "collapsed_since", lambda rows: 10 if rows[-1]["fg_ari"] < 0.05 else None)
    assert "neumann-5 1 | not yet |" in discovery.targets_table(tmp_path, steps=20)    # seed 0 collapsed: decided


def test_the_targets_table_reads_each_penalised_seed_and_the_unrolled_baseline(tmp_path):
    _fake_run(tmp_path, "unrolled", 0, [(0, 0.0, 0.9), (10, 0.86, 3.0), (20, 0.80, 2.0)])
    _fake_run(tmp_path, "implicit-penalty", 0, [(0, 0.0, 0.9), (10, 0.5, 0.95), (20, 0.6, 0.8)])
    _fake_run(tmp_path, "implicit-penalty", 1, [(0, 0.0, 0.9), (10, 0.5, 1.02), (20, 0.6, 0.8)])
    _fake_run(tmp_path, "implicit-penalty", 2, [(0, 0.0, 0.9), (10, 0.5, 0.7)])
    text = discovery.targets_table(tmp_path, steps=20)
    lines = text.splitlines()
    assert "| unrolled baseline FG-ARI >= 0.85 | seeds [0] | best FG-ARI 0.860 | met |" in lines
    penalised = [line for line in lines if "with the penalty" in line]
    assert [line.rsplit(" | ", 1)[1] for line in penalised] == ["met |", "missed |", "holds so far (10 of 20 steps) |"]
    assert "max 1.020; >= 1 at 1 of 3 logged steps" in penalised[1]
    assert "finished seeds: unrolled 1, one-step 0, implicit 0, implicit-penalty 2, neumann-5 0 | not yet |" in text
    # a penalty setting tried beside the arm (root/variants) is listed after it, labelled with what differs
    (tmp_path / "variants").mkdir()
    run = tmp_path / "variants" / "krylov"
    run.mkdir()
    config = discovery.config_of("plain-fullres", arm="implicit-penalty", ablation="slot-embedding",
                                 penalty={"penalty_krylov": 16, "penalty_iters": 1})
    (run / "config.json").write_text(json.dumps(config))
    (run / "rows.jsonl").write_text("".join(json.dumps(dict(step=s, fg_ari=0.5, rho_star=r, time=s)) + "\n"
                                            for s, r in [(0, 0.9), (10, 0.8), (20, 0.85)]))
    text = discovery.targets_table(tmp_path, steps=20)
    penalised = [line for line in text.splitlines() if "with the penalty" in line]
    assert len(penalised) == 4 and penalised[:3] == [line for line in lines if "with the penalty" in line]
    assert penalised[3].startswith("| implicit at z* with the penalty [(w0.05-t0.7-p1-h0.1-k16) + slot-embedding]: ")
    assert penalised[3].endswith("| max 0.900; >= 1 at 0 of 3 logged steps | met |")
    # a baseline short of 0.85 is "not yet" while it runs, "missed" once it has reached its steps
    (tmp_path / "short").mkdir()
    _fake_run(tmp_path / "short", "unrolled", 0, [(0, 0.0, 0.9), (20, 0.80, 2.0)])
    assert "best FG-ARI 0.800 | not yet |" in discovery.targets_table(tmp_path / "short", steps=30)
    assert "best FG-ARI 0.800 | missed |" in discovery.targets_table(tmp_path / "short", steps=20)


def test_rows_record_the_device_and_a_missing_cuda_is_named(tmp_path, capsys):
    config = discovery.config_of("", quick=True, arm="implicit-penalty")
    rows = discovery.train(config, 2, tmp_path / "run", progress=False, device="cpu")
    assert {r["device"] for r in rows} == {"cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            discovery.main(["--quick", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "gpu")])
        assert "has no CUDA device" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_arm_trains_on_cuda_and_resumes_on_the_cpu(tmp_path):
    """Every arm on the GPU (the scenes and noise drawn on the CPU from the same seeds): the rows stay close to a CPU
    run's, and a run trained on CUDA resumes on the CPU from its checkpoint."""
    for arm in discovery.ARMS:
        config = discovery.config_of("", quick=True, arm=arm)
        gpu = discovery.train(config, 2, tmp_path / f"{arm}-cuda", progress=False, device="cuda")
        cpu = discovery.train(config, 2, tmp_path / f"{arm}-cpu", progress=False)
        assert [r["device"] for r in gpu] == ["cuda", "cuda"]
        assert gpu[-1]["mse"] == pytest.approx(cpu[-1]["mse"], rel=0.05), arm
        resumed = discovery.train(config, 4, tmp_path / f"{arm}-cuda", progress=False)
        assert [r["device"] for r in resumed] == ["cuda", "cuda", "cpu"]


def test_slot_cosine_reads_identical_and_orthogonal_slots():
    same = torch.ones(2, 3, 4)
    assert torch.allclose(discovery.slot_cosine(same), torch.ones(2))
    assert torch.allclose(discovery.slot_cosine(torch.eye(3).unsqueeze(0)), torch.zeros(1))
    assert discovery.slot_cosine(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])).item() == pytest.approx(-1.0)


def test_a_fresh_model_s_fixed_point_has_every_slot_the_same(tmp_path):
    """Slot attention is equivariant under permuting the slots, and at initialisation contractive: its one fixed
    point has identical slots, whatever the random initial slots; a few iterations from them are not (the
    transient the unrolled and one-step arms train on). slot_symmetry measures both from a stored checkpoint."""
    config = discovery.config_of("", quick=True, arm="one-step")
    discovery.train(config, 0, tmp_path / "run", progress=False)             # step 0: the checkpoint of a fresh model
    m = discovery.slot_symmetry(tmp_path / "run", scenes=8)
    assert m["step"] == 0 and m["z_star_converged"] == 1.0
    assert m["cosine_z_star"] > 0.999 and m["cosine_trained"] < m["cosine_z_star"] - 0.01
    text = discovery.symmetry_table(tmp_path)
    assert "| one-step | 0 | 0 |" in text and text.count("\n") == 3


def test_discovery_reuse_quick_solves_the_same_systems_with_every_reuse_option(tmp_path):
    from studies import discovery_reuse
    discovery_reuse.main(["--quick", "--out", str(tmp_path / "reuse.json")])
    result = json.loads((tmp_path / "reuse.json").read_text())["results"]
    assert set(result["backwards"]) == {"gmres", "precondition=forward", "initial_guess=forward", "gcrodr recycle",
                                        "warm start"}
    for name, r in result["backwards"].items():
        assert len(r["vjps"]) == result["steps"] == 2 and min(r["vjps"]) > 0, name
        # every option solves the same adjoint systems to 1e-4: the gradients agree to about that tolerance
        assert r["capped_steps"] == 0 and r["rel_error_to_gmres"] < 1e-2, (name, r)
    assert result["best"] in result["pays"] and set(result["pays"]) == set(result["backwards"]) - {"gmres"}


def test_the_dense_radius_of_a_linear_step_is_its_matrix_spectral_radius():
    from studies.discovery_penalty_bias import dense_radius
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 6, 6, generator=g, dtype=torch.float64) / 3        # per scene, on the flattened [3, 2] state

    def step(params, z, x):                  # z: [B, 3, 2], x: [B, 6, 6] (each scene's matrix)
        return torch.einsum("bij,bj->bi", x, z.reshape(z.shape[0], -1)).reshape(z.shape)
    z = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    expected = torch.linalg.eigvals(A).abs().amax(dim=1)
    torch.testing.assert_close(torch.tensor(dense_radius(step, {}, z, A), dtype=torch.float64), expected)
    # k = n Arnoldi steps span the whole space: the Hessenberg matrix is similar to J^T, same spectral radius
    from studies.discovery_penalty_bias import arnoldi_radius
    full = arnoldi_radius(step, {}, z, A, 6, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.tensor(full, dtype=torch.float64), expected)


def test_the_penalty_bias_instrument_reruns_a_penalised_run_and_compares_its_estimate_with_the_dense_radius(tmp_path):
    from studies import discovery_penalty_bias
    config = discovery.config_of("", quick=True, arm="implicit-penalty")
    run = tmp_path / config["name"]
    discovery.train(config, 2, run, progress=False)
    result = discovery_penalty_bias.measure(run, batches=1, quick=True)
    rows, s = result["rows"], result["summary"]
    assert len(rows) == s["scenes"] == 4 and result["checkpoint_step"] == 2
    for r in rows:                           # 100 power steps converge to the dense radius, not past it
        assert r["dense"] > 0 and r["cold_100"] <= r["dense"] * (1 + 1e-3)
    assert s["ratio_min"] <= s["ratio_median"] and s["cold_100_ratio_median"] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(SystemExit, match="not a penalised run"):
        plain = discovery.config_of("", quick=True, arm="one-step")
        discovery.train(plain, 1, tmp_path / plain["name"], progress=False)
        discovery_penalty_bias.measure(tmp_path / plain["name"], batches=1, quick=True)
