"""Settings and source entities, declared once: luigi.cfg holds the defaults, CDC_* variables win.

`FIELDS` is the one table of `[cdc]` settings (key, default, environment variable, kind,
meaning): it drives parsing, secret masking and the README's configuration table (a test
keeps them equal). `ENTITY_OPTIONS` does the same for `[entity.NAME]` sections.

Secrets never travel as Luigi parameters (luigid would show them): tasks read the settings at
run time instead. A secret can also come from a file named by `<VAR>_FILE` (Docker/K8s).
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.core.choices import HARD_DELETES, MODES, SOURCES, STRATEGIES
from pipeline.core.errors import ConfigError
from pipeline.core.names import (
    SNAPSHOT_META_COLUMNS,
    check_name,
    raw_table,
    snapshot_storage,
    snapshot_view,
)
from pipeline.core.secrets import SHORTEST_SECRET, dsn_passwords, mask_dsn

SECTION = "cdc"
ENTITY_PREFIX = "entity."
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


@dataclass(frozen=True)
class Option:
    """One `[entity.NAME]` option: which sources take it and what it means."""

    key: str
    sources: tuple[str, ...]
    default: str
    doc: str


ENTITY_OPTIONS: tuple[Option, ...] = (
    Option("source", SOURCES, "required", "`mongo` or `postgres`"),
    Option("collection", ("mongo",), "the entity name", "the collection to read"),
    Option("table", ("postgres",), "the entity name", "the table, `schema.table`"),
    Option("unique_key", SOURCES, "required", "one or several columns"),
    Option("strategy", SOURCES, "check", "`check` or `timestamp`"),
    Option("check_cols", SOURCES, "all", "the columns whose change opens a version"),
    Option("updated_at", SOURCES, "none", "the timestamp column (strategy = timestamp)"),
    Option("hard_deletes", SOURCES, "ignore", "`ignore`, `invalidate` or `new_record`"),
    Option("delete_guard", SOURCES, "[cdc] value", "share of live keys a batch may retire"),
    Option("mode", ("postgres",), "incremental with updated_at", "`full` or `incremental`"),
    Option("reconcile", ("postgres",), "false", "read every key each batch to see deletes"),
    Option("partitions", ("mongo",), "1", "extract in N `_id` ranges"),
    Option("fields", ("mongo",), "every field", "fields that become columns"),
    Option("flatten", ("mongo",), "none", "nested paths that become columns"),
    Option("snapshot_meta_column_names", SOURCES, "dbt names", "renamed meta columns"),
    Option("dbt_valid_to_current", SOURCES, "NULL", "shown instead of NULL on current versions"),
    Option("raw_retention_days", SOURCES, "[cdc] value", "full-scan raw copies kept this long"),
)
OPTION = {o.key: o for o in ENTITY_OPTIONS}


@dataclass(frozen=True)
class Entity:
    """One source collection/table and how its history is kept (a dbt snapshot's config)."""

    name: str
    source: str
    object_name: str  # MongoDB collection, or PostgreSQL "schema.table"
    unique_key: tuple[str, ...]
    strategy: str
    check_cols: tuple[str, ...] | None = None  # None means "all"
    updated_at: str | None = None
    hard_deletes: str = "ignore"
    mode: str = "full"  # "full" scan or "incremental" on updated_at
    delete_guard: float = 0.2
    fields: tuple[str, ...] | None = None  # MongoDB: mapped fields; the rest go to `_extra`
    flatten: tuple[str, ...] = ()  # MongoDB: nested paths that become columns
    partitions: int = 1  # MongoDB: `_id` ranges extracted by parallel tasks
    meta_names: tuple[tuple[str, str], ...] = ()  # dbt's snapshot_meta_column_names
    valid_to_current: str | None = None  # dbt's dbt_valid_to_current (a UTC timestamp)
    reconcile: bool = False  # PostgreSQL: read all keys each batch to see hard deletes
    raw_retention_days: float = 0  # full-scan raw copies older than this go (0 = keep all)

    def meta_name(self, column: str) -> str:
        """The public name of a meta column (dbt_valid_from unless renamed)."""
        return dict(self.meta_names).get(column, column)

    @property
    def raw_table(self) -> str:
        return raw_table(self.name)

    @property
    def snapshot_table(self) -> str:
        return snapshot_view(self.name)

    @property
    def storage_table(self) -> str:
        return snapshot_storage(self.name)

    @property
    def incremental(self) -> bool:
        return self.mode == "incremental"


@dataclass(frozen=True)
class Settings:
    """The `[cdc]` settings, one attribute per entry of `FIELDS`, and the entities."""

    mongo_uri: str = field(repr=False)
    mongo_db: str
    postgres_dsn: str = field(repr=False)
    staging_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    s3_secure: bool
    warehouse_url: str = field(repr=False)
    database: str
    lookback_minutes: float
    batch_rows: int
    part_rows: int
    delete_guard: float
    merge_bucket_rows: int
    staging_retention_days: float
    raw_retention_days: float
    task_retries: int
    retry_delay_seconds: float
    entities: tuple[Entity, ...]

    def entity(self, name: str) -> Entity:
        for entity in self.entities:
            if entity.name == name:
                return entity
        known = ", ".join(e.name for e in self.entities)
        raise ConfigError(f"unknown entity {name!r}; luigi.cfg declares: {known}")

    def secrets(self) -> set[str]:
        """The secret values these settings hold (whole secrets and passwords inside DSNs)."""
        values: set[str] = set()
        for f in FIELDS:
            value = getattr(self, f.key)
            if f.kind == "secret" and value:
                values.add(value)
            elif f.kind == "dsn":
                values |= dsn_passwords(value)
        return values


def env_value(name: str) -> str | None:
    """An environment variable, or the content of the file its `_FILE` twin names."""
    if name in os.environ:
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return None


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in re.split(r"[,\s]+", value) if part.strip())


