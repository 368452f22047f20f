"""`python -m pipeline COMMAND`: the commands an operator runs by hand.

- summary: rows per raw table, versions and current rows per snapshot, rows per mart.
- check:   SCD2 invariants of every snapshot; exit 1 and name the keys on a violation.
- compile: print the resolved SQL of one mart or all of them.
- status:  last runs, lag per source, snapshot sizes, last failures (`--json` for scripts).
- report:  one self-contained HTML page: lineage graph and versions per batch (`--output PATH`).
- rebuild: replay an entity's raw batches into a fresh history and swap it in.
- adopt:   continue the history of a snapshot table that dbt built (the migration path).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.runtime import settings, warehouse, without_pandas
from pipeline.warehouse import qualified


def _count(table: str, where: str = "") -> int | None:
    cfg = settings()
    wh = warehouse()
    if not wh.table_exists(cfg.database, table):
        return None
    return int(wh.scalar(f"SELECT count() FROM {qualified(cfg.database, table)} {where}") or 0)


def summary() -> list[tuple[str, str, str]]:
    """(table, what, value) rows describing what the last runs left in the warehouse."""
    from pipeline.tasks import _project

    cfg = settings()
    rows: list[tuple[str, str, str]] = []
    for entity in cfg.entities:
        raw = _count(entity.raw_table)
        rows.append((entity.raw_table, "rows", "-" if raw is None else str(raw)))
    for entity in cfg.entities:
        storage = f"{entity.snapshot_table}__versions"
        versions = _count(storage, "FINAL")
        current = _count(storage, "FINAL WHERE dbt_valid_to IS NULL")
        rows.append((entity.snapshot_table, "versions", "-" if versions is None else str(versions)))
        rows.append(
            (entity.snapshot_table, "current rows", "-" if current is None else str(current))
        )
    for name in sorted(_project()):
        count = _count(name)
        rows.append((name, "rows", "-" if count is None else str(count)))
    return rows


def _print_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def check() -> int:
    from pipeline.snapshots import Names, check_invariants

    cfg = settings()
    wh = warehouse()
    failed = 0
    for entity in cfg.entities:
        names = Names.of(cfg.database, entity)
        if not wh.table_exists(cfg.database, names.storage):
            print(f"{entity.snapshot_table}: not built yet")
            continue
        problems = check_invariants(wh, names, entity, bucket_rows=cfg.merge_bucket_rows)
        print(f"{entity.snapshot_table}: {'OK' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  {problem}")
        failed += bool(problems)
    return 1 if failed else 0


def compile_marts(name: str | None) -> int:
    from pipeline.tasks import _project

    project = _project()
    if name is not None and name not in project:
        print(f"unknown mart {name!r}; known: {', '.join(sorted(project))}", file=sys.stderr)
        return 2
    for mart_name in [name] if name else sorted(project):
        print(f"-- {mart_name} ({project[mart_name].path})")
        print(project[mart_name].sql.strip())
        print()
    return 0


def _add_ops_commands(sub: argparse._SubParsersAction) -> None:
    """Operations commands (pipeline/status.py, pipeline/report.py)."""
    status_parser = sub.add_parser("status", help="last runs, lag, snapshot sizes, failures")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    report_parser = sub.add_parser("report", help="write the HTML lineage and batches report")
    report_parser.add_argument("--output", type=Path, required=True, metavar="PATH")


def _run_ops_command(args: argparse.Namespace) -> int:
    if args.command == "status":
        from pipeline import status

        return status.main(args.json)
    from pipeline import report

    return report.main(args.output)


def _add_snapshot_commands(sub: argparse._SubParsersAction) -> None:
    rebuild = sub.add_parser("rebuild", help="rebuild a snapshot from its raw batches")
    rebuild.add_argument("entity")
    rebuild.add_argument("--force-deletes", action="store_true", help="bypass the delete guard")
    adopt = sub.add_parser("adopt", help="take over a dbt snapshot table in place")
    adopt.add_argument("entity")
    adopt.add_argument("--table", help="the dbt table (default: <entity>_snapshot)")


def _run_snapshot_command(args: argparse.Namespace) -> int:
    from pipeline.scd2 import SnapshotError
    from pipeline.snapshot_maintenance import adopt, rebuild

    cfg = settings()
    entity = cfg.entity(args.entity)
    try:
        if args.command == "rebuild":
            count = rebuild(
                warehouse(), cfg.database, entity, args.force_deletes, cfg.merge_bucket_rows
            )
            print(f"{entity.snapshot_table}: rebuilt from {count} raw batch(es)")
        else:
            count = adopt(warehouse(), cfg.database, entity, args.table)
            print(f"{entity.snapshot_table}: adopted {count} version(s); dbt's table kept")
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("summary", help="rows per raw table, snapshot and mart")
    sub.add_parser("check", help="verify the SCD2 invariants of every snapshot")
    compile_parser = sub.add_parser("compile", help="print the resolved SQL of marts")
    compile_parser.add_argument("name", nargs="?")
    _add_ops_commands(sub)
    _add_snapshot_commands(sub)
    args = parser.parse_args(argv)
    without_pandas()
    if args.command in ("status", "report"):
        return _run_ops_command(args)
    if args.command in ("rebuild", "adopt"):
        return _run_snapshot_command(args)
    if args.command == "summary":
        _print_table(summary(), ("table", "what", "value"))
        return 0
    if args.command == "check":
        return check()
    return compile_marts(args.name)


if __name__ == "__main__":
    sys.exit(main())
