"""Markdown helpers: number formatting, tables, and a small Markdown -> self-contained HTML converter.

The converter knows the subset the reports write: ATX headings, paragraphs, `-` lists, pipe tables,
fenced code blocks, block images `![alt](path)`, and inline `**bold**`, `*italic*`, `` `code` ``.
Images are embedded as base64 data URIs, so the HTML file needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
import math
import mimetypes
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from .._io import PathLike, atomic_write_text

Format = Union[str, Callable[[Any], str]]


def format_number(value: Any) -> str:
    """How every report prints a number: integers in full, floats to 4 significant digits ('0.9512', '1e-06').

    Booleans print as 'yes' / 'no', None as '-', NaN as 'nan', infinities as 'inf' / '-inf'; anything
    else with str().
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   formats: Mapping[str, Format] | None = None, *,
                   headers: Mapping[str, str] | None = None) -> str:
    """A pipe table of `rows` (dicts) restricted to `columns`, in that order; numeric columns right-aligned.

    formats: per column, a format spec ('.3e') or a callable value -> str; default `format_number`.
    headers: per column, the header text (default: the column key). A missing key prints '-'.
    """
    formats = dict(formats or {})
    headers = dict(headers or {})

    def cell(row: Mapping[str, Any], col: str) -> str:
        value = row.get(col)
        fmt = formats.get(col)
        if value is None or fmt is None:
            return format_number(value)
        return fmt(value) if callable(fmt) else format(value, fmt)

    head = [_escape_cell(str(headers.get(c, c))) for c in columns]
    numeric = [bool(rows) and all(_is_number(r.get(c)) or r.get(c) is None for r in rows)
               and any(_is_number(r.get(c)) for r in rows) for c in columns]
    rule = ["---:" if num else "---" for num in numeric]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_escape_cell(cell(row, c)) for c in columns) + " |")
    return "\n".join(lines)


# ---- Markdown -> HTML ------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; line-height: 1.5;
       color: #1f2328; max-width: 1000px; margin: 2em auto; padding: 0 1.5em; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
code { background: #f3f4f6; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; border-radius: 6px; }
pre code { background: none; padding: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 92%; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #57606a; font-size: 92%; margin-top: .3em; }
ul { padding-left: 1.4em; }
li { margin: .25em 0; }
"""

# No script, no remote anything: only inline styles and data: images may load.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)(?:\s+\"(?P<title>[^\"]*)\")?\)\s*$")
_LIST_ITEM = re.compile(r"^[-*+]\s+(.*)$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_INLINE = re.compile(r"`(?P<code>[^`]+)`|\*\*(?P<bold>.+?)\*\*|(?<![\w*])\*(?P<em>[^*\s][^*]*?)\*(?![\w*])")


def _inline(text: str) -> str:
    """Escape HTML and render `code`, **bold** and *italic* spans."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()], quote=False))
        if m.group("code") is not None:
            out.append(f"<code>{html.escape(m.group('code'), quote=False)}</code>")
        elif m.group("bold") is not None:
            out.append(f"<strong>{_inline(m.group('bold'))}</strong>")
        else:
            out.append(f"<em>{_inline(m.group('em'))}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:], quote=False))
    return "".join(out)


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def _data_uri(src: str, base_dir: Path) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", src) and not src.startswith("data:"):
        raise ValueError(f"image {src!r} is not a local file; a self-contained report can only embed local images")
    if src.startswith("data:"):
        return src
    path = (base_dir / src) if not Path(src).is_absolute() else Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"image {src!r} not found at {path}; write the figure before the HTML")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_to_html(markdown_text: str, *, base_dir: PathLike = ".", title: str | None = None) -> str:
    """A complete, self-contained HTML page of `markdown_text` (inline CSS; images embedded as data URIs).

    base_dir: the folder relative image paths are read from (the Markdown file's folder).
    title: the page's <title>; default the first heading's text.
    """
    base = Path(base_dir)
    lines = markdown_text.splitlines()
    body: list[str] = []
    i = 0
    first_heading: str | None = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
            continue
        if stripped.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            code = "\n".join(lines[i + 1:j])
            body.append(f"<pre><code>{html.escape(code, quote=False)}</code></pre>")
            i = j + 1
            continue
        heading = _HEADING.match(stripped)
        if heading:
            level, text = len(heading.group(1)), heading.group(2)
            first_heading = first_heading or text
            anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
            body.append(f'<h{level} id="{anchor}">{_inline(text)}</h{level}>')
            i += 1
            continue
        image = _IMAGE.match(stripped)
        if image:
            alt = image.group("alt")
            uri = _data_uri(image.group("src"), base)
            i += 1
            caption = ""
            # an italic paragraph right after an image is its caption
            if i < len(lines) and re.match(r"^\*[^*].*\*$", lines[i].strip()):
                caption = f"<figcaption>{_inline(lines[i].strip()[1:-1])}</figcaption>"
                i += 1
            body.append(f'<figure><img src="{uri}" alt="{html.escape(alt)}">{caption}</figure>')
            continue
        if stripped.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()):
            header = _split_row(stripped)
            aligns = ["right" if c.endswith(":") else "left" for c in _split_row(lines[i + 1])]
            i += 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_split_row(lines[i]))
                i += 1
            th = "".join(f'<th style="text-align:{a}">{_inline(h)}</th>' for h, a in zip(header, aligns, strict=False))
            trs = "".join("<tr>" + "".join(f'<td style="text-align:{a}">{_inline(c)}</td>'
                                           for c, a in zip(row, aligns, strict=False)) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
            continue
        if _LIST_ITEM.match(stripped):
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                item = _LIST_ITEM.match(lines[i].strip())
                if item:
                    items.append(item.group(1))
                elif lines[i].startswith((" ", "\t")) and items:   # continuation line of an item
                    items[-1] += " " + lines[i].strip()
                else:
                    break
                i += 1
            body.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
            continue
        para = [stripped]
        i += 1
        while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
            para.append(lines[i].strip())
            i += 1
        body.append(f"<p>{_inline(' '.join(para))}</p>")
    page_title = html.escape(title if title is not None else (first_heading or "report"), quote=False)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{page_title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _starts_block(lines: list[str], i: int) -> bool:
    s = lines[i].strip()
    return bool(_HEADING.match(s) or _IMAGE.match(s) or _LIST_ITEM.match(s) or s.startswith("```")
                or (s.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip())))


def write_html(markdown_text: str, out_path: PathLike, *, base_dir: PathLike | None = None,
               title: str | None = None) -> Path:
    """Convert `markdown_text` with `markdown_to_html` and write it atomically to `out_path`.

    base_dir: where relative image paths are read from; default the folder of `out_path`.
    """
    out_path = Path(out_path)
    page = markdown_to_html(markdown_text, base_dir=out_path.parent if base_dir is None else base_dir, title=title)
    return atomic_write_text(out_path, page)
