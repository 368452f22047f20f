"""Snapshot's Luigi task: a loaded raw batch -> the entity's SCD2 history."""

from __future__ import annotations

import luigi

from pipeline import runtime
from pipeline.load.rehash import ensure_current_hashes
from pipeline.load.tasks import LoadRaw
from pipeline.snapshot.apply import apply
from pipeline.task import EntityTask, MarkerTarget


class Snapshot(EntityTask):
    """raw batch -> SCD2 history (<entity>_snapshot)."""

    stage = "snapshot"
    force_deletes: bool = luigi.BoolParameter(default=False, significant=False)

    def requires(self) -> luigi.Task:
        return LoadRaw(entity=self.entity, batch=self.batch)

    def output(self) -> luigi.Target:
        return MarkerTarget(self.entity, self.stage, self.batch)

    def execute(self) -> None:
        cfg = runtime.settings()
        entity = cfg.entity(self.entity)
        wh = runtime.warehouse()
        # the raw table's writer gives the batch hashes of the current check_cols first
        ensure_current_hashes(wh, cfg.database, entity, self.batch, cfg.merge_bucket_rows)
        result = apply(
            wh,
            cfg.database,
            entity,
            self.batch,
            self.force_deletes,
            bucket_rows=cfg.merge_bucket_rows,
        )
        self.record(result)
