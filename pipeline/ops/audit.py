"""Run audit: one row per task run in `<database>._cdc_runs`, written on success and on failure.

Luigi calls the handlers below in the process that runs the task (START, then SUCCESS or
FAILURE), so the row carries what the task measured (`task.result`, `task.window`) without
re-reading anything. The markers in `_cdc_batches` decide what is done; this table only tells
what happened, for `python -m pipeline status`, the report and the cron wrapper's resume.

Error text is redacted before it is stored: secrets from the settings and the environment are
replaced by `***`, and so is the password of every URL or `password=` pair in the text.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import luigi

from pipeline import runtime
from pipeline.core import secrets
from pipeline.core.names import BATCHES, RUNS
from pipeline.warehouse import Warehouse, qualified
from pipeline.warehouse.ddl import TableSpec, create_table, insert_ensured

log = logging.getLogger("pipeline.audit")

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
ERROR_LIMIT = 4000
RETENTION_DAYS = 400

# task_id -> (task, wall clock start, monotonic start) for tasks running in this process
_RUNNING: dict[str, tuple[luigi.Task, datetime, float]] = {}


@dataclass(frozen=True)
class RunRecord:
    """One row of `_cdc_runs`."""

    run_id: str
    batch_id: str
    task: str
    task_id: str
    entity: str
    stage: str
    status: str
    rows_in: int
    rows_out: int
    versions_opened: int
    versions_closed: int
    window_lower: str | None
    window_upper: str | None
    started_at: datetime
    finished_at: datetime
    duration_s: float
    error: str
    host: str
    pid: int


def ensure_runs_table(wh: Warehouse, database: str) -> None:
    """Monthly partitions; on servers with TTL, rows older than RETENTION_DAYS expire."""
    wh.create_database(database)
    ts = wh.features.timestamp_type
    ttl = f" TTL toDateTime(finished_at) + INTERVAL {RETENTION_DAYS} DAY" if wh.features.ttl else ""
    columns = (
        "run_id String, batch_id String, task String, task_id String, entity String,"
        " stage String, status String, rows_in UInt64, rows_out UInt64,"
        " versions_opened UInt64, versions_closed UInt64,"
        " window_lower Nullable(String), window_upper Nullable(String),"
        f" started_at {ts}, finished_at {ts}, duration_s Float64, error String,"
        " host String, pid UInt32"
    )
    order = "(entity, stage, batch_id, finished_at)"
    spec = TableSpec(columns, order_by=order, partition_by="toYYYYMM(finished_at)", ttl=ttl)
    create_table(wh, database, RUNS, spec)


def write_run(wh: Warehouse, database: str, record: RunRecord) -> None:
    import pyarrow as pa

    row = asdict(record)
    types = {
        "rows_in": pa.uint64(),
        "rows_out": pa.uint64(),
        "versions_opened": pa.uint64(),
        "versions_closed": pa.uint64(),
        "window_lower": pa.string(),
        "window_upper": pa.string(),
        "started_at": pa.timestamp("us", "UTC"),
        "finished_at": pa.timestamp("us", "UTC"),
        "duration_s": pa.float64(),
        "pid": pa.uint32(),
    }
    columns = {name: pa.array([value], types.get(name, pa.string())) for name, value in row.items()}
    insert_ensured(wh, database, RUNS, pa.table(columns), lambda: ensure_runs_table(wh, database))


def newest_batch(wh: Warehouse, database: str) -> str | None:
    """The newest batch id any task has touched, by the audit or by a stage marker."""
    parts = [
        f"SELECT max(batch_id) AS b FROM {qualified(database, table)}"
        for table in (RUNS, BATCHES)
        if wh.table_exists(database, table)
    ]
    if not parts:
        return None
    return wh.scalar(f"SELECT max(b) FROM ({' UNION ALL '.join(parts)})") or None


def redact(text: str, known: Iterable[str] | None = None) -> str:
    """`text` with every secret this process knows (or `known`) replaced by ***."""
    return secrets.redact(text, runtime.secrets() if known is None else known)


class RedactingFilter(logging.Filter):
    """Mask secrets in every record of a logger, traceback included (luigi's worker logs the
    exception of a failed task, whatever its message holds, before `on_failure` runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# loggers whose lines can quote an error: Luigi's worker and scheduler, and ours
REDACTED_LOGGERS = ("luigi-interface", "luigi", "luigi.scheduler", "pipeline")


def redact_loggers() -> None:
    """Install the redacting filter once on each logger that can quote an error."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


redact_loggers()


def describe_error(error: BaseException | str) -> str:
    """The error text for the audit row and alerts: redacted, type-prefixed, bounded."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = redact(text)
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."


def is_pipeline_task(task: luigi.Task) -> bool:
    """Ours, not a task of another module that shares the worker."""
    return type(task).__module__.split(".")[0] == "pipeline"


def record_for(task: luigi.Task, status: str, error: str = "") -> RunRecord:
    """The audit row of a task run that ends now (started when START fired, if it did)."""
    finished = datetime.now(UTC)
    _, started, began = _RUNNING.pop(task.task_id, (task, finished, time.monotonic()))
    family = task.get_task_family()
    result = getattr(task, "result", None)
    window = getattr(task, "window", None) or {}
    return RunRecord(
        run_id=uuid.uuid4().hex,
        batch_id=str(getattr(task, "batch", "")),
        task=family,
        task_id=task.task_id,
        entity=str(getattr(task, "entity", None) or getattr(task, "name", "") or ""),
        stage=getattr(task, "stage", "") or family.lower(),
        status=status,
        rows_in=result.rows_in if result else 0,
        rows_out=result.rows_out if result else 0,
        versions_opened=result.versions_opened if result else 0,
        versions_closed=result.versions_closed if result else 0,
        window_lower=window.get("lower"),
        window_upper=window.get("upper"),
        started_at=started,
        finished_at=finished,
        duration_s=round(time.monotonic() - began, 6),
        error=error,
        host=socket.gethostname(),
        pid=os.getpid(),
    )


def _store(record: RunRecord) -> None:
    """Write a row; a warehouse that cannot take it must not turn a success into a failure."""
    try:
        write_run(runtime.warehouse(), runtime.settings().database, record)
    except Exception as exc:
        log.warning("run audit: could not record %s: %s", record.task_id, describe_error(exc))


@luigi.Task.event_handler(luigi.Event.START)
def _on_start(task: luigi.Task) -> None:
    if is_pipeline_task(task):
        _RUNNING[task.task_id] = (task, datetime.now(UTC), time.monotonic())


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _on_success(task: luigi.Task) -> None:
    if is_pipeline_task(task):
        _store(record_for(task, SUCCESS))


FailureHandler = Callable[[luigi.Task, BaseException | str], None]
FAILURE_EVENTS = (
    luigi.Event.FAILURE,
    luigi.Event.BROKEN_TASK,
    luigi.Event.PROCESS_FAILURE,
    luigi.Event.TIMEOUT,
)


def on_task_failure(handler: FailureHandler) -> FailureHandler:
    """Register `handler` for every way a Luigi task can fail (error, broken, killed, timeout)."""
    for event in FAILURE_EVENTS:
        luigi.Task.event_handler(event)(handler)
    return handler


@on_task_failure
def _on_failure(task: luigi.Task, error: BaseException | str) -> None:
    if is_pipeline_task(task):
        _store(record_for(task, FAILURE, describe_error(error)))


def record_interrupted(reason: str) -> list[RunRecord]:
    """FAILURE rows for tasks cut off mid-run (the wrapper's time limit): no event fires then."""
    tasks = [task for task, _, _ in list(_RUNNING.values())]
    records = [record_for(task, FAILURE, describe_error(reason)) for task in tasks]
    for record in records:
        _store(record)
    return records
