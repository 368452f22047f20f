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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.entities import (
    ENTITY_OPTIONS,
    ENTITY_PREFIX,
    OPTION,
    Entity,
    Option,
    parse_entity,
    timestamp_setting,
)
from pipeline.config.fields import (
    ENV_ONLY,
    FIELD,
    FIELDS,
    SECRET_NAME,
    SECRET_VARS,
    SECTION,
    Field,
)
from pipeline.core.errors import ConfigError
from pipeline.core.secrets import SHORTEST_SECRET, dsn_passwords, mask_dsn

__all__ = [
    "ENTITY_OPTIONS",
    "ENTITY_PREFIX",
    "ENV_ONLY",
    "FIELDS",
    "OPTION",
    "SECTION",
    "ConfigError",
    "Entity",
    "Field",
    "Option",
    "Settings",
    "env_value",
    "load_settings",
    "mask_url",
    "secret_values",
    "timestamp_setting",
]


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
    snapshot_chunk_rows: int
    slot_lag_warn_mb: float
    cluster: str
    replicated_path_prefix: str
    ddl_timeout_seconds: int
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
        parse_entity(s.removeprefix(ENTITY_PREFIX), dict(parser.items(s)), values)
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
