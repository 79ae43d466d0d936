"""Spectral reports: files, self-contained HTML, numbers traceable to summary.json, verdict words, atomic writes."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pytest

import fpgrad.report
from fpgrad.report import (
    atomic_directory,
    atomic_write_text,
    derived_numbers,
    format_number,
    markdown_table,
    markdown_to_html,
    save_figure,
    spectral_markdown,
    spectral_report,
)
from fpgrad.spectral._summary import SpectralSummary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_NAMES = {"spectral_radius", "eigenvalues", "singular_values", "residuals", "estimators"}
# a number as the report prints it: not glued to a word ('float64', 'sigma_2') nor inside another number
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
# mathematical constants the text may print without their being data ('ρ < 1', 'cosine > 0', 'Σ_(i≥1)')
CONSTANTS = {"0", "1"}

ESTIMATOR_ROWS = [
    {"estimator": "implicit-gmres", "relative_error": 3.2e-9, "cosine": 1.0, "vjps": 41, "jvps": 0,
     "forward_steps": 57, "seconds": 0.21},
    {"estimator": "neumann-5", "relative_error": 0.21, "cosine": 0.97, "vjps": 6, "jvps": 0, "forward_steps": 57},
    {"estimator": "one-step", "relative_error": 0.62, "cosine": 0.81, "vjps": 1, "jvps": 0, "forward_steps": 57},
    {"estimator": "cg", "relative_error": 1.31, "cosine": -0.08, "vjps": 30, "jvps": 0, "forward_steps": 57,
     "converged": False},
    {"estimator": "finite-difference", "relative_error": 0.0, "cosine": 1.0, "vjps": 0, "jvps": 0,
     "forward_steps": 4800},
]


def synthetic_summary(rho: float = 0.8, batch: int = 3, n: int = 12, lipschitz: float = 1.3,
                      estimators: bool = True, unconverged: int = 0, seed: int = 0) -> SpectralSummary:
    """A complete summary with made-up but self-consistent-looking numbers (no map involved)."""
    rng = np.random.default_rng(seed)
    eigenvalues, radii, sv, sv_i, lips, smin, cond, residuals, rates = [], [], [], [], [], [], [], [], []
    for b in range(batch):
        r = rho * (1.0 - 0.04 * b)
        modulus = r * np.sqrt(rng.uniform(0.0, 1.0, n))
        modulus[0] = r
        angle = rng.uniform(-np.pi, np.pi, n)
        angle[0] = 0.0
        ev = sorted(([float(m * np.cos(a)), float(m * np.sin(a))] for m, a in zip(modulus, angle, strict=True)),
                    key=lambda p: -math.hypot(*p))
        eigenvalues.append(ev)
        radii.append(r)
        s = np.sort(rng.uniform(0.05, lipschitz, 6))[::-1]
        s[0] = lipschitz * (1.0 - 0.02 * b)
        sv.append(s.tolist())
        lips.append(float(s[0]))
        si = np.sort(rng.uniform(abs(1.0 - r) + 0.01, 1.6, 4))
        sv_i.append(si.tolist())
        smin.append(float(si[0]))
        cond.append(float(2.2 / si[0]))
        q = min(0.97 * r, 0.995)
        residuals.append([float(q ** t * (1.0 + 0.5 * math.exp(-t / 3.0))) for t in range(40 + 5 * b)])
        rates.append(q)
    return SpectralSummary(
        map_name="tanh-rnn-12", n=n, batch=batch, method="dense", dtype="torch.float64", device="cpu", seed=seed,
        eigenvalues=eigenvalues, eigenvalues_complete=True, spectral_radius=radii,
        spectral_radius_uncertainty=[1e-10] * batch, singular_values=sv, singular_values_I_minus_J=sv_i,
        lipschitz=lips, sigma_min_I_minus_J=smin, condition_I_minus_J=cond,
        frobenius=[1.7 + 0.1 * b for b in range(batch)],
        frobenius_interval=[[1.5 + 0.1 * b, 1.9 + 0.1 * b] for b in range(batch)], confidence=0.95,
        forward={"method": "iterate", "tol": 1e-8, "steps": [len(r) for r in residuals],
                 "converged": [True] * (batch - unconverged) + [False] * unconverged},
        residuals=residuals, contraction_rate=rates,
        cost={"jvps": 36, "vjps": 12, "seconds": {"eigenvalues": 0.01, "singular_values": 0.02}},
        estimators=[dict(r) for r in ESTIMATOR_ROWS] if estimators else [],
        notes=["synthetic numbers for the report tests"])


def minimal_summary(**fields) -> SpectralSummary:
    """Only the required fields (plus any given): every optional list empty."""
    return SpectralSummary(map_name="bare", n=4, batch=2, method="power", dtype="float32", device="cpu", **fields)


def markdown_of(summary: SpectralSummary, tol: float = 1e-6) -> str:
    """The report's text without drawing figures (the verdict does not depend on them)."""
    return spectral_markdown(summary, derived_numbers(summary, tol), {}, "report")


