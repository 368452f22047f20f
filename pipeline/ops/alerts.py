"""Failure alerts: a JSON POST to the webhook in CDC_ALERT_WEBHOOK (or CDC_ALERT_WEBHOOK_FILE).

The body is `{"batch", "task", "error", "text"}`: `text` repeats the rest as one line, which is
what Slack- and Mattermost-style incoming webhooks display. Nothing is sent on success. The error
is redacted like the run audit's. A webhook that is down is logged, never raised: an alert must
not change a run's outcome.

Luigi's own e-mail on failure is configured in luigi.cfg (`[email] receiver`, `[smtp] host`, ...)
and sent by the worker; see docs/operations.md.
"""

from __future__ import annotations

import json
import logging

import luigi

from pipeline.config import env_value
from pipeline.ops.audit import describe_error, is_pipeline_task, on_task_failure

log = logging.getLogger("pipeline.alerts")

WEBHOOK_VAR = "CDC_ALERT_WEBHOOK"
TIMEOUT_S = 10.0


def webhook_url() -> str | None:
    return (env_value(WEBHOOK_VAR) or "").strip() or None


def payload(batch: str, task: str, error: str) -> dict[str, str]:
    return {
        "batch": batch,
        "task": task,
        "error": error,
        "text": f"cdc-pipeline: {task} failed (batch {batch or '-'}): {error.splitlines()[0]}",
    }


def send(batch: str, task: str, error: str, url: str | None = None) -> bool:
    """POST one alert; True if the webhook answered 2xx. `error` must already be redacted."""
    import urllib.request

    url = url or webhook_url()
    if not url:
        return False
    body = json.dumps(payload(batch, task, error)).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return 200 <= reply.status < 300
    except OSError as exc:
        # the URL itself is a secret for most webhook services: name the variable instead
        log.warning("alert to %s failed: %s", WEBHOOK_VAR, describe_error(exc))
        return False


@on_task_failure
def _on_failure(task: luigi.Task, error: BaseException | str) -> None:
    if is_pipeline_task(task):
        send(str(getattr(task, "batch", "")), str(task), describe_error(error))