def _choice(value: str, allowed: tuple[str, ...], where: str, key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {key} must be one of {allowed}, got {value!r}")
    return value


def _check_options(where: str, source: str, options: dict[str, str]) -> None:
    """Unknown options and options of another source kind are refused, never ignored: a
    misspelt `check_col` would otherwise mean "all columns"."""
    unknown = sorted(set(options) - OPTION.keys())
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(OPTION)}")
    foreign = sorted(k for k in options if source not in OPTION[k].sources)
    if foreign:
        raise ConfigError(f"{where}: {foreign} do not apply to {source} sources")


def _parse_entity(name: str, options: dict[str, str], cfg: dict[str, Any]) -> Entity:
    where = f"[{ENTITY_PREFIX}{name}]"
    check_name(name, f"entity name in {where}")

    def need(key: str) -> str:
        if not options.get(key):
            raise ConfigError(f"{where}: '{key}' is required")
        return options[key]

    source = _choice(need("source"), SOURCES, where, "source")
    _check_options(where, source, options)
    object_name = options.get("collection" if source == "mongo" else "table") or name
    strategy = _choice(options.get("strategy", "check"), STRATEGIES, where, "strategy")
    check_cols_raw = options.get("check_cols", "all")
    check_cols = None if check_cols_raw.strip() == "all" else _split(check_cols_raw)
    updated_at = options.get("updated_at") or None
    if strategy == "timestamp" and not updated_at:
        raise ConfigError(f"{where}: strategy = timestamp needs 'updated_at'")
    hard_deletes = options.get("hard_deletes", "ignore")
    if hard_deletes not in HARD_DELETES:
        raise ConfigError(f"{where}: hard_deletes must be one of {HARD_DELETES}")
    default_mode = "incremental" if source == "postgres" and updated_at else "full"
    mode = options.get("mode", default_mode)
    if mode not in MODES:
        raise ConfigError(f"{where}: mode must be full or incremental, got {mode!r}")
    if mode == "incremental" and (source != "postgres" or not updated_at):
        raise ConfigError(f"{where}: mode = incremental needs a postgres table and 'updated_at'")
    reconcile = options.get("reconcile", "false").strip().lower() in ("1", "true", "yes", "on")
    if reconcile and (source != "postgres" or mode != "incremental"):
        raise ConfigError(f"{where}: reconcile applies to incremental postgres tables only")
    if reconcile and hard_deletes == "ignore":
        raise ConfigError(f"{where}: reconcile needs hard_deletes = invalidate or new_record")
    valid_to_current = options.get("dbt_valid_to_current") or None
    if valid_to_current is not None:
        at = timestamp_setting(valid_to_current, f"{where} dbt_valid_to_current")
        valid_to_current = at.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return Entity(
        name=name,
        source=source,
        object_name=object_name,
        unique_key=_split(need("unique_key")),
        strategy=strategy,
        check_cols=check_cols,
        updated_at=updated_at,
        hard_deletes=hard_deletes,
        mode=mode,
        delete_guard=_number(options.get("delete_guard"), cfg["delete_guard"], where),
        fields=_split(options["fields"]) if options.get("fields") else None,
        flatten=_split(options.get("flatten", "")),
        partitions=_positive_int(options.get("partitions", "1"), f"{where} partitions"),
        meta_names=_meta_names(options.get("snapshot_meta_column_names", ""), where),
        valid_to_current=valid_to_current,
        reconcile=reconcile,
        raw_retention_days=_number(
            options.get("raw_retention_days"), cfg["raw_retention_days"], where
        ),
    )