def section(markdown: str, heading: str) -> str:
    """The text of one '## heading' section, up to the next '## '."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end >= 0 else len(markdown)]


def json_numbers(obj) -> set[str]:
    """Every number in a JSON document, formatted as the report formats numbers, plus numbers inside strings."""
    out: set[str] = set()
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        out.add(format_number(obj))
    elif isinstance(obj, str):
        out.update(NUMBER.findall(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            out |= json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= json_numbers(v)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One report of a contractive summary with estimator rows, written once for the read-only tests."""
    out = tmp_path_factory.mktemp("reports") / "spectral"
    summary = synthetic_summary()
    spectral_report(summary, out)
    return summary, out


SUMMARIES = {
    "contractive": lambda: synthetic_summary(rho=0.8),
    "not_contractive": lambda: synthetic_summary(rho=1.2, batch=6, unconverged=2),
    "contractive_normal": lambda: synthetic_summary(rho=0.5, lipschitz=0.6, estimators=False),
    "radius_only": lambda: minimal_summary(spectral_radius=[0.97, 0.93], spectral_radius_uncertainty=[0.05, 0.01]),
    "empty": lambda: minimal_summary(),
    "nan_radius": lambda: minimal_summary(spectral_radius=[0.5, float("nan")], lipschitz=[0.7, float("nan")]),
}


# ---- the folder ---------------------------------------------------------------------------------------

def test_report_folder_holds_markdown_html_json_and_png_figures(written):
    _, out = written
    for name in ("report.md", "report.html", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} == FIGURE_NAMES
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_html_is_self_contained_with_every_figure_embedded_as_data_uri(written):
    _, out = written
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|file:|//)""", page, re.I)
    assert "url(" not in page and "@import" not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(FIGURE_NAMES)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def test_summary_json_is_the_summary_plus_a_report_key_and_round_trips(written):
    summary, out = written
    payload = json.loads((out / "summary.json").read_text())
    assert "report" in payload and payload["report"]["verdict"] == "contractive"
    assert SpectralSummary.from_json((out / "summary.json").read_text()) == summary
    assert list(payload) == sorted(payload)  # sorted keys: stable diffs between runs


@pytest.mark.parametrize("name", sorted(SUMMARIES))
def test_every_number_in_the_markdown_is_in_summary_json(name, tmp_path):
    summary = SUMMARIES[name]()
    out = spectral_report(summary, tmp_path / name)
    markdown = (out / "report.md").read_text()
    known = json_numbers(json.loads((out / "summary.json").read_text()))
    verdict = section(markdown, "Verdict") + section(markdown, "Which gradient estimators are safe here")
    assert [x for x in NUMBER.findall(verdict) if x not in known | CONSTANTS] == []
    sample_labels = {str(i) for i in range(summary.batch)}
    assert [x for x in NUMBER.findall(markdown) if x not in known | CONSTANTS | sample_labels] == []


