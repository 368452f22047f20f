"""What every pipeline task shares: its Luigi base class and the marker Target.

A task's parameters are its identity (entity, batch), so "the same batch again" is "already
complete", and a failed batch is resumed by running RunAll with its batch id. Connection
settings are never parameters (luigid would show them): tasks read them from `runtime`.
Each stage's tasks live in its package's `tasks.py`; `pipeline.graph` ties them together.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import luigi

from pipeline import runtime
from pipeline.core.errors import PipelineError
from pipeline.core.secrets import redact
from pipeline.state import StageResult, is_done, mark_done

log = logging.getLogger("pipeline")


class MarkerTarget(luigi.Target):
    """Exists once `stage` has finished `batch_id` for `entity` (a row in _cdc_batches)."""

    def __init__(self, entity: str, stage: str, batch_id: str) -> None:
        self.entity = entity
        self.stage = stage
        self.batch_id = batch_id

    def exists(self) -> bool:
        database = runtime.settings().database
        return is_done(runtime.warehouse(), database, self.entity, self.stage, self.batch_id)


class PipelineTask(luigi.Task):
    """A task that reports progress, masks secrets in its failure, and retries only failures
    that are `retriable` (a server that was down), up to `[cdc] task_retries` times.

    Subclasses implement `execute()`; after it the task carries `result` (rows, versions) and,
    for extracts and loads, `window`, so the run audit reports them without re-reading.
    """

    batch: str  # a luigi.Parameter in each subclass, after the ones that come first in its id
    result: StageResult | None = None
    window: dict[str, str | None] | None = None
    stage: ClassVar[str] = ""

    @property
    def subject(self) -> str:
        """Who the task is about (an entity, or a mart's marker name)."""
        return ""

    def execute(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        cfg = runtime.settings()
        for attempt in range(cfg.task_retries + 1):
            try:
                with runtime.warehouse().catalog_scope():
                    self.execute()
                return
            except PipelineError as exc:
                if not exc.retriable or attempt == cfg.task_retries:
                    raise
                log.warning(
                    "%s: %s; attempt %d of %d in %.0f s",
                    self,
                    redact(str(exc).splitlines()[0], runtime.secrets()),
                    attempt + 2,
                    cfg.task_retries + 1,
                    cfg.retry_delay_seconds,
                )
                runtime.reset()  # a connection that failed mid-statement is not reused
                time.sleep(cfg.retry_delay_seconds)

    def on_failure(self, exception: BaseException) -> str:
        """The traceback luigid stores and e-mails, with secrets masked."""
        return redact(super().on_failure(exception), runtime.secrets())

    def report(self, message: str, percent: int | None = None) -> None:
        self.set_status_message(message)
        if percent is not None:
            self.set_progress_percentage(percent)
        log.info("%s %s %s: %s", type(self).__name__, self.subject, self.batch, message)

    def record(self, result: StageResult) -> None:
        """Write the marker that completes this task (data first, marker last)."""
        self.result = result
        wh, database = runtime.warehouse(), runtime.settings().database
        mark_done(wh, database, self.subject, self.stage, self.batch, result)
        self.report(f"{result.rows_in} rows in, {result.rows_out} rows out", 100)


class EntityTask(PipelineTask):
    """One stage of one entity for one batch."""

    entity: str = luigi.Parameter()
    batch: str = luigi.Parameter()

    @property
    def subject(self) -> str:
        return self.entity
