"""The run audit's redaction: what reaches `_cdc_runs`, alerts and log lines holds no secret."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline import runtime
from pipeline.ops import audit


@pytest.fixture(autouse=True)
def _fresh_settings():
    runtime.reset()
    yield
    runtime.reset()


def test_redact_masks_known_secrets_url_passwords_and_pairs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret_file = tmp_path / "s3"
    secret_file.write_text("from-a-file-123\n")
    monkeypatch.delenv("CDC_S3_SECRET_KEY", raising=False)
    monkeypatch.setenv("CDC_S3_SECRET_KEY_FILE", str(secret_file))
    monkeypatch.setenv("CDC_ALERT_WEBHOOK", "https://hooks.example/T000/B000/XYZ")
    runtime.reset()
    try:
        text = audit.redact(
            "key from-a-file-123 to https://hooks.example/T000/B000/XYZ;"
            " mongodb://app:p%40ss@db:27017/x and host=db password='two words' user=u"
        )
    finally:
        runtime.reset()
    assert text == ("key *** to ***; mongodb://app:***@db:27017/x and host=db password=*** user=u")


def test_errors_are_redacted_typed_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_WAREHOUSE_URL", "clickhouse://u:wh-secret-pw@ch:9000")
    error = RuntimeError("cannot connect to clickhouse://u:wh-secret-pw@ch:9000 " + "x" * 5000)
    text = audit.describe_error(error)
    assert text.startswith("RuntimeError: cannot connect to clickhouse://u:***@ch:9000 xxx")
    assert "wh-secret-pw" not in text
    assert len(text) == audit.ERROR_LIMIT and text.endswith("...")
    assert audit.describe_error("short") == "short"


def test_log_records_and_their_tracebacks_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_PG_PASSWORD", "pg-secret-value")
    record = logging.LogRecord("luigi-interface", logging.ERROR, __file__, 1, "%s", None, None)
    try:
        raise ValueError("login failed with pg-secret-value")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    record.args = ("task failed: host=db password=pg-secret-value",)
    assert audit.RedactingFilter().filter(record) is True
    assert record.getMessage() == "task failed: host=db password=***"
    assert record.exc_info is None and "ValueError: login failed with ***" in record.exc_text
    assert "pg-secret-value" not in record.exc_text
