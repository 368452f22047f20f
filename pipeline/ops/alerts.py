"""Failure alerts: every failed task POSTs to the webhook in CDC_ALERT_WEBHOOK (`pipeline.notify`).

Nothing is sent on success. The error is redacted like the run audit's. A webhook that is down
is logged, never raised: an alert must not change a run's outcome.

Luigi's own e-mail on failure is configured in luigi.cfg (`[email] receiver`, `[smtp] host`, ...)
and sent by the worker; see docs/operations.md.
"""

from __future__ import annotations

import luigi

from pipeline.notify import WEBHOOK_VAR, payload, send, webhook_url
from pipeline.ops.audit import describe_error, is_pipeline_task, on_task_failure

__all__ = ["WEBHOOK_VAR", "payload", "send", "webhook_url"]


@on_task_failure
def _on_failure(task: luigi.Task, error: BaseException | str) -> None:
    if is_pipeline_task(task):
        send(str(getattr(task, "batch", "")), str(task), describe_error(error))
