"""The report people look at: ``reports/<dataset>/report.html``, one self-contained page (no external file, font or
script; the figure is embedded as a data URI) with the dataset's statistics, the protocol, the comparison table,
the paired-bootstrap table when there is one, and the learning curves and test metrics in one colour per model.
``recsys.report`` writes it beside ``eval.md`` from the same tables."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np

from kernels.atomic import atomic_write_bytes

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}.note{color:#555}"""


def dataset_statistics(dataset) -> list[tuple[str, str]]:
    """(name, value) pairs describing a processed dataset."""
    manifest, lengths = dataset.manifest, np.asarray(dataset.sequences.lengths())
    counts = manifest["counts"]
    users, items, interactions = int(counts["users"]), int(counts["items"]), int(counts["interactions"])
    return [
        ("name", manifest["name"]),
        ("users", f"{users:,}"), ("items", f"{items:,}"), ("interactions", f"{interactions:,}"),
        ("density", f"{interactions / max(users * items, 1):.5f}"),
        ("sequence length (mean / median / max)",
         f"{lengths.mean():.1f} / {np.median(lengths):g} / {lengths.max()}" if len(lengths) else "-"),
        ("repeated user-item pairs", "yes" if counts.get("has_repeats") else "no"),
        ("timestamps", "event order only" if manifest.get("timestamps_are_positions") else "real times"),
        ("content hash", manifest.get("content_hash", "?")[:16]),
    ]


def inline(text: str) -> str:
    """Escaped text with the Markdown the report's sentences use (``code``, **bold**) as HTML."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def table(header: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, dataset: str, statistics: list[tuple[str, str]], protocol: list[str],
               tables: list[tuple[str, str, list[str], list[list[str]]]], figure_png: bytes,
               notes: list[str] = ()) -> None:
    """``tables``: (title, note, header, cells) in page order; tables without cells are left out."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation on "
             f"{html.escape(dataset)}</title><style>{STYLE}</style></head><body>",
             f"<h1>Evaluation on <code>{html.escape(dataset)}</code></h1>", "<h2>Dataset</h2>",
             table(["statistic", "value"], [list(pair) for pair in statistics]), "<h2>Protocol</h2>",
             *[f"<p>{inline(line)}</p>" for line in protocol]]
    for title, note, header, cells in tables:
        if cells:
            parts += [f"<h2>{html.escape(title)}</h2>", f"<p class='note'>{inline(note)}</p>" if note else "",
                      table(header, cells)]
    image = base64.b64encode(figure_png).decode()
    parts += ["<h2>Learning curves and test metrics</h2>",
              f"<img alt='validation NDCG@10 per epoch; test metrics' src='data:image/png;base64,{image}'>",
              *[f"<p class='note'>{inline(line)}</p>" for line in notes if line.strip()], "</body></html>"]
    atomic_write_bytes(path, "\n".join(parts).encode())
