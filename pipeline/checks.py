"""Entity settings checked against what they name: a source's columns, the warehouse's range.

A setting that names a column the source does not have, or a timestamp the warehouse cannot
store, fails the batch before anything is written, naming the entity, the setting and the
value: silently, a `check_cols` typo would version every key again, and a
`dbt_valid_to_current` out of range would read 1970-01-01.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from pipeline.config import ENTITY_PREFIX, Entity
from pipeline.core.errors import ConfigError


class TimestampHolder(Protocol):
    """What `check_valid_to_current` needs of a warehouse."""

    features: Any

    def holds_timestamp(self, text: str) -> bool: ...


def check_valid_to_current(entity: Entity, wh: TimestampHolder) -> None:
    """Refuse a `dbt_valid_to_current` the warehouse's timestamps cannot hold: ClickHouse would
    show every current version as 1970-01-01 instead. Checked before a batch writes anything."""
    value = entity.valid_to_current
    if value is not None and not wh.holds_timestamp(value):
        features = wh.features
        raise ConfigError(
            f"[{ENTITY_PREFIX}{entity.name}] dbt_valid_to_current = {value} is outside what the"
            f" warehouse's {features.timestamp_type} holds ({features.timestamp_range} UTC);"
            " current versions would read 1970-01-01",
            entity=entity.name,
        )


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
        f" (it has: {known})",
        entity=entity.name,
    )
