"""The Luigi graph: Extract -> LoadRaw -> Snapshot per entity, then the marts, under RunAll.

A task's parameters are its identity (entity, batch), so "the same batch again" is "already
complete", and a failed batch is resumed by running RunAll with its batch id. Connection settings
are never parameters: luigid would show them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import luigi

from pipeline.runtime import settings, store, warehouse
from pipeline.state import MarkerTarget, StageResult, ensure_tables, mark_done

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.staging import Manifest

log = logging.getLogger("pipeline")

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
KEYS_SUBDIR = "keys/"


def new_batch_id() -> str:
    """A UTC timestamp id: sortable, so batch order is id order."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _redacted_failure(task: luigi.Task, exception: BaseException) -> str:
    from pipeline.audit import redact

    return redact(luigi.Task.on_failure(task, exception))


def sql_dir() -> Path:
    return Path(os.environ.get("CDC_SQL_DIR", SQL_DIR))


class EntityTask(luigi.Task):
    """One stage of one entity for one batch.

    After `run()` the task carries `result` (rows, versions) and, for extracts, `window`, so
    event handlers (the run audit, alerts) can report them without re-reading anything.
    """

    entity: str = luigi.Parameter()
    batch: str = luigi.Parameter()
    result: StageResult | None = None
    window: dict[str, str | None] | None = None

    def on_failure(self, exception: BaseException) -> str:
        """The traceback luigid stores and e-mails, with secrets masked."""
        return _redacted_failure(self, exception)

    def report(self, message: str, percent: int | None = None) -> None:
        self.set_status_message(message)
        if percent is not None:
            self.set_progress_percentage(percent)
        log.info("%s %s %s: %s", type(self).__name__, self.entity, self.batch, message)

    def record(self, stage: str, result: StageResult) -> None:
        self.result = result
        cfg = settings()
        mark_done(warehouse(), cfg.database, self.entity, stage, self.batch, result)
        self.report(f"{result.rows_in} rows in, {result.rows_out} rows out", 100)


def _new_manifest(entity: Any, batch: str) -> Manifest:
    from pipeline.staging import Manifest

    return Manifest(
        entity=entity.name,
        source=entity.source,
        table=entity.name,
        batch_id=batch,
        extracted_at=datetime.now(UTC).isoformat(),
        full_scan=not entity.incremental,
    )


def _mongo_scan(entity: Any, lower: Any = None, upper: Any = None) -> Iterator[pa.RecordBatch]:
    from pipeline.sources import mongo

    cfg = settings()
    mapping = mongo.FieldMapping(entity.fields, entity.flatten)
    return mongo.scan(
        cfg.mongo_uri, cfg.mongo_db, entity.object_name, cfg.batch_rows, lower, upper, mapping
    )


def _check_scanned_columns(entity: Any, scanned: Iterable[str]) -> None:
    """MongoDB has no schema: the settings are checked against every field the scan met, and
    the raw table's columns (a field no document holds any more is still a column).
    An empty scan of a new entity has nothing to check against."""
    from pipeline.config import check_columns

    columns = set(scanned)
    cfg = settings()
    if warehouse().table_exists(cfg.database, entity.raw_table):
        columns |= set(warehouse().columns(cfg.database, entity.raw_table))
    if columns:
        check_columns(entity, columns, f"MongoDB collection {cfg.mongo_db}.{entity.object_name}")


def _check_table_columns(entity: Any, columns: Sequence[str]) -> None:
    """A PostgreSQL table's columns against the entity's settings and the raw table's own."""
    from pipeline.config import check_columns
    from pipeline.sources.postgres import PostgresSourceError
    from pipeline.warehouse.base import RAW_META_COLUMNS

    where = f"PostgreSQL table {entity.object_name}"
    check_columns(entity, columns, where)
    clash = [c for c in columns if c in RAW_META_COLUMNS]
    if clash:
        raise PostgresSourceError(
            f"{where}: column(s) {clash} clash with the raw table's own columns"
            f" {list(RAW_META_COLUMNS)}; rename them or read the table through a view"
        )


