"""`python -m pipeline report --output PATH`: one self-contained HTML page to look at.

The page has the lineage graph (sources -> raw -> snapshots -> marts, with row counts) and, per
snapshot, a chart of the versions each batch opened and closed, both as inline SVG; styles are
inline and nothing is fetched, so the file can be mailed, archived or opened offline.
The charts use a log scale: the first batch opens every row, later ones a handful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from pipeline import runtime
from pipeline.config import Settings
from pipeline.core.names import BATCHES
from pipeline.core.secrets import mask_dsn
from pipeline.marts.tasks import project
from pipeline.ops.audit import describe_error
from pipeline.ops.status import collect, duration, format_time
from pipeline.warehouse import Warehouse, qualified

BATCHES_SHOWN = 30
NODE_W, NODE_H, COL_GAP, ROW_GAP, TOP = 232, 56, 56, 18, 44
CHART_W, CHART_H = 410, 230
COLUMN_TITLES = ("Sources", "Raw tables", "Snapshots (SCD2)", "Marts")
SOURCE_NAMES = {"mongo": "MongoDB", "postgres": "PostgreSQL"}

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0; color: #1f2933; background: #f5f7fa; }
header { background: #1f2933; color: #f5f7fa; padding: 14px 28px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 2px 0 0; color: #cbd2d9; }
main { padding: 8px 28px 28px; }
h2 { font-size: 16px; margin: 22px 0 8px; }
section.card { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px;
               padding: 4px 16px 14px; margin-top: 14px; overflow-x: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 2px; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #e4e7eb; }
td.num { text-align: right; }
.failure td { color: #ab091e; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
"""
COLORS = {
    "source": ("#e3f8ff", "#0b69a3"),
    "raw": ("#f0f4f8", "#52606d"),
    "snapshot": ("#effcf6", "#147d64"),
    "mart": ("#fffbea", "#b44d12"),
}
OPENED, CLOSED = "#199473", "#d64545"


@dataclass(frozen=True)
class Node:
    id: str
    kind: str
    label: str
    detail: str
    column: int


def _count(wh: Warehouse, database: str, table: str, where: str = "") -> int | None:
    if not wh.table_exists(database, table):
        return None
    return int(wh.scalar(f"SELECT count() FROM {qualified(database, table)} {where}") or 0)


def _rows(value: int | None, noun: str = "rows") -> str:
    return "not built yet" if value is None else f"{value:,} {noun}"


def lineage(
    wh: Warehouse, cfg: Settings, marts: dict[str, Any]
) -> tuple[list[Node], list[tuple[str, str]]]:
    """Nodes per stage and edges (from, to); marts are placed one column after their inputs."""
    nodes: list[Node] = []
    edges: list[tuple[str, str]] = []
    for e in cfg.entities:
        mode = "incremental" if e.incremental else "full scan"
        nodes.append(
            Node(f"src:{e.name}", "source", e.object_name, f"{SOURCE_NAMES[e.source]}, {mode}", 0)
        )
        raw = _count(wh, cfg.database, e.raw_table)
        nodes.append(Node(e.raw_table, "raw", e.raw_table, _rows(raw), 1))
        versions = _count(wh, cfg.database, e.snapshot_table)
        current = _count(wh, cfg.database, e.snapshot_table, "WHERE dbt_valid_to IS NULL")
        detail = _rows(versions, "versions")
        if current is not None:
            detail += f", {current:,} current"
        nodes.append(Node(e.snapshot_table, "snapshot", e.snapshot_table, detail, 2))
        edges += [(f"src:{e.name}", e.raw_table), (e.raw_table, e.snapshot_table)]
    levels: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in levels:
            inputs = [level(d) + 1 for d in marts[name].depends_on if d in marts]
            levels[name] = max(inputs, default=0)
        return levels[name]

    for name in sorted(marts, key=lambda n: (level(n), n)):
        rows = _count(wh, cfg.database, name)
        nodes.append(Node(name, "mart", name, _rows(rows), 3 + level(name)))
        edges += [(dep, name) for dep in sorted(marts[name].depends_on)]
    known = {n.id for n in nodes}
    return nodes, [(a, b) for a, b in edges if a in known and b in known]


def _fit(label: str) -> str:
    """Squeeze a label that would overflow its box (about 8 px per character at 14 px bold)."""
    room = NODE_W - 24
    if len(label) * 8 <= room:
        return ""
    return f' textLength="{room}" lengthAdjust="spacingAndGlyphs"'


