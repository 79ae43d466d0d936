"""Study `training`: object discovery with a slot attention autoencoder trained with the unrolled, the
one-step (Chang et al. 2022) and the exact implicit gradient, with the paper's ablations at small scale.

    fpgrad study training [--quick] [--out reports/training]

Each configuration trains one model (deterministic given its seed) on procedurally generated scenes
(`fpgrad.data.MultiShapes`, in the setting `fpgrad.setting` shares with benchmarks/reuse.py) and returns one
row: training curves (loss, gradient norm and spikes, forward residual, spectral radius of J, one-step/unrolled
vs implicit gradient cosine) and the final evaluation (FG-ARI and MSE at several test-time iteration counts).
`finalize` turns the rows into tables, figures and README.md without recomputing anything.

    run.py      the grid and one configuration's training run
    tables.py   results.csv, summary.csv and the README's iteration table
    figures.py  figures/*.png
    reading.py  README.md: its sections and the written reading
"""

from __future__ import annotations

from pathlib import Path

from fpgrad._io import atomic_write_text
from fpgrad.study import Study
from fpgrad.study_tools import csv_text

from .figures import draw_all
from .reading import readme
from .run import ABLATIONS, ESTIMATORS, LABELS, ablation_settings, build_model, dataset, grid, settings, train
from .tables import run_table, summary_table

__all__ = ["ABLATIONS", "ESTIMATORS", "LABELS", "STUDY", "ablation_settings", "build_model", "dataset", "finalize",
           "grid", "settings", "train"]


def finalize(rows: list[dict], out_dir: Path, meta: dict) -> None:
    """results.csv, summary.csv, figures/*.png and README.md from the rows."""
    from fpgrad.report import markdown_table
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    if not rows:
        atomic_write_text(out / "README.md", "# Training study\n\nNo finished rows yet.\n")
        return
    more = max(rows[0]["eval_iters"])
    T = rows[0]["config"]["iters"]
    table = run_table(rows)
    summary = summary_table(table, more)
    atomic_write_text(out / "results.csv", csv_text(table, list(table[0])))
    atomic_write_text(out / "summary.csv", csv_text(summary, list(summary[0])))
    saved = draw_all(rows, summary, more, T, out / "figures")
    atomic_write_text(out / "README.md", readme(rows, table, summary, saved, meta, more, T, markdown_table))


STUDY = Study(name="training",
              description="slot attention autoencoders trained with unrolled, one-step and implicit gradients",
              grid=grid, run=train, finalize=finalize, module=__name__)
