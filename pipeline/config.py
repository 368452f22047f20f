"""Settings and source entities: luigi.cfg holds the defaults, CDC_* environment variables win.

Secrets never travel as Luigi parameters (luigid would show them): tasks call `settings()` at run
time instead. A secret can also come from a file named by `<VAR>_FILE` (Docker/K8s secrets).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.warehouse.base import check_name

SECTION = "cdc"
ENTITY_PREFIX = "entity."

# setting name in [cdc] -> environment variable that overrides it (the documented contract)
ENV_VARS: dict[str, str] = {
    "mongo_uri": "CDC_MONGO_URI",
    "mongo_db": "CDC_MONGO_DB",
    "postgres_dsn": "CDC_POSTGRES_DSN",
    "staging_url": "CDC_STAGING_URL",
    "s3_endpoint": "CDC_S3_ENDPOINT",
    "s3_access_key": "CDC_S3_ACCESS_KEY",
    "s3_secret_key": "CDC_S3_SECRET_KEY",
    "s3_secure": "CDC_S3_SECURE",
    "warehouse_url": "CDC_WAREHOUSE_URL",
    "database": "CDC_DATABASE",
}

DEFAULTS: dict[str, str] = {
    "mongo_uri": "mongodb://127.0.0.1:27017",
    "mongo_db": "source",
    "postgres_dsn": "postgresql://postgres@127.0.0.1:5434/source",
    "staging_url": "s3://cdc-staging/",
    "s3_endpoint": "127.0.0.1:9004",
    "s3_access_key": "minioadmin",
    "s3_secret_key": "minioadmin",
    "s3_secure": "false",
    "warehouse_url": "clickhouse://default:@127.0.0.1:9000",
    "database": "data_pipeline",
    "lookback_minutes": "10",
    "batch_rows": "50000",
    "part_rows": "500000",
    "merge_bucket_rows": "100000",
    "delete_guard": "0.2",
    "staging_retention_days": "7",
    "raw_retention_days": "30",
}

STRATEGIES = ("check", "timestamp")
HARD_DELETES = ("ignore", "invalidate", "new_record")
SOURCES = ("mongo", "postgres")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the section and key."""


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
        return f"raw_{self.name}"

    @property
    def snapshot_table(self) -> str:
        return f"{self.name}_snapshot"

    @property
    def incremental(self) -> bool:
        return self.mode == "incremental"


@dataclass(frozen=True)
class Settings:
    mongo_uri: str
    mongo_db: str
    postgres_dsn: str
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
    merge_bucket_rows: int
    staging_retention_days: float
    entities: tuple[Entity, ...]

    def entity(self, name: str) -> Entity:
        for entity in self.entities:
            if entity.name == name:
                return entity
        known = ", ".join(e.name for e in self.entities)
        raise ConfigError(f"unknown entity {name!r}; luigi.cfg declares: {known}")


def _env(name: str) -> str | None:
    """An environment variable, or the content of the file its `_FILE` twin names."""
    if name in os.environ:
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return None


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in re.split(r"[,\s]+", value) if part.strip())


def _parse_entity(
    name: str, options: dict[str, str], delete_guard: float, raw_retention: float = 0
) -> Entity:
    where = f"[{ENTITY_PREFIX}{name}]"
    check_name(name, f"entity name in {where}")

    def need(key: str) -> str:
        if not options.get(key):
            raise ConfigError(f"{where}: '{key}' is required")
        return options[key]

    source = need("source")
    if source not in SOURCES:
        raise ConfigError(f"{where}: source must be one of {SOURCES}, got {source!r}")
    object_name = options.get("collection" if source == "mongo" else "table") or name
    strategy = options.get("strategy", "check")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}: strategy must be one of {STRATEGIES}, got {strategy!r}")
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
    if mode not in ("full", "incremental"):
        raise ConfigError(f"{where}: mode must be full or incremental, got {mode!r}")
    if mode == "incremental" and (source != "postgres" or not updated_at):
        raise ConfigError(f"{where}: mode = incremental needs a postgres table and 'updated_at'")
    reconcile = options.get("reconcile", "false").strip().lower() in ("1", "true", "yes", "on")
    if reconcile and (source != "postgres" or mode != "incremental"):
        raise ConfigError(f"{where}: reconcile applies to incremental postgres tables only")
    if reconcile and hard_deletes == "ignore":
        raise ConfigError(f"{where}: reconcile needs hard_deletes = invalidate or new_record")
    fields = _split(options["fields"]) if options.get("fields") else None
    flatten = _split(options.get("flatten", ""))
    if source != "mongo" and (fields is not None or flatten or "partitions" in options):
        raise ConfigError(f"{where}: fields, flatten and partitions apply to mongo sources only")
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
        delete_guard=float(options.get("delete_guard", delete_guard)),
        fields=fields,
        flatten=flatten,
        partitions=_positive_int(options.get("partitions", "1"), f"{where} partitions"),
        meta_names=_meta_names(options.get("snapshot_meta_column_names", ""), where),
        valid_to_current=valid_to_current,
        reconcile=reconcile,
        raw_retention_days=float(options.get("raw_retention_days", raw_retention)),
    )


META_COLUMNS = ("dbt_scd_id", "dbt_updated_at", "dbt_valid_from", "dbt_valid_to", "dbt_is_deleted")