def lineage_svg(nodes: list[Node], edges: list[tuple[str, str]]) -> str:
    columns: dict[int, list[Node]] = {}
    for node in nodes:
        columns.setdefault(node.column, []).append(node)
    tallest = max(len(c) for c in columns.values())
    height = TOP + tallest * (NODE_H + ROW_GAP) + 10
    width = (max(columns) + 1) * (NODE_W + COL_GAP) - COL_GAP + 20
    place: dict[str, tuple[float, float]] = {}
    for col, members in columns.items():
        offset = (tallest - len(members)) * (NODE_H + ROW_GAP) / 2
        for i, node in enumerate(members):
            place[node.id] = (10 + col * (NODE_W + COL_GAP), TOP + offset + i * (NODE_H + ROW_GAP))
    parts = [
        f'<svg id="lineage" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}"'
        f' style="width: 100%; max-width: {width}px; height: auto" role="img"'
        ' aria-label="lineage graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        ' markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#9aa5b1"/></marker>'
        "</defs>",
    ]
    for col, title in enumerate(COLUMN_TITLES):
        if col in columns:
            parts.append(
                f'<text x="{10 + col * (NODE_W + COL_GAP)}" y="20" font-size="13"'
                f' font-weight="600" fill="#52606d">{escape(title)}</text>'
            )
    for a, b in edges:
        (x1, y1), (x2, y2) = place[a], place[b]
        x1, y1, x2, y2 = x1 + NODE_W, y1 + NODE_H / 2, x2 - 2, y2 + NODE_H / 2
        bend = (x2 - x1) / 2
        parts.append(
            f'<path class="edge" data-from="{escape(a)}" data-to="{escape(b)}"'
            f' d="M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},{y2:.1f}'
            f' {x2:.1f},{y2:.1f}" fill="none" stroke="#9aa5b1" stroke-width="1.6"'
            ' marker-end="url(#arrow)"/>'
        )
    for node in nodes:
        x, y = place[node.id]
        fill, stroke = COLORS[node.kind]
        parts.append(
            f'<g class="node {node.kind}" data-id="{escape(node.id)}">'
            f"<title>{escape(node.label)}: {escape(node.detail)}</title>"
            f'<rect x="{x}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="8"'
            f' fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
            f'<text x="{x + 12}" y="{y + 23:.1f}" font-size="14" font-weight="600"'
            f' fill="#1f2933"{_fit(node.label)}>{escape(node.label)}</text>'
            f'<text x="{x + 12}" y="{y + 43:.1f}" font-size="12" fill="#52606d">'
            f"{escape(node.detail)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def batch_series(wh: Warehouse, database: str, entity: str) -> list[tuple[str, int, int]]:
    """(batch id, versions opened, versions closed) of the last snapshot batches, oldest first."""
    if not wh.table_exists(database, BATCHES):
        return []
    rows = wh.query_rows(
        "SELECT batch_id, sum(versions_opened), sum(versions_closed)"
        f" FROM {qualified(database, BATCHES)}"
        " WHERE entity = %(e)s AND stage = 'snapshot'"
        " GROUP BY batch_id ORDER BY batch_id DESC LIMIT %(n)s",
        {"e": entity, "n": BATCHES_SHOWN},
    )
    return [(str(b), int(o), int(c)) for b, o, c in reversed(rows)]


def batch_labels(batches: list[str]) -> list[str]:
    """Axis labels from batch ids (UTC times): MM-DD HH:MM, or HH:MM:SS when minutes repeat."""
    if not all(len(b) >= 15 and b[8] == "T" for b in batches):
        return [b[:11] for b in batches]
    labels = [f"{b[4:6]}-{b[6:8]} {b[9:11]}:{b[11:13]}" for b in batches]
    if len(set(labels)) < len(labels):
        labels = [f"{b[9:11]}:{b[11:13]}:{b[13:15]}" for b in batches]
    return labels


def chart_svg(snapshot: str, series: list[tuple[str, int, int]]) -> str:
    """Grouped bars on a log scale, one group per batch, with exact values in tooltips."""
    left, right, top, bottom = 46, 10, 26, 44
    plot_w, plot_h = CHART_W - left - right, CHART_H - top - bottom
    peak = max([1, *(max(o, c) for _, o, c in series)])
    decades = max(1, math.ceil(math.log10(peak + 1)))

    def y(value: int) -> float:
        return top + plot_h - plot_h * math.log10(value + 1) / decades

    parts = [
        f'<svg class="chart" data-snapshot="{escape(snapshot)}" data-batches="{len(series)}"'
        f' xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}"'
        f' viewBox="0 0 {CHART_W} {CHART_H}" role="img"'
        f' aria-label="versions opened and closed per batch in {escape(snapshot)}">',
        f'<rect x="{left}" y="{top - 18}" width="10" height="10" fill="{OPENED}"/>'
        f'<text x="{left + 14}" y="{top - 9}" font-size="11">opened</text>'
        f'<rect x="{left + 70}" y="{top - 18}" width="10" height="10" fill="{CLOSED}"/>'
        f'<text x="{left + 84}" y="{top - 9}" font-size="11">closed</text>'
        f'<text x="{CHART_W - right}" y="{top - 9}" font-size="11" fill="#7b8794"'
        ' text-anchor="end">log scale</text>',
    ]
    for power in range(decades + 1):
        ty = y(10**power - 1)
        parts.append(
            f'<line x1="{left}" x2="{CHART_W - right}" y1="{ty:.1f}" y2="{ty:.1f}"'
            ' stroke="#e4e7eb"/>'
            f'<text x="{left - 6}" y="{ty + 4:.1f}" font-size="10" fill="#7b8794"'
            f' text-anchor="end">{10**power - 1 if power == 0 else f"{10**power:,}"}</text>'
        )
    if not series:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" font-size="12"'
            ' fill="#7b8794" text-anchor="middle">no batches yet</text>'
        )
    slot = plot_w / max(1, len(series))
    bar = max(2.0, min(16.0, slot * 0.36))
    every = max(1, math.ceil(len(series) / 6))
    labels = batch_labels([batch for batch, _, _ in series])
    for i, (batch, opened, closed) in enumerate(series):
        x = left + i * slot + slot / 2
        for kind, value, bx, color in (
            ("opened", opened, x - bar, OPENED),
            ("closed", closed, x, CLOSED),
        ):
            by = y(value)
            parts.append(
                f'<rect class="bar {kind}" data-batch="{escape(batch)}" data-value="{value}"'
                f' x="{bx:.1f}" y="{by:.1f}" width="{bar:.1f}" height="{top + plot_h - by:.1f}"'
                f' fill="{color}"><title>batch {escape(batch)}: {value:,} {kind}</title></rect>'
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="10" fill="#52606d"'
                f' text-anchor="middle">{escape(labels[i])}</text>'
            )
    parts.append(
        f'<line x1="{left}" x2="{CHART_W - right}" y1="{top + plot_h}" y2="{top + plot_h}"'
        ' stroke="#9aa5b1"/>'
        f'<text x="{left + plot_w / 2}" y="{CHART_H - 6}" font-size="11" fill="#52606d"'
        ' text-anchor="middle">batch (UTC)</text></svg>'
    )
    return "".join(parts)


