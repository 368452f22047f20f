"""`python -m pipeline status [--json]`: what an on-call engineer asks first, in one screen.

- last runs: the newest audit row per entity and stage (`_cdc_runs`);
- lag per source: now minus the newest committed watermark (incremental tables) or minus the
  time of the last loaded full scan (its batch id, which is taken just before the scan starts);
- snapshots: versions, current rows and bytes on disk;
- the unfinished batch the next `cdc-run` resumes, and the last failures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from pipeline import runtime
from pipeline.config import Settings
from pipeline.core.batch import batch_id_problem, batch_time
from pipeline.core.names import RUNS
from pipeline.core.secrets import mask_dsn
from pipeline.extract.tasks import open_source
from pipeline.ops.audit import describe_error
from pipeline.ops.batches import unfinished_batch
from pipeline.snapshot.storage import Names
from pipeline.state import last_done, load_position, load_watermark
from pipeline.warehouse import Warehouse, qualified

STAGE_ORDER = ("extract", "plan_ranges", "extract_range", "raw", "snapshot", "mart", "run")
FAILURES_SHOWN = 5
ERROR_SHOWN = 110


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def _records(wh: Warehouse, sql: str, params: dict[str, Any] | None = None) -> list[dict]:
    """Rows as dicts with the same Python types on both backends (via Arrow)."""
    return wh.query_arrow(sql, params).to_pylist()


def last_runs(wh: Warehouse, database: str) -> list[dict[str, Any]]:
    if not wh.table_exists(database, RUNS):
        return []
    columns = (
        "batch_id",
        "status",
        "duration_s",
        "rows_in",
        "rows_out",
        "versions_opened",
        "versions_closed",
    )
    # aliases differ from the column names: ClickHouse would substitute them into max()
    latest = ", ".join(f"argMax({c}, finished_at) AS last_{c}" for c in columns)
    rows = [
        {k.removeprefix("last_"): v for k, v in row.items()}
        for row in _records(
            wh,
            f"SELECT entity, stage, {latest}, max(finished_at) AS last_finished_at"
            f" FROM {qualified(database, RUNS)} GROUP BY entity, stage",
        )
    ]
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    group = {"mart": 1, "run": 2}
    rows.sort(key=lambda r: (group.get(r["stage"], 0), r["entity"], rank.get(r["stage"], 99)))
    for row in rows:
        row["finished_at"] = _iso(row["finished_at"])
    return rows


def last_failures(wh: Warehouse, database: str, limit: int = FAILURES_SHOWN) -> list[dict]:
    if not wh.table_exists(database, RUNS):
        return []
    rows = _records(
        wh,
        "SELECT finished_at, batch_id, task, task_id, entity, stage, error"
        f" FROM {qualified(database, RUNS)} WHERE status = 'FAILURE'"
        " ORDER BY finished_at DESC LIMIT %(n)s",
        {"n": limit},
    )
    for row in rows:
        row["finished_at"] = _iso(row["finished_at"])
    return rows


def source_lag(wh: Warehouse, cfg: Settings, now: datetime) -> list[dict[str, Any]]:
    rows = []
    for entity in cfg.entities:
        if entity.incremental:
            basis, at = "watermark", load_watermark(wh, cfg.database, entity.name)
        else:
            basis, batch = "full scan", last_done(wh, cfg.database, entity.name, "raw")
            at = batch_time(batch) if batch and batch_id_problem(batch) is None else None
        rows.append(
            {
                "entity": entity.name,
                "source": f"{entity.source}:{entity.object_name}",
                "basis": basis,
                "as_of": _iso(at),
                "lag_s": round((now - at).total_seconds(), 3) if at else None,
            }
        )
    return rows


def snapshot_sizes(wh: Warehouse, cfg: Settings) -> list[dict[str, Any]]:
    rows = []
    for entity in cfg.entities:
        names = Names.of(cfg.database, entity)
        row: dict[str, Any] = {
            "table": names.view,
            "versions": None,
            "current": None,
            "bytes": None,
        }
        if wh.table_exists(cfg.database, names.storage):
            (counts,) = _records(
                wh,
                "SELECT count() AS versions, countIf(dbt_valid_to IS NULL) AS current"
                f" FROM {names.q_view}",
            )
            row.update(counts)
            row["bytes"] = int(
                wh.scalar(
                    "SELECT sum(bytes_on_disk) FROM system.parts"
                    " WHERE database = %(d)s AND table = %(t)s AND active",
                    {"d": cfg.database, "t": names.storage},
                )
                or 0
            )
        rows.append(row)
    return rows


def collect(wh: Warehouse, cfg: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Everything `status` shows, as plain JSON-ready values."""
    now = now or datetime.now(UTC)
    return {
        "generated_at": _iso(now),
        "database": cfg.database,
        "warehouse": mask_dsn(cfg.warehouse_url),
        "unfinished_batch": unfinished_batch(wh, cfg.database),
        "runs": last_runs(wh, cfg.database),
        "lag": source_lag(wh, cfg, now),
        "snapshots": snapshot_sizes(wh, cfg),
        "capture": capture_status(cfg),
        "failures": last_failures(wh, cfg.database),
    }