def _number(value: str | None, default: float, where: str) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def _meta_names(value: str, where: str) -> tuple[tuple[str, str], ...]:
    """`dbt_valid_from: valid_from, dbt_valid_to: valid_to` -> pairs, validated."""
    pairs = []
    for item in (p.strip() for p in value.split(",")):
        if not item:
            continue
        meta, _, name = item.partition(":")
        meta, name = meta.strip(), name.strip()
        if meta not in SNAPSHOT_META_COLUMNS:
            raise ConfigError(f"{where}: snapshot_meta_column_names: unknown column {meta!r}")
        pairs.append((meta, check_name(name, f"{where} snapshot_meta_column_names value")))
    return tuple(pairs)


def timestamp_setting(value: str, what: str) -> datetime:
    """A UTC timestamp written as ISO text (`9999-12-31` or `2100-01-01 00:00:00`)."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{what} must be a timestamp like 2100-01-01 00:00:00, got {value!r}"
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _positive_int(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return number


def _parser(config_path: str | os.PathLike[str] | None) -> configparser.RawConfigParser:
    if config_path is not None:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(config_path)
        return parser
    from luigi.configuration import get_config  # luigi's own parser: luigi.cfg, LUIGI_CONFIG_PATH

    return get_config()


def load_settings(config_path: str | os.PathLike[str] | None = None) -> Settings:
    """Read luigi.cfg (or `config_path`) and the environment into validated Settings."""
    parser = _parser(config_path)
    section = dict(parser.items(SECTION)) if parser.has_section(SECTION) else {}
    unknown = sorted(set(section) - FIELD.keys())
    if unknown:
        raise ConfigError(f"[{SECTION}]: unknown setting(s) {unknown}; known: {sorted(FIELD)}")
    raw = {f.key: section.get(f.key, f.default) for f in FIELDS}
    for f in FIELDS:
        override = env_value(f.env) if f.env else None
        if override is not None:
            raw[f.key] = override
    values = {key: FIELD[key].parse(value) for key, value in raw.items()}
    entities = tuple(
        _parse_entity(s.removeprefix(ENTITY_PREFIX), dict(parser.items(s)), values)
        for s in parser.sections()
        if s.startswith(ENTITY_PREFIX)
    )
    if not entities:
        raise ConfigError(f"no [{ENTITY_PREFIX}NAME] sections found in luigi.cfg")
    return Settings(**values, entities=entities)


def secret_values(load: Callable[[], Settings] | None = None) -> set[str]:
    """Every secret this process knows: the settings' (when they load), and the environment's
    CDC_*SECRET*, *PASSWORD*, *TOKEN* variables, their *_FILE files and DSN passwords."""
    values: set[str] = set()
    names = [n for n in os.environ if n.startswith("CDC_") and SECRET_NAME.search(n)]
    for name in {*SECRET_VARS, *(f.env for f in FIELDS if f.kind == "secret" and f.env)}:
        names.append(name)
    for name in {n.removesuffix("_FILE") for n in names}:
        try:
            value = env_value(name)
        except OSError:
            continue
        if value:
            values.add(value)
    for f in FIELDS:
        if f.kind == "dsn" and f.env:
            values |= dsn_passwords(os.environ.get(f.env, ""))
    if load is not None:
        try:
            values |= load().secrets()
        except (ConfigError, ValueError, OSError, configparser.Error):
            pass
    return {v for v in values if len(v) >= SHORTEST_SECRET}


def mask_url(url: str) -> str:
    """A URL or DSN safe to show (its passwords masked)."""
    return mask_dsn(url)