def _status_tables(data: dict[str, Any]) -> str:
    lag_rows = "".join(
        f"<tr><td>{escape(r['entity'])}</td><td>{escape(r['source'])}</td>"
        f"<td>{escape(r['basis'])}</td><td>{escape(format_time(r['as_of']))}</td>"
        f'<td class="num">{escape(duration(r["lag_s"]))}</td></tr>'
        for r in data["lag"]
    )
    failure_rows = "".join(
        f'<tr class="failure"><td>{escape(format_time(r["finished_at"]))}</td>'
        f"<td>{escape(r['batch_id'])}</td><td>{escape(r['task'])} {escape(r['entity'])}</td>"
        f"<td>{escape(r['error'].splitlines()[0] if r['error'] else '')}</td></tr>"
        for r in data["failures"]
    )
    unfinished = data["unfinished_batch"]
    return (
        '<section class="card" id="sources"><h2>Lag per source</h2>'
        "<table><tr><th>entity</th><th>source</th><th>based on</th><th>as of</th>"
        f"<th>lag</th></tr>{lag_rows}</table>"
        + (
            f"<p>Unfinished batch <b>{escape(unfinished)}</b>: the next cdc-run resumes it.</p>"
            if unfinished
            else ""
        )
        + "<h2>Last failures</h2>"
        + (
            "<table><tr><th>finished</th><th>batch</th><th>task</th><th>error</th></tr>"
            f"{failure_rows}</table>"
            if failure_rows
            else "<p>None recorded.</p>"
        )
        + "</section>"
    )


def render(wh: Warehouse, cfg: Settings, marts: dict[str, Any], now: datetime) -> str:
    nodes, edges = lineage(wh, cfg, marts)
    charts = "".join(
        f"<figure><figcaption>{escape(e.snapshot_table)}</figcaption>"
        f"{chart_svg(e.snapshot_table, batch_series(wh, cfg.database, e.name))}</figure>"
        for e in cfg.entities
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cdc-pipeline report: {escape(cfg.database)}</title><style>{STYLE}</style>"
        "</head><body><header><h1>cdc-pipeline</h1>"
        f"<p>database {escape(cfg.database)} on {escape(mask_dsn(cfg.warehouse_url))}, "
        f"generated {now:%Y-%m-%d %H:%M:%S} UTC</p></header><main>"
        '<section class="card" id="lineage-card"><h2>Lineage</h2>'
        f"{lineage_svg(nodes, edges)}</section>"
        '<section class="card" id="snapshot-charts"><h2>Versions opened and closed per batch</h2>'
        f'<div class="charts">{charts}</div></section>'
        f"{_status_tables(collect(wh, cfg, now))}"
        "</main></body></html>\n"
    )


def main(output: Path) -> int:
    """Write the page; a warehouse that cannot answer is one line on stderr and exit 1."""
    import logging
    import sys

    logging.basicConfig(level=logging.ERROR)  # the driver's retry warnings are noise here
    try:
        page = render(runtime.warehouse(), runtime.settings(), project(), datetime.now(UTC))
    except Exception as exc:
        print(f"report: {describe_error(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    print(f"report written to {output}")
    return 0