def capture_status(cfg: Settings) -> list[dict[str, Any]]:
    """Each log-reading entity's slot or stream: lag, what it holds, warnings."""
    rows: list[dict[str, Any]] = []
    for entity in cfg.entities:
        if entity.captures_changes:
            position = load_position(runtime.warehouse(), cfg.database, entity.name)
            source = open_source(entity, "", position)
            rows += [asdict(line) for line in source.status()]
    return rows


def duration(seconds: float | None) -> str:
    """3d 4h, 2h 5m, 4m 12s, 9.3s: two units at most, for a terminal."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    for name, size in units:
        if total >= size or parts:
            parts.append(f"{total // size}{name}")
            total %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def size(value: int | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB"):
        if amount < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def format_time(value: str | None) -> str:
    """An ISO instant as `YYYY-MM-DD HH:MM:SSZ` (UTC), or - when there is none."""
    return value[:19].replace("T", " ") + "Z" if value else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render(data: dict[str, Any]) -> str:
    """The terminal view of `collect()`."""
    out = [
        f"cdc-pipeline status: database {data['database']} on {data['warehouse']}",
        f"as of {format_time(data['generated_at'])}",
    ]
    if data["unfinished_batch"]:
        out.append(f"unfinished batch: {data['unfinished_batch']} (the next cdc-run resumes it)")
    out += ["", "Last runs"]
    runs = [
        (
            r["entity"] or "(batch)",
            r["stage"],
            r["batch_id"],
            r["status"],
            format_time(r["finished_at"]),
            duration(r["duration_s"]),
            r["rows_in"],
            r["rows_out"],
            r["versions_opened"],
            r["versions_closed"],
        )
        for r in data["runs"]
    ]
    header = ("entity", "stage", "batch", "status", "finished", "took", "in", "out", "+v", "-v")
    out += table(header, runs) if runs else ["  (no runs recorded yet)"]
    out += ["", "Lag per source"]
    lag = [
        (r["entity"], r["source"], r["basis"], format_time(r["as_of"]), duration(r["lag_s"]))
        for r in data["lag"]
    ]
    out += table(("entity", "source", "based on", "as of", "lag"), lag)
    out += ["", "Snapshots"]
    snaps = [(r["table"], r["versions"], r["current"], size(r["bytes"])) for r in data["snapshots"]]
    out += table(("table", "versions", "current rows", "on disk"), snaps)
    if data["capture"]:
        out += ["", "Log capture"]
        capture = [
            (r["entity"], r["name"], r["lag"], r["holds"], r["warning"] or "ok")
            for r in data["capture"]
        ]
        out += table(("entity", "slot / stream", "lag", "holds", "state"), capture)
    out += ["", "Last failures"]
    failures = [
        (
            format_time(r["finished_at"]),
            r["batch_id"],
            f"{r['task']} {r['entity']}".strip(),
            _first_line(r["error"]),
        )
        for r in data["failures"]
    ]
    out += table(("finished", "batch", "task", "error"), failures) if failures else ["  (none)"]
    return "\n".join(out)


def _first_line(error: str) -> str:
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line if len(line) <= ERROR_SHOWN else line[: ERROR_SHOWN - 3] + "..."


def main(as_json: bool) -> int:
    """Print the status; a warehouse that cannot answer is one line on stderr and exit 1."""
    import logging
    import sys

    logging.basicConfig(level=logging.ERROR)  # the driver's retry warnings are noise here
    try:
        data = collect(runtime.warehouse(), runtime.settings())
    except Exception as exc:
        print(f"status: {describe_error(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if as_json else render(data))
    return 0
