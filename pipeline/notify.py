"""Alerts to CDC_ALERT_WEBHOOK (or CDC_ALERT_WEBHOOK_FILE): one JSON POST each.

The body is `{"batch", "task", "error", "text"}`: `text` repeats the rest as one line, which is
what Slack- and Mattermost-style incoming webhooks display. Failures are sent by the Luigi
handler in `pipeline.ops.alerts`; a stage sends one itself for what does not fail its task but
needs a person (a replication slot the server invalidated, a change stream whose history is
gone). The text is redacted; a webhook that is down is logged, never raised.
"""

from __future__ import annotations

import json
import logging
import urllib.request

from pipeline import runtime
from pipeline.config import env_value
from pipeline.core.secrets import redact

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
    """POST one alert; True if the webhook answered 2xx. `error` is redacted here too."""
    url = url or webhook_url()
    if not url:
        return False
    body = json.dumps(payload(batch, task, redact(error, runtime.secrets()))).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return 200 <= reply.status < 300
    except OSError as exc:
        # the URL itself is a secret for most webhook services: name the variable instead
        text = redact(f"{type(exc).__name__}: {exc}", runtime.secrets())
        log.warning("alert to %s failed: %s", WEBHOOK_VAR, text)
        return False
