"""`[entity.NAME]` sections: one source collection/table each, and how its history is kept.

`ENTITY_OPTIONS` declares every option once (which sources take it, its default, its meaning);
an unknown option or one of another source kind is refused, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.core.choices import CHANGE_MODES, HARD_DELETES, MODES, SOURCES, STRATEGIES
from pipeline.core.errors import ConfigError
from pipeline.core.names import (
    SNAPSHOT_META_COLUMNS,
    check_name,
    raw_table,
    snapshot_storage,
    snapshot_view,
)

ENTITY_PREFIX = "entity."


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
    Option(
        "mode",
        SOURCES,
        "postgres: incremental with updated_at; mongo: full",
        "`full`, `incremental` (postgres), `log` (postgres), `changestream` (mongo)",
    ),
    Option(
        "collapse",
        ("postgres", "mongo"),
        "false",
        "log/changestream: one version per key per batch",
    ),
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
    collapse: bool = False  # change modes: only each batch's last state of a key is history
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

    @property
    def captures_changes(self) -> bool:
        """Read from the database's log of changes (a replication slot, a change stream)."""
        return self.mode in CHANGE_MODES

    @property
    def keeps_raw_history(self) -> bool:
        """Raw holds each change once (not a copy per batch): retention never drops it."""
        return self.incremental or self.captures_changes


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


def parse_entity(name: str, options: dict[str, str], cfg: dict[str, Any]) -> Entity:
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
        raise ConfigError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    log_source = {"log": "postgres", "changestream": "mongo"}.get(mode)
    if log_source is not None and source != log_source:
        raise ConfigError(f"{where}: mode = {mode} applies to {log_source} sources only")
    if mode == "incremental" and (source != "postgres" or not updated_at):
        raise ConfigError(f"{where}: mode = incremental needs a postgres table and 'updated_at'")
    reconcile = _flag(options.get("reconcile", "false"))
    collapse = _flag(options.get("collapse", "false"))
    if collapse and mode not in CHANGE_MODES:
        raise ConfigError(f"{where}: collapse applies to mode = log or changestream only")
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
        collapse=collapse,
        raw_retention_days=_number(
            options.get("raw_retention_days"), cfg["raw_retention_days"], where
        ),
    )


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


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
