"""One measured run of our pipeline in a fresh process: `python -m bench.worker ...`.

The parent (`bench.run`) times the whole process and reads its peak RSS from `wait4`; this side
reports what only it can see: time spent importing, inside `luigi.build`, in each task's `run()`
(Luigi's PROCESSING_TIME event), and what the run wrote, counted after the clock has stopped.
Configuration comes from the CDC_* environment, like any deployment.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# Luigi task class -> the stage its run() time is billed to
STAGES = {
    "Extract": "extract",
    "PlanRanges": "extract",
    "ExtractRange": "extract",
    "LoadRaw": "load",
    "Snapshot": "snapshot",
    "BuildMart": "marts",
}


def peak_rss_kb() -> int | None:
    """This process's own high-water RSS (VmHWM).

    Not the parent's `wait4` figure: Linux carries the forking parent's RSS high-water mark
    over `exec`, so a small child of a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Restart this process's VmHWM (Linux: write 5 to clear_refs), so a stage's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _tasks(args: argparse.Namespace) -> list[Any]:
    from pipeline.graph import Extract, LoadRaw, RunAll, Snapshot

    if args.runall:
        return [RunAll(batch=args.batch)]
    task = {"extract": Extract, "load": LoadRaw, "snapshot": Snapshot}[args.until]
    return [task(entity=e, batch=args.batch) for e in args.entity]


def _count(wh: Any, sql: str) -> int | None:
    """A count for the report; a query the pipeline's schema no longer supports gives None."""
    try:
        return int(wh.scalar(sql))
    except Exception:
        return None


def _written(entity: str, batch: str) -> dict[str, Any]:
    """What this batch left in storage: raw rows, and snapshot rows it opened or closed."""
    from pipeline.graph import Extract, Snapshot
    from pipeline.runtime import settings, warehouse
    from pipeline.warehouse import literal, qualified

    cfg = settings()
    wh = warehouse()
    ent = cfg.entity(entity)
    b = literal(batch)
    storage = qualified(cfg.database, f"{ent.snapshot_table}__versions")
    view = qualified(cfg.database, ent.snapshot_table)
    snap = Snapshot(entity=entity, batch=batch).result
    extract = Extract(entity=entity, batch=batch)
    return {
        "extracted": extract.result.rows_in if extract.result else None,
        "window": extract.window,
        "read_s": extract.read_seconds,
        "raw_rows_written": _count(
            wh,
            f"SELECT count() FROM {qualified(cfg.database, ent.raw_table)} WHERE _batch_id = {b}",
        ),
        "snapshot_rows_written": _count(
            wh, f"SELECT count() FROM {storage} WHERE _opened_by = {b} OR _closed_by = {b}"
        ),
        "versions_opened": snap.versions_opened if snap else None,
        "versions_closed": snap.versions_closed if snap else None,
        "current_versions": _count(wh, f"SELECT count() FROM {view} WHERE dbt_valid_to IS NULL"),
        "all_versions": _count(wh, f"SELECT count() FROM {view}"),
    }


# libraries a run uses, imported before the clock starts as the floors import theirs (with
# what they import on first use: pyarrow.dataset by the first Parquet read, about 10 ms; the
# queue and date modules by Luigi's first task)
PRELOAD = (
    "pyarrow",
    "pyarrow.parquet",
    "pyarrow.dataset",
    "pyarrow.ipc",
    "pyarrow.compute",
    "pymongo",
    "xxhash",
    "multiprocessing.queues",
    "dateutil.relativedelta",
)


def _preload() -> None:
    """Import what the run will import anyway, the warehouse's and staging's drivers included
    (chDB's library alone is ~0.2 s, minio ~0.1 s): imports are a fixed per-process cost,
    reported as `import_s`."""
    import importlib
    import os

    url = os.environ.get("CDC_WAREHOUSE_URL", "")
    driver = ("chdb", "chdb.session") if url.startswith("chdb:") else ("clickhouse_driver",)
    staging = ("minio",) if os.environ.get("CDC_STAGING_URL", "").startswith("s3:") else ()
    for name in (*PRELOAD, *driver, *staging):
        importlib.import_module(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--entity", action="append", default=[])
    parser.add_argument("--until", choices=("extract", "load", "snapshot"), default="snapshot")
    parser.add_argument("--runall", action="store_true")
    args = parser.parse_args()

    import luigi
    from luigi.execution_summary import LuigiStatusCode

    import pipeline  # the task modules, as `luigi --module pipeline` loads them

    pipeline.runtime.without_pandas()  # as in a `luigi` process
    _preload()

    imported = time.perf_counter()
    pipeline.runtime.warehouse()  # chDB's start-up (or a server connection): reported apart
    opened = time.perf_counter()
    stages: dict[str, float] = defaultdict(float)
    stage_peaks: dict[str, float] = {}
    peak_before = 0

    @luigi.Task.event_handler(luigi.Event.START)
    def _started(task: luigi.Task) -> None:
        nonlocal peak_before
        peak_before = max(peak_before, peak_rss_kb() or 0)
        reset_peak()

    @luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
    def _timed(task: luigi.Task, seconds: float) -> None:
        if not isinstance(task, luigi.WrapperTask):
            stage = STAGES.get(type(task).__name__, type(task).__name__)
            stages[stage] += seconds
            peak = (peak_rss_kb() or 0) / 1024
            stage_peaks[stage] = max(stage_peaks.get(stage, 0.0), peak)

    result = luigi.build(
        _tasks(args), local_scheduler=True, workers=1, log_level="WARNING", detailed_summary=True
    )
    done = time.perf_counter()
    ok = result.status in (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY)
    report: dict[str, Any] = {
        "ok": ok,
        "status": result.status.name,
        "import_s": imported - STARTED,
        "open_s": opened - imported,
        "inside": done - opened,
        "stages": dict(stages),
    }
    if not ok:
        report["error"] = result.summary_text[-3000:]
    else:
        entities = args.entity or []
        if args.runall:
            from pipeline.runtime import settings

            entities = [e.name for e in settings().entities]
        if args.until == "snapshot":
            report["entities"] = {e: _written(e, args.batch) for e in entities}
            first = report["entities"].get(entities[0], {}) if entities else {}
            report["rows"] = first.get("extracted")
    report["count_s"] = time.perf_counter() - done  # the bench's own counting: not the run's
    report["peak_kb"] = max(peak_before, peak_rss_kb() or 0) or None
    report["extra"] = {"stage_peak_mb": stage_peaks}
    args.out.write_text(json.dumps(report, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