# ---- the verdict --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho, word", [(0.8, "Contractive"), (0.999, "Contractive"), (1.0, "Not contractive"),
                                       (1.3, "Not contractive")])
def test_verdict_says_contractive_exactly_when_the_largest_radius_is_below_one(rho, word, tmp_path):
    summary = synthetic_summary(rho=rho, batch=2)
    verdict = section(markdown_of(summary), "Verdict")
    assert verdict.split("\n\n")[1].startswith(f"**{word}.**")
    assert ("not contractive" in verdict.lower()) == (not summary.contractive)
    assert f"ρ = {format_number(max(summary.spectral_radius))}" in verdict


def test_verdict_states_distance_from_one_and_steps_to_tolerance():
    markdown = markdown_of(synthetic_summary(rho=0.5, batch=1), tol=1e-6)
    assert "1 - ρ = 0.5" in markdown
    assert "log(tol) / log(ρ) = 20 steps" in markdown   # 0.5^20 < 1e-6 < 0.5^19


def test_lipschitz_above_one_with_radius_below_one_is_called_non_normal():
    assert "**Non-normal:** ‖J‖₂ > 1 > ρ" in markdown_of(synthetic_summary(rho=0.8, lipschitz=1.3))
    assert "Non-normal" not in markdown_of(synthetic_summary(rho=0.5, lipschitz=0.6))


def test_conditioning_line_gives_sigma_min_cond_and_error_bound_factor(written):
    summary, out = written
    payload = json.loads((out / "summary.json").read_text())
    markdown = (out / "report.md").read_text()
    sigma = min(summary.sigma_min_I_minus_J)
    assert math.isclose(payload["report"]["error_bound_factor"], 1.0 / sigma)
    assert f"σ_min(I − J) = {format_number(sigma)}" in markdown
    assert f"cond(I − J) = {format_number(max(summary.condition_I_minus_J))}" in markdown
    assert f"‖r‖ / σ_min = {format_number(1.0 / sigma)} ‖r‖" in markdown


def test_not_contractive_report_calls_truncated_series_unsafe_and_points_to_gmres():
    safety = section(markdown_of(synthetic_summary(rho=1.2)), "Which gradient estimators are safe here")
    assert "**Neumann-k, one-step, phantom: unsafe.**" in safety
    assert "this is the estimator to use" in safety


def test_complex_eigenvalues_rule_out_cg(written):
    _, out = written
    assert "**CG: not applicable.**" in (out / "report.md").read_text()


def test_estimator_rows_give_a_table_and_name_the_non_descent_directions(written):
    _, out = written
    markdown = (out / "report.md").read_text()
    estimators = section(markdown, "Gradient estimators")
    assert "| estimator | relative error | cosine | VJPs | JVPs |" in estimators
    assert all(f"| {row['estimator']} |" in estimators for row in ESTIMATOR_ROWS)
    assert "Not a descent direction: cg (cosine -0.08)." in markdown
    assert "Most accurate: implicit-gmres" in markdown  # the zero-error reference row is not a contender


def test_missing_fields_omit_their_sections_with_a_note(tmp_path):
    out = spectral_report(SUMMARIES["radius_only"](), tmp_path / "r")
    markdown = (out / "report.md").read_text()
    for note in ("Omitted: the summary holds no eigenvalues.",
                 "Omitted: the summary holds no singular values of J or of I − J.",
                 "Omitted: the summary holds no forward residual trace.",
                 "Omitted: the summary holds no gradient-estimator rows."):
        assert note in markdown
    assert {p.stem for p in (out / "figures").glob("*.png")} == {"spectral_radius"}
    # ρ = 0.97 ± 0.05 reaches 1: still contractive, but the text says the margin is within the uncertainty
    assert "**Contractive.**" in markdown and "contraction is not certain" in markdown