def _checked_at_end(entity: Any, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Pass the batches through, then check the settings before staging writes the manifest."""
    seen: set[str] = set()
    for batch in batches:
        seen.update(batch.schema.names)
        yield batch
    _check_scanned_columns(entity, seen)


class Extract(EntityTask):
    """Source -> Parquet parts + manifest in staging (MongoDB: optionally by `_id` ranges)."""

    read_seconds: float | None = None  # of the run, spent in the source (not in staging)

    def requires(self) -> list[luigi.Task]:
        entity = settings().entity(self.entity)
        if entity.source == "mongo" and entity.partitions > 1:
            return [
                ExtractRange(entity=self.entity, batch=self.batch, index=i)
                for i in range(entity.partitions)
            ]
        return []

    def output(self) -> luigi.Target:
        from pipeline.staging import StagingTarget

        entity = settings().entity(self.entity)
        return StagingTarget(store(), entity.source, entity.name, self.batch)

    def run(self) -> None:
        from pipeline.snapshots import check_valid_to_current
        from pipeline.staging import merge_manifests, write_batch

        cfg = settings()
        entity = cfg.entity(self.entity)
        check_valid_to_current(warehouse(), entity)
        manifest = _new_manifest(entity, self.batch)
        if self.requires():
            ranges = [t.manifest() for t in self.input()]
            _check_scanned_columns(
                entity, [c for m in ranges for p in m.parts for c in p.get("columns", ())]
            )
            merge_manifests(store(), manifest, ranges)
        else:
            batches = self._read(entity, manifest)
            if entity.reconcile:
                manifest.keys_rows = self._stage_keys(entity)
            write_batch(store(), manifest, self._counted(batches), cfg.part_rows)
        self.result = StageResult(rows_in=manifest.rows, rows_out=manifest.rows)
        self.window = manifest.window or None
        done = f"extracted {manifest.rows} rows in {len(manifest.parts)} part(s)"
        if self.read_seconds is not None:
            done += f", {self.read_seconds:.2f} s of it reading the source"
        self.report(done, 100)

    def _read(self, entity: Any, manifest: Manifest) -> Iterator[pa.RecordBatch]:
        cfg = settings()
        self.read_seconds = 0.0
        if entity.source == "mongo":
            return _checked_at_end(entity, _mongo_scan(entity))
        from pipeline.sources import postgres
        from pipeline.state import load_watermark

        watermark = None
        if entity.incremental:
            ensure_tables(warehouse(), cfg.database)
            watermark = load_watermark(warehouse(), cfg.database, entity.name)
        started = time.perf_counter()  # the watermark above is the warehouse's time
        window, batches = postgres.read(
            cfg.postgres_dsn,
            entity.object_name,
            entity.updated_at if entity.incremental else None,
            watermark,
            timedelta(minutes=cfg.lookback_minutes),
            cfg.batch_rows,
            check=lambda columns: _check_table_columns(entity, columns),
            finite=(entity.updated_at, entity.unique_key) if entity.updated_at else None,
        )
        self.read_seconds = time.perf_counter() - started
        if window is not None:
            manifest.window = {
                "lower": window.lower.isoformat() if window.lower else None,
                "upper": window.upper.isoformat(),
            }
        return batches

    def _stage_keys(self, entity: Any) -> int:
        """Stage every key of the table under keys/ (read before the rows' manifest is written)."""
        from pipeline.sources.keys import read_keys
        from pipeline.staging import write_batch

        cfg = settings()
        keys = write_batch(
            store(),
            _new_manifest(entity, self.batch),
            read_keys(cfg.postgres_dsn, entity.object_name, entity.unique_key),
            cfg.part_rows,
            KEYS_SUBDIR,
        )
        return keys.rows

    def _counted(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Count the rows as they pass, and time the source apart from the staging write."""
        rows = 0
        source = iter(batches)
        while True:
            started = time.perf_counter()
            batch = next(source, None)
            self.read_seconds = (self.read_seconds or 0.0) + time.perf_counter() - started
            if batch is None:
                return
            rows += batch.num_rows
            self.report(f"{rows} rows read")
            yield batch


class PlanRanges(EntityTask):
    """Split a MongoDB collection into `partitions` `_id` ranges for parallel extraction."""

    def output(self) -> luigi.Target:
        from pipeline.staging import StagingKeyTarget, batch_prefix

        entity = settings().entity(self.entity)
        key = batch_prefix(entity.source, entity.name, self.batch) + "_ranges.json"
        return StagingKeyTarget(store(), key)

    def run(self) -> None:
        from pipeline.sources import mongo

        cfg = settings()
        entity = cfg.entity(self.entity)
        bounds = mongo.plan_ranges(
            cfg.mongo_uri, cfg.mongo_db, entity.object_name, entity.partitions
        )
        self.output().write(mongo.dump_bounds(bounds))
        self.report(f"{len(bounds) + 1} range(s)", 100)


class ExtractRange(EntityTask):
    """One `_id` range [bound(index - 1), bound(index)) of a MongoDB collection."""

    index: int = luigi.IntParameter()

    def requires(self) -> luigi.Task:
        return PlanRanges(entity=self.entity, batch=self.batch)

    def output(self) -> luigi.Target:
        from pipeline.staging import StagingTarget

        entity = settings().entity(self.entity)
        return StagingTarget(store(), entity.source, entity.name, self.batch, self.subdir)

    @property
    def subdir(self) -> str:
        return f"range={self.index:03d}/"

    def run(self) -> None:
        from pipeline.sources import mongo
        from pipeline.staging import write_batch

        cfg = settings()
        entity = cfg.entity(self.entity)
        bounds = mongo.load_bounds(self.input().read())
        manifest = _new_manifest(entity, self.batch)
        if self.index <= len(bounds):
            lower = bounds[self.index - 1] if self.index > 0 else None
            upper = bounds[self.index] if self.index < len(bounds) else None
            batches = _mongo_scan(entity, lower, upper)
        else:
            batches = iter(())
        write_batch(store(), manifest, batches, cfg.part_rows, self.subdir)
        self.report(f"range {self.index}: {manifest.rows} rows", 100)


class LoadRaw(EntityTask):
    """Staged batch -> raw_<entity>; for incremental sources, then the watermark moves."""

    def requires(self) -> luigi.Task:
        return Extract(entity=self.entity, batch=self.batch)

    def output(self) -> luigi.Target:
        return MarkerTarget(self.entity, "raw", self.batch)

    def run(self) -> None:
        from pipeline.raw import load_batch
        from pipeline.state import save_watermark

        cfg = settings()
        entity = cfg.entity(self.entity)
        wh = warehouse()
        ensure_tables(wh, cfg.database)
        manifest = self.input().manifest()
        self.window = manifest.window or None
        result = load_batch(wh, cfg.database, entity, store(), manifest)
        if manifest.keys_rows is not None:
            from pipeline.raw import load_keys
            from pipeline.staging import StagingTarget

            keys = StagingTarget(store(), entity.source, entity.name, self.batch, KEYS_SUBDIR)
            load_keys(wh, cfg.database, entity, store(), keys.manifest())
        upper = manifest.window.get("upper")
        if entity.incremental and upper:
            save_watermark(wh, cfg.database, entity.name, self.batch, datetime.fromisoformat(upper))
        self.record("raw", result)
        self._retention(entity)

    def _retention(self, entity: Any) -> None:
        """After a committed load: drop expired raw months and staged batches."""
        from pipeline.raw import apply_retention
        from pipeline.scd2 import SnapshotError
        from pipeline.snapshots import batch_time
        from pipeline.staging import prune

        cfg = settings()
        apply_retention(warehouse(), cfg.database, entity)
        if cfg.staging_retention_days <= 0:
            return
        cutoff = batch_time(self.batch) - timedelta(days=cfg.staging_retention_days)

        def expired(batch_id: str) -> bool:
            try:
                return batch_time(batch_id) < cutoff
            except SnapshotError:  # not one of our batch ids: leave it alone
                return False

        pruned = prune(store(), entity.source, entity.name, expired, keep=self.batch)
        if pruned:
            log.info("%s: pruned %d staged batch(es) past retention", entity.name, len(pruned))


class Snapshot(EntityTask):
    """raw batch -> SCD2 history (<entity>_snapshot)."""

    force_deletes: bool = luigi.BoolParameter(default=False, significant=False)

    def requires(self) -> luigi.Task:
        return LoadRaw(entity=self.entity, batch=self.batch)

    def output(self) -> luigi.Target:
        return MarkerTarget(self.entity, "snapshot", self.batch)

    def run(self) -> None:
        from pipeline.snapshots import apply_batch

        cfg = settings()
        entity = cfg.entity(self.entity)
        result = apply_batch(
            warehouse(),
            cfg.database,
            entity,
            self.batch,
            self.force_deletes,
            bucket_rows=cfg.merge_bucket_rows,
        )
        self.record("snapshot", result)


def _project() -> dict[str, Any]:
    from pipeline.marts import load_project

    cfg = settings()
    known = {e.snapshot_table for e in cfg.entities} | {e.raw_table for e in cfg.entities}
    return load_project(sql_dir(), cfg.database, known)


class BuildMart(luigi.Task):
    """One sql/<name>.sql, built atomically after what it reads, then its data tests."""

    name: str = luigi.Parameter()
    batch: str = luigi.Parameter()
    result: StageResult | None = None

    def on_failure(self, exception: BaseException) -> str:
        """The traceback luigid stores and e-mails, with secrets masked."""
        return _redacted_failure(self, exception)

    def requires(self) -> list[luigi.Task]:
        cfg = settings()
        mart = _project()[self.name]
        tables = {e.snapshot_table: e.name for e in cfg.entities}
        tables |= {e.raw_table: e.name for e in cfg.entities}
        deps: list[luigi.Task] = []
        for table in sorted(mart.depends_on):
            if table in tables:
                deps.append(Snapshot(entity=tables[table], batch=self.batch))
            else:
                deps.append(BuildMart(name=table, batch=self.batch))
        return deps

    def output(self) -> luigi.Target:
        return MarkerTarget(f"mart:{self.name}", "mart", self.batch)

    def run(self) -> None:
        from pipeline.marts import build, run_tests

        cfg = settings()
        mart = _project()[self.name]
        self.set_status_message(f"building {mart.name}")
        rows = build(warehouse(), cfg.database, mart)
        self.set_status_message(f"built {rows} rows; running tests")
        for result in run_tests(warehouse(), cfg.database, mart):
            log.info("mart %s test %s", mart.name, result)
        self.result = StageResult(rows_out=rows)
        mark_done(warehouse(), cfg.database, f"mart:{self.name}", "mart", self.batch, self.result)
        self.set_progress_percentage(100)


class RunAll(luigi.WrapperTask):
    """Every entity's snapshot and every mart for one batch."""

    batch: str = luigi.Parameter(default=new_batch_id())

    def requires(self) -> list[luigi.Task]:
        from pipeline.snapshots import batch_time

        batch_time(self.batch)  # refuse malformed ids before anything runs
        cfg = settings()
        tasks: list[luigi.Task] = [Snapshot(entity=e.name, batch=self.batch) for e in cfg.entities]
        tasks += [BuildMart(name=name, batch=self.batch) for name in sorted(_project())]
        return tasks
