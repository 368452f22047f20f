"""Extract's Luigi tasks: a source -> Parquet parts + manifest in staging.

`Extract` reads the whole batch of an entity, or merges the manifests of the `ExtractRange`
tasks that read its `_id` ranges in parallel (planned once by `PlanRanges`). Its Target is the
staged manifest, written last.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import luigi

from pipeline import runtime
from pipeline.checks import check_valid_to_current
from pipeline.config import Entity
from pipeline.core.manifest import Manifest
from pipeline.core.names import KEYS_SUBDIR, RANGES, batch_prefix, range_subdir
from pipeline.extract import Context, Source, source_for
from pipeline.staging import (
    Store,
    manifest_exists,
    merge_manifests,
    read_manifest,
    write_batch,
)
from pipeline.state import StageResult, load_position
from pipeline.task import EntityTask

if TYPE_CHECKING:
    import pyarrow as pa


class StagingTarget(luigi.Target):
    """A staged batch (or one `_id` range of it, in `subdir`): exists once its manifest does."""

    def __init__(self, store: Store, entity: Entity, batch_id: str, subdir: str = "") -> None:
        self.store = store
        self.prefix = batch_prefix(entity.source, entity.name, batch_id) + subdir

    def exists(self) -> bool:
        return manifest_exists(self.store, self.prefix)

    def manifest(self) -> Manifest:
        return read_manifest(self.store, self.prefix)


class StagingKeyTarget(luigi.Target):
    """One small object in staging (e.g. the `_id` range plan of a batch)."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key

    def exists(self) -> bool:
        return self.store.exists(self.key)

    def read(self) -> bytes:
        return self.store.get(self.key)

    def write(self, data: bytes) -> None:
        self.store.put(self.key, data)


def new_manifest(entity: Entity, batch: str) -> Manifest:
    return Manifest(
        entity=entity.name,
        source=entity.source,
        table=entity.name,
        batch_id=batch,
        extracted_at=datetime.now(UTC).isoformat(),
        full_scan=not entity.incremental,
    )


def open_source(entity: Entity, batch: str, position: str | None = None) -> Source:
    """The entity's source, told the raw table's columns (checks of sources without schema)."""
    cfg, wh = runtime.settings(), runtime.warehouse()
    known = frozenset(wh.columns(cfg.database, entity.raw_table))  # none before the first load
    context = Context(cfg, entity, batch, position, known, runtime.store, runtime.warehouse)
    return source_for(context)


class Extract(EntityTask):
    """Source -> Parquet parts + manifest in staging (MongoDB: optionally by `_id` ranges)."""

    stage = "extract"
    read_seconds: float | None = None  # of the run, spent in the source (not in staging)

    def requires(self) -> list[luigi.Task]:
        entity = runtime.settings().entity(self.entity)
        parts = entity.partitions
        if parts > 1 and entity.captures_changes:  # only its bootstrap scan is partitioned
            parts = open_source(entity, self.batch, self._position(entity)).partitions()
        return [
            ExtractRange(entity=self.entity, batch=self.batch, index=i)
            for i in range(parts)
            if parts > 1
        ]

    def _position(self, entity: Entity) -> str | None:
        """Where the entity's last loaded batch ended (sources that read what changed)."""
        if not entity.keeps_raw_history:
            return None
        return load_position(runtime.warehouse(), runtime.settings().database, entity.name)

    def output(self) -> luigi.Target:
        return StagingTarget(runtime.store(), runtime.settings().entity(self.entity), self.batch)

    def execute(self) -> None:
        cfg = runtime.settings()
        entity = cfg.entity(self.entity)
        check_valid_to_current(entity, runtime.warehouse())
        manifest = new_manifest(entity, self.batch)
        if self.requires():
            ranges = [target.manifest() for target in self.input()]
            source = open_source(entity, self.batch, self._position(entity))
            source.check_scanned(set().union(*(m.columns() for m in ranges)))
            plan = PlanRanges(entity=self.entity, batch=self.batch).output().read()
            manifest.window, whole = source.ranges_window(plan)
            if whole is not None:
                manifest.full_scan = whole
            merge_manifests(runtime.store(), manifest, ranges)
        else:
            self._stage(entity, manifest)
        self.result = StageResult(rows_in=manifest.rows, rows_out=manifest.rows)
        self.window = manifest.window or None
        done = f"extracted {manifest.rows} rows in {len(manifest.parts)} part(s)"
        if self.read_seconds is not None:
            done += f", {self.read_seconds:.2f} s of it reading the source"
        self.report(done, 100)

    def _stage(self, entity: Entity, manifest: Manifest) -> None:
        cfg = runtime.settings()
        position = self._position(entity)
        started = time.perf_counter()  # the position above is the warehouse's time
        source = open_source(entity, self.batch, position)
        read = source.read()
        self.read_seconds = time.perf_counter() - started
        manifest.window = read.window
        if read.whole is not None:
            manifest.full_scan = read.whole
        for staged in read.staged:
            manifest.parts.extend(staged.parts)
            manifest.rows += staged.rows
        if entity.reconcile:
            keys = new_manifest(entity, self.batch)
            manifest.keys_rows = write_batch(
                runtime.store(), keys, source.keys(), cfg.part_rows, KEYS_SUBDIR
            ).rows
        write_batch(runtime.store(), manifest, self._counted(read.batches), cfg.part_rows)

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
    """Split a collection into `partitions` `_id` ranges for parallel extraction."""

    stage = "plan_ranges"

    def output(self) -> luigi.Target:
        entity = runtime.settings().entity(self.entity)
        key = batch_prefix(entity.source, entity.name, self.batch) + RANGES
        return StagingKeyTarget(runtime.store(), key)

    def execute(self) -> None:
        entity = runtime.settings().entity(self.entity)
        plan, ranges = open_source(entity, self.batch).plan_ranges()
        self.output().write(plan)
        self.report(f"{ranges} range(s)", 100)


class ExtractRange(EntityTask):
    """One range of a partitioned extract, staged under `range=NNN/` of the batch."""

    stage = "extract_range"
    index: int = luigi.IntParameter()

    def requires(self) -> luigi.Task:
        return PlanRanges(entity=self.entity, batch=self.batch)

    def output(self) -> luigi.Target:
        entity = runtime.settings().entity(self.entity)
        return StagingTarget(runtime.store(), entity, self.batch, range_subdir(self.index))

    def execute(self) -> None:
        cfg = runtime.settings()
        entity = cfg.entity(self.entity)
        source = open_source(entity, self.batch)
        batches = source.read_range(self.input().read(), self.index)
        manifest = new_manifest(entity, self.batch)
        subdir = range_subdir(self.index)
        write_batch(runtime.store(), manifest, batches, cfg.part_rows, subdir)
        self.report(f"range {self.index}: {manifest.rows} rows", 100)