def _meta_names(value: str, where: str) -> tuple[tuple[str, str], ...]:
    """`dbt_valid_from: valid_from, dbt_valid_to: valid_to` -> pairs, validated."""
    pairs = []
    for item in _split_pairs(value):
        meta, _, name = item.partition(":")
        meta, name = meta.strip(), name.strip()
        if meta not in META_COLUMNS:
            raise ConfigError(f"{where}: snapshot_meta_column_names: unknown column {meta!r}")
        pairs.append((meta, check_name(name, f"{where} snapshot_meta_column_names value")))
    return tuple(pairs)


def _split_pairs(value: str) -> list[str]:
    return [item for item in (p.strip() for p in value.split(",")) if item]


def timestamp_setting(value: str, what: str) -> datetime:
    """A UTC timestamp written as ISO text (`9999-12-31` or `2100-01-01 00:00:00`)."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{what} must be a timestamp like 2100-01-01 00:00:00, got {value!r}"
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def unknown_columns(entity: Entity, columns: Collection[str]) -> list[tuple[str, str]]:
    """(setting, name) for every column an entity's settings name that `columns` lacks."""
    named: list[tuple[str, str]] = [("unique_key", k) for k in entity.unique_key]
    named += [("check_cols", c) for c in entity.check_cols or ()]
    if entity.updated_at:
        named.append(("updated_at", entity.updated_at))
    named += [("fields", f) for f in entity.fields or ()]
    named += [("flatten", p) for p in entity.flatten]
    present = set(columns)
    return [
        (setting, name)
        for setting, name in named
        if (name.replace(".", "__") if setting == "flatten" else name) not in present
    ]


def check_columns(entity: Entity, columns: Collection[str], source: str) -> None:
    """Refuse settings that name columns the source does not have, before anything is written:
    a `check_cols` typo would otherwise open a version for every key, silently."""
    unknown = unknown_columns(entity, columns)
    if not unknown:
        return
    settings_named = ", ".join(f"{setting} = {name!r}" for setting, name in unknown)
    known = ", ".join(sorted(columns)[:40]) + (", ..." if len(columns) > 40 else "")
    raise ConfigError(
        f"[{ENTITY_PREFIX}{entity.name}]: {settings_named}: no such column in {source}"
        f" (it has: {known})"
    )


def _positive_int(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return number


def load_settings(config_path: str | os.PathLike[str] | None = None) -> Settings:
    """Read luigi.cfg (or `config_path`) and the environment into validated Settings."""
    import configparser

    if config_path is not None:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(config_path)
    else:
        from luigi.configuration import get_config

        parser = get_config()
    section = dict(parser.items(SECTION)) if parser.has_section(SECTION) else {}
    values = {**DEFAULTS, **section}
    for key, var in ENV_VARS.items():
        override = _env(var)
        if override is not None:
            values[key] = override
    delete_guard = float(values["delete_guard"])
    raw_retention = float(values["raw_retention_days"])
    entities = tuple(
        _parse_entity(
            s.removeprefix(ENTITY_PREFIX), dict(parser.items(s)), delete_guard, raw_retention
        )
        for s in parser.sections()
        if s.startswith(ENTITY_PREFIX)
    )
    if not entities:
        raise ConfigError(f"no [{ENTITY_PREFIX}NAME] sections found in luigi.cfg")
    return Settings(
        mongo_uri=values["mongo_uri"],
        mongo_db=values["mongo_db"],
        postgres_dsn=values["postgres_dsn"],
        staging_url=values["staging_url"],
        s3_endpoint=values["s3_endpoint"],
        s3_access_key=values["s3_access_key"],
        s3_secret_key=values["s3_secret_key"],
        s3_secure=values["s3_secure"].strip().lower() in ("1", "true", "yes", "on"),
        warehouse_url=values["warehouse_url"],
        database=check_name(values["database"], "CDC_DATABASE"),
        lookback_minutes=float(values["lookback_minutes"]),
        batch_rows=int(values["batch_rows"]),
        part_rows=int(values["part_rows"]),
        merge_bucket_rows=int(values["merge_bucket_rows"]),
        staging_retention_days=float(values["staging_retention_days"]),
        entities=entities,
    )


@cache
def settings() -> Settings:
    """The process-wide settings; tests call `settings.cache_clear()` after changing the env."""
    return load_settings()


# libpq keywords whose values are secrets (https://www.postgresql.org/docs/15/libpq-connect.html)
DSN_SECRET_KEYS = ("password", "sslpassword")
_DSN_PAIR = re.compile(
    r"(?P<head>\b(?:" + "|".join(DSN_SECRET_KEYS) + r")\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'|[^\s&]+)"
)


def mask_url(url: str) -> str:
    """A URL or libpq DSN with its secrets replaced by ***, so it can be logged or shown.

    Covers `scheme://user:password@host`, `?password=...` query parameters and key=value
    DSNs (`host=... password=... sslpassword='...'`). A DSN that names a service file has its
    secrets in that file, which is never read here.
    """
    masked = _DSN_PAIR.sub(r"\g<head>***", url)
    try:
        parts = urlsplit(masked)
        password = parts.password
    except ValueError:
        return masked
    if password is None:
        return masked
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