def test_summary_without_any_spectrum_says_contraction_is_unknown(tmp_path):
    out = spectral_report(minimal_summary(), tmp_path / "r")
    markdown = (out / "report.md").read_text()
    assert "**Contraction unknown.**" in markdown and "Not contractive" not in markdown
    assert not list(out.rglob("*.png"))
    assert "<img" not in (out / "report.html").read_text()


def test_an_unconverged_forward_solve_is_flagged_in_the_verdict():
    verdict = section(markdown_of(synthetic_summary(batch=3, unconverged=2)), "Verdict")
    assert "Caution: the forward solve did not converge on 2 of 3 samples" in verdict
    assert "Converged on 1 of 3 samples" in verdict
    assert "Caution" not in markdown_of(synthetic_summary(batch=3))


def test_a_sample_without_a_finite_radius_leaves_the_verdict_open():
    markdown = markdown_of(SUMMARIES["nan_radius"]())
    assert "**Contraction unknown.**" in markdown and "1 sample without a finite estimate leaves" in markdown


def test_same_summary_gives_byte_identical_reports(tmp_path):
    a = spectral_report(synthetic_summary(batch=2), tmp_path / "a")
    b = spectral_report(synthetic_summary(batch=2), tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_writing_a_report_leaves_matplotlib_global_state_alone(tmp_path):
    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    spectral_report(synthetic_summary(batch=1), tmp_path / "r")
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc


# ---- atomic writes ------------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_rewrite_leaves_the_old_report_intact_and_no_temporary_folder(tmp_path, monkeypatch):
    out = spectral_report(synthetic_summary(rho=0.8, batch=1), tmp_path / "report")
    before = _snapshot(out)

    def broken(summary):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(fpgrad.report._figures, "residual_figure", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        spectral_report(synthetic_summary(rho=1.2, batch=1), out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_overwrite_false_refuses_an_existing_folder_and_names_it(tmp_path):
    out = spectral_report(minimal_summary(spectral_radius=[0.5, 0.4]), tmp_path / "report")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        spectral_report(synthetic_summary(rho=1.2), out, overwrite=False)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_overwrite_replaces_the_whole_folder(tmp_path):
    out = spectral_report(synthetic_summary(batch=1, estimators=False), tmp_path / "report")
    (out / "stale.txt").write_text("from an older run")
    spectral_report(minimal_summary(spectral_radius=[0.5, 0.4]), out)
    assert not (out / "stale.txt").exists()
    assert not (out / "figures" / "eigenvalues.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_atomic_directory_removes_its_temporary_folder_when_the_block_raises(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("half")
            assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file, not a folder")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_directory(target):
            pass
    assert target.read_text() == "a file, not a folder"


def test_atomic_directory_gives_the_folder_an_ordinary_mode(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x.txt").write_text("x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def test_atomic_write_text_replaces_whole_files_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "notes.md"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "third")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["notes.md"]


# ---- helpers for studies -----------------------------------------------------------------------------

def test_markdown_table_formats_aligns_and_escapes():
    rows = [{"name": "a|b", "error": 0.000123456, "steps": 12}, {"name": "c", "error": 2.5, "steps": None}]
    table = markdown_table(rows, ["name", "error", "steps"], {"error": ".2e"}, headers={"error": "rel. error"})
    assert table.splitlines() == ["| name | rel. error | steps |",
                                  "| --- | ---: | ---: |",
                                  "| a\\|b | 1.23e-04 | 12 |",
                                  "| c | 2.50e+00 | - |"]


def test_format_number_uses_four_significant_digits():
    assert [format_number(v) for v in (0.95123, 1e-6, 12, 3.0, float("inf"), float("nan"), True)] == \
        ["0.9512", "1e-06", "12", "3", "inf", "nan", "yes"]


def test_markdown_to_html_renders_blocks_and_escapes_text(tmp_path):
    fig_path = tmp_path / "f.png"
    fig_path.write_bytes(PNG_SIGNATURE + b"rest")
    text = ("# Title <x>\n\nA **bold** and `code` paragraph\ncontinued.\n\n- one\n- two\n\n"
            "| a | b |\n| --- | ---: |\n| 1 | 2 |\n\n![fig](f.png)\n*caption*\n\n```\nx < y\n```\n")
    page = markdown_to_html(text, base_dir=tmp_path)
    assert '<h1 id="title-x">Title &lt;x&gt;</h1>' in page
    assert "<p>A <strong>bold</strong> and <code>code</code> paragraph continued.</p>" in page
    assert "<ul><li>one</li><li>two</li></ul>" in page
    assert '<td style="text-align:right">2</td>' in page
    assert '<img src="data:image/png;base64,' in page and "<figcaption>caption</figcaption>" in page
    assert "<pre><code>x &lt; y</code></pre>" in page


def test_markdown_to_html_refuses_remote_images_and_names_missing_ones(tmp_path):
    with pytest.raises(ValueError, match="not a local file"):
        markdown_to_html("![x](https://example.org/x.png)\n", base_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        markdown_to_html("![x](nope.png)\n", base_dir=tmp_path)


def test_save_figure_writes_a_png_without_stamps(tmp_path):
    from fpgrad.report import figure_style, new_figure

    def draw():
        with figure_style():
            fig, axes = new_figure(3, 2)
            axes[0, 0].plot([0, 1], [1, 0])
        return fig

    save_figure(draw(), tmp_path / "a.png")
    save_figure(draw(), tmp_path / "b.png")
    data = (tmp_path / "a.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data == (tmp_path / "b.png").read_bytes()
    assert b"matplotlib" not in data.lower()


# ---- the rendered page --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=2000", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium) for the render check")
def test_html_report_renders_in_headless_chromium_with_its_figures(written, tmp_path):
    _, out = written
    page = out / "report.html"
    shot = tmp_path / "shot.png"
    run = _chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000",
                    "--enable-logging=stderr", "--v=0")
    assert run.returncode == 0, run.stderr[-2000:]
    # the page's Content-Security-Policy reports any blocked (non data:) load on the console
    problems = [line for line in run.stderr.splitlines()
                if "CONSOLE" in line or "Failed to load" in line or "ERR_" in line or "Refused" in line]
    assert problems == []
    from matplotlib.image import imread
    image = imread(shot)
    assert image.shape[:2] == (3000, 1200)
    rgb = image[..., :3]
    assert (rgb.min(axis=2) < 0.95).mean() > 0.05            # not a blank page
    colourful = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.3     # figure markers; text and tables are grey
    assert colourful[1000:].mean() > 0.002
    assert len(np.unique((rgb[1000:] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 500

    dom = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0
    assert dom.stdout.count('<img src="data:image/png;base64,') == len(FIGURE_NAMES)
    assert "Verdict" in dom.stdout


def test_a_float32_trace_flat_at_its_round_off_floor_is_named_in_the_verdict():
    """A float32 trace that fell as rho^t and then flattened at ~1e-6 of its start: the measured rate is slower than
    rho because of round-off, not a transient (issue 17, item 6)."""
    summary = synthetic_summary(batch=1)
    trace = [max(0.5 ** t, 2e-6 * (1 + 0.1 * (t % 3))) for t in range(60)]
    forward = {**summary.forward, "steps": [60], "converged": [False]}
    summary = dataclasses.replace(summary, dtype="torch.float32", residuals=[trace], contraction_rate=[0.9],
                                  spectral_radius=[0.5], forward=forward)
    text = markdown_of(summary)
    assert "the round-off floor of float32" in text and "may still be in a transient" not in text
    healthy = dataclasses.replace(summary, dtype="torch.float64")      # 2e-6 is far above float64's floor
    assert "round-off floor" not in markdown_of(healthy)
