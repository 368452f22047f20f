"""Load's Luigi task: a staged batch -> `raw_<entity>`, then the source position moves."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import luigi

from pipeline import runtime
from pipeline.config import Entity
from pipeline.core.batch import batch_time
from pipeline.core.errors import BatchIdError
from pipeline.core.names import KEYS_SUBDIR, batch_prefix
from pipeline.extract.tasks import Extract, open_source
from pipeline.load.keys import load_keys
from pipeline.load.raw import load_batch
from pipeline.load.retention import apply_retention
from pipeline.staging import prune, read_manifest
from pipeline.state import ensure_tables, save_position, save_watermark
from pipeline.task import EntityTask, MarkerTarget

log = logging.getLogger("pipeline")


class LoadRaw(EntityTask):
    """Staged batch -> raw_<entity>; for incremental sources, then the watermark moves."""

    stage = "raw"

    def requires(self) -> luigi.Task:
        return Extract(entity=self.entity, batch=self.batch)

    def output(self) -> luigi.Target:
        return MarkerTarget(self.entity, self.stage, self.batch)

    def execute(self) -> None:
        cfg = runtime.settings()
        entity = cfg.entity(self.entity)
        wh, store = runtime.warehouse(), runtime.store()
        ensure_tables(wh, cfg.database)
        manifest = self.input().manifest()
        self.window = manifest.window or None
        result = load_batch(wh, cfg.database, entity, store, manifest)
        if manifest.keys_rows is not None:
            prefix = batch_prefix(entity.source, entity.name, self.batch) + KEYS_SUBDIR
            load_keys(wh, cfg.database, entity, store, read_manifest(store, prefix))
        upper = manifest.window.get("upper")
        if entity.incremental and upper:
            save_watermark(wh, cfg.database, entity.name, self.batch, datetime.fromisoformat(upper))
        elif entity.captures_changes and upper:
            save_position(wh, cfg.database, entity.name, self.batch, upper)
        self.record(result)
        if entity.captures_changes and upper:  # the load committed: the source may let go
            open_source(entity, self.batch).acknowledge(upper)
        self._retention(entity)

    def _retention(self, entity: Entity) -> None:
        """After a committed load: drop expired raw months and staged batches."""
        cfg = runtime.settings()
        apply_retention(runtime.warehouse(), cfg.database, entity)
        if cfg.staging_retention_days <= 0:
            return
        cutoff = batch_time(self.batch) - timedelta(days=cfg.staging_retention_days)

        def expired(batch_id: str) -> bool:
            try:
                return batch_time(batch_id) < cutoff
            except BatchIdError:  # not one of our batch ids: leave it alone
                return False

        pruned = prune(runtime.store(), entity.source, entity.name, expired, keep=self.batch)
        if pruned:
            log.info("%s: pruned %d staged batch(es) past retention", entity.name, len(pruned))
