"""Reports: seaborn figures and Markdown / self-contained HTML writers. Nothing here computes numbers.

    fpgrad.report.spectral_report(summary, "reports/spectral")   # report.md, report.html, figures/, summary.json

The helpers (atomic writes, tables, figure saving, Markdown -> HTML) are for studies and benchmarks too.
"""

from .._io import atomic_directory, atomic_write_bytes, atomic_write_text
from ._figures import figure_style, new_figure, save_figure
from ._markdown import format_number, markdown_table, markdown_to_html, write_html
from ._verdict import derived_numbers
from ._writer import spectral_markdown, spectral_report

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "derived_numbers",
    "figure_style",
    "format_number",
    "markdown_table",
    "markdown_to_html",
    "new_figure",
    "save_figure",
    "spectral_markdown",
    "spectral_report",
    "write_html",
]
