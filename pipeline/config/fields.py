"""The `[cdc]` settings, declared once: key, default, environment variable, kind, meaning.

`FIELDS` drives parsing (`Field.parse`), secret masking (`dsn` and `secret` kinds) and the
README's configuration table (a unit test keeps them equal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.errors import ConfigError
from pipeline.core.names import check_name

SECTION = "cdc"
Kind = Literal["text", "int", "float", "bool", "dsn", "secret", "name"]


@dataclass(frozen=True)
class Field:
    """One `[cdc]` setting. `dsn` values hold passwords (masked when shown); `secret` values
    are secrets whole; `name` values must be plain identifiers."""

    key: str
    default: str
    doc: str
    env: str | None = None
    kind: Kind = "text"
    example: str = ""

    def parse(self, value: str) -> Any:
        where = self.env or f"[{SECTION}] {self.key}"
        if self.kind == "bool":
            return value.strip().lower() in ("1", "true", "yes", "on")
        if self.kind in ("int", "float"):
            try:
                return int(value) if self.kind == "int" else float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if self.kind == "name":
            return check_name(value, where)
        return value


FIELDS: tuple[Field, ...] = (
    Field("mongo_uri", "mongodb://127.0.0.1:27017", "MongoDB URI", "CDC_MONGO_URI", "dsn"),
    Field("mongo_db", "source", "source database", "CDC_MONGO_DB"),
    Field(
        "postgres_dsn",
        "postgresql://postgres@127.0.0.1:5434/source",
        "libpq DSN of the source (URL or key=value)",
        "CDC_POSTGRES_DSN",
        "dsn",
    ),
    Field(
        "staging_url",
        "s3://cdc-staging/",
        "staging root",
        "CDC_STAGING_URL",
        example="`s3://cdc-staging/` or `file:///var/lib/cdc/staging`",
    ),
    Field("s3_endpoint", "127.0.0.1:9004", "S3/MinIO endpoint", "CDC_S3_ENDPOINT"),
    Field("s3_access_key", "minioadmin", "S3 access key", "CDC_S3_ACCESS_KEY"),
    Field("s3_secret_key", "minioadmin", "S3 secret key", "CDC_S3_SECRET_KEY", "secret"),
    Field("s3_secure", "false", "HTTPS to S3", "CDC_S3_SECURE", "bool"),
    Field(
        "warehouse_url",
        "clickhouse://default:@127.0.0.1:9000",
        "the warehouse",
        "CDC_WAREHOUSE_URL",
        "dsn",
        example="`clickhouse://user:pass@host:9000` or `chdb:///path`",
    ),
    Field(
        "database",
        "data_pipeline",
        "ClickHouse database for everything we write",
        "CDC_DATABASE",
        "name",
    ),
    Field("lookback_minutes", "10", "re-read window before the watermark", kind="float"),
    Field("batch_rows", "50000", "rows per Arrow record batch", kind="int"),
    Field("part_rows", "500000", "rows per Parquet part", kind="int"),
    Field("delete_guard", "0.2", "share of live keys a batch may retire", kind="float"),
    Field("merge_bucket_rows", "100000", "changed keys per SCD2 merge bucket", kind="int"),
    Field(
        "staging_retention_days",
        "7",
        "staged batches older than this are deleted after a load (0 keeps all)",
        kind="float",
    ),
    Field(
        "raw_retention_days",
        "30",
        "full-scan raw copies older than this go (0 keeps all)",
        kind="float",
    ),
    Field(
        "task_retries",
        "0",
        "attempts a task makes again after a retriable failure (a server that was down)",
        kind="int",
    ),
    Field("retry_delay_seconds", "10", "wait before each such attempt", kind="float"),
    Field(
        "snapshot_chunk_rows",
        "100000",
        "rows per chunk of a log entity's first load (a crash resumes at the last chunk)",
        kind="int",
    ),
    Field(
        "slot_lag_warn_mb",
        "1024",
        "status warns when a replication slot holds more WAL than this",
        kind="float",
    ),
    Field(
        "cluster",
        "",
        "a cluster of `remote_servers`: replicated, sharded tables (empty: one server)",
        "CDC_CLUSTER",
        example="`cdc_sharded`",
    ),
    Field(
        "replicated_path_prefix",
        "/clickhouse/tables/{shard}",
        "ZooKeeper path of replicated tables, before `/<database>/<table>`",
        "CDC_REPLICATED_PATH_PREFIX",
    ),
    Field(
        "ddl_timeout_seconds",
        "300",
        "how long an `ON CLUSTER` statement waits for every node",
        "CDC_DDL_TIMEOUT_SECONDS",
        "int",
    ),
)
FIELD = {f.key: f for f in FIELDS}
# read from the environment only (never from luigi.cfg), each with what it does
ENV_ONLY = {
    "CDC_ALERT_WEBHOOK": "failure alerts are POSTed here (a secret: most webhook URLs are)",
    "CDC_ALLOW_PANDAS": "1 lets pyarrow import pandas in pipeline runs",
    "CDC_SQL_DIR": "the marts' directory (default: sql/ of the project)",
    "CDC_RUN_DIR": "the cron wrapper's lock and logs",
}
# variables whose values are secrets wherever they appear, besides the secret fields
SECRET_VARS = ("CDC_ALERT_WEBHOOK",)
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN", re.IGNORECASE)
