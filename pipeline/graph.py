"""The Luigi graph: Extract -> LoadRaw -> Snapshot per entity, then the marts, under RunAll.

A task's parameters are its identity (entity, batch), so "the same batch again" is "already
complete", and a failed batch is resumed by running RunAll with its batch id (on the command
line `RunAll --RunAll-batch ID`, or `cdc-run --batch ID`).
"""

from __future__ import annotations

import luigi

from pipeline import runtime
from pipeline.core.batch import batch_time, new_batch_id
from pipeline.core.errors import PipelineError
from pipeline.core.secrets import redact
from pipeline.extract.tasks import Extract, ExtractRange, PlanRanges
from pipeline.load.tasks import LoadRaw
from pipeline.marts.tasks import BuildMart, project
from pipeline.snapshot.tasks import Snapshot


class BatchParameter(luigi.Parameter):
    """A batch id from the command line or the config, else a new one each time a task is
    made: a default computed once at import would give every RunAll of a long-lived process
    (an assistant worker, a test session) the same batch."""

    def has_task_value(self, task_name: str, param_name: str) -> bool:
        return True

    def task_value(self, task_name: str, param_name: str) -> str:
        if super().has_task_value(task_name, param_name):
            return str(super().task_value(task_name, param_name))
        return new_batch_id()


class RunAll(luigi.WrapperTask):
    """Every entity's snapshot and every mart for one batch (default: a new batch id)."""

    batch: str = BatchParameter()
    stage = "run"

    def on_failure(self, exception: BaseException) -> str:
        return redact(super().on_failure(exception), runtime.secrets())

    def requires(self) -> list[luigi.Task]:
        batch_time(self.batch)  # refuse malformed ids before anything runs
        cfg = runtime.settings()
        tasks: list[luigi.Task] = [Snapshot(entity=e.name, batch=self.batch) for e in cfg.entities]
        tasks += [BuildMart(name=name, batch=self.batch) for name in sorted(project())]
        return tasks


__all__ = [
    "BuildMart",
    "Extract",
    "ExtractRange",
    "LoadRaw",
    "PipelineError",
    "PlanRanges",
    "RunAll",
    "Snapshot",
    "new_batch_id",
]
