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

from pipeline.core.errors import PipelineError
from pipeline.load.rehash import ensure_current_hashes
from pipeline.marts.tasks import project
from pipeline.ops import report, status
from pipeline.ops.audit import describe_error
from pipeline.runtime import settings, warehouse, without_pandas
from pipeline.snapshot.invariants import check_invariants
from pipeline.snapshot.maintenance import adopt, rebuild
from pipeline.snapshot.storage import Names
from pipeline.warehouse import qualified


def _count(table: str, where: str = "") -> int | None:
    cfg = settings()
    wh = warehouse()
    if not wh.table_exists(cfg.database, table):
        return None
    return int(wh.scalar(f"SELECT count() FROM {qualified(cfg.database, table)} {where}") or 0)


def summary() -> list[tuple[str, str, str]]:
    """(table, what, value) rows describing what the last runs left in the warehouse."""
    cfg = settings()
    rows: list[tuple[str, str, str]] = []
    for entity in cfg.entities:
        raw = _count(entity.raw_table)
        rows.append((entity.raw_table, "rows", "-" if raw is None else str(raw)))
    for entity in cfg.entities:
        storage = entity.storage_table
        versions = _count(storage, "FINAL")
        current = _count(storage, "FINAL WHERE dbt_valid_to IS NULL")
        rows.append((entity.snapshot_table, "versions", "-" if versions is None else str(versions)))
        rows.append(
            (entity.snapshot_table, "current rows", "-" if current is None else str(current))
        )
    for name in sorted(project()):
        count = _count(name)
        rows.append((name, "rows", "-" if count is None else str(count)))
    return rows


def _print_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def check() -> int:
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
    marts = project()
    if name is not None and name not in marts:
        print(f"unknown mart {name!r}; known: {', '.join(sorted(marts))}", file=sys.stderr)
        return 2
    for mart_name in [name] if name else sorted(marts):
        print(f"-- {mart_name} ({marts[mart_name].path})")
        print(marts[mart_name].sql.strip())
        print()
    return 0


def _add_ops_commands(sub: argparse._SubParsersAction) -> None:
    """Operations commands (pipeline/ops/status.py, pipeline/ops/report.py)."""
    status_parser = sub.add_parser("status", help="last runs, lag, snapshot sizes, failures")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    report_parser = sub.add_parser("report", help="write the HTML lineage and batches report")
    report_parser.add_argument("--output", type=Path, required=True, metavar="PATH")


def _run_ops_command(args: argparse.Namespace) -> int:
    if args.command == "status":
        return status.main(args.json)
    return report.main(args.output)


def _add_snapshot_commands(sub: argparse._SubParsersAction) -> None:
    rebuild = sub.add_parser("rebuild", help="rebuild a snapshot from its raw batches")
    rebuild.add_argument("entity")
    rebuild.add_argument("--force-deletes", action="store_true", help="bypass the delete guard")
    adopt = sub.add_parser("adopt", help="take over a dbt snapshot table in place")
    adopt.add_argument("entity")
    adopt.add_argument("--table", help="the dbt table (default: <entity>_snapshot)")


def _run_snapshot_command(args: argparse.Namespace) -> int:
    cfg = settings()
    entity = cfg.entity(args.entity)
    wh = warehouse()

    def rehash(batch: str) -> bool:
        return ensure_current_hashes(wh, cfg.database, entity, batch, cfg.merge_bucket_rows)

    try:
        if args.command == "rebuild":
            count = rebuild(
                wh, cfg.database, entity, args.force_deletes, cfg.merge_bucket_rows, rehash
            )
            print(f"{entity.snapshot_table}: rebuilt from {count} raw batch(es)")
        else:
            count = adopt(wh, cfg.database, entity, args.table)
            print(f"{entity.snapshot_table}: adopted {count} version(s); dbt's table kept")
    except PipelineError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
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
    try:
        return _dispatch(args)
    except PipelineError as exc:  # a clear message already: no traceback
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
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
