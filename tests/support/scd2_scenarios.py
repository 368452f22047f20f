"""SCD2 scenarios shared by the unit and integration layers: random source histories, the
entities they run under, and the comparison with the oracle (tests/support/scd2_oracle.py).

Hypothesis draws a list of `Step`s; `source_states` turns it into full extracts of a source that
evolves by inserts, updates of checked and unchecked columns, NULLs, deletes and revivals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import strategies as st

from pipeline.config import Entity
from tests.support.scd2_oracle import Oracle, Version, invariant_problems

BASE = datetime(2024, 1, 1, tzinfo=UTC)
SECOND, MICROSECOND = timedelta(seconds=1), timedelta(microseconds=1)
ENTITY = "item"
CHECKED = ("name", "score")
# single keys, and composite keys whose plain concatenations collide
SINGLE_KEYS: tuple[tuple[Any, ...], ...] = ((1,), (2,), (3,), (4,))
PAIR_KEYS: tuple[tuple[Any, ...], ...] = (("ab", "c"), ("a", "bc"), ("abc", ""), ("", "abc"))
CONFIGS = {
    "check-cols": dict(strategy="check", check_cols=CHECKED),
    "check-all": dict(strategy="check", check_cols=None),
    "timestamp": dict(strategy="timestamp", updated_at="updated_at"),
}
HARD_DELETES = ("ignore", "invalidate", "new_record")
DELETE = "DELETE"


@dataclass(frozen=True)
class Step:
    gap: int  # ticks (time_unit) since the previous batch
    ops: dict[int, Any]  # key index -> DELETE or a patch {column: value, "age": ticks}
    crash: bool  # hit the failpoint once, then rerun the batch


NOTES = st.sampled_from([None, "x", "y"])
AGES = st.integers(0, 4)  # updated_at = batch time - age ticks
# an op on one key: a patch of any columns, a patch of unchecked columns only, or a delete;
# a patch on an absent key inserts it (a deleted key comes back with its last values)
OP = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from([None, "", "null", "a", "b"]),
            "score": st.one_of(st.none(), st.integers(-1, 2)),
            "note": NOTES,
            "age": AGES,
        },
    ),
    st.fixed_dictionaries({"note": NOTES}, optional={"age": AGES}),
    st.just(DELETE),
)
STEPS = st.lists(
    st.builds(
        Step,
        gap=st.integers(1, 3),
        ops=st.dictionaries(st.integers(0, 3), OP, min_size=1, max_size=4),
        crash=st.sampled_from([False, False, False, False, True]),
    ),
    min_size=2,
    max_size=6,
)


def make_entity(
    config: str,
    hard_deletes: str,
    composite: bool,
    guard: float = 1.0,
    incremental: bool = False,
) -> Entity:
    return Entity(
        name=ENTITY,
        source="postgres" if incremental else "mongo",
        object_name=ENTITY,
        unique_key=("k1", "k2") if composite else ("id",),
        hard_deletes=hard_deletes,
        mode="incremental" if incremental else "full",
        delete_guard=guard,
        **CONFIGS[config],
    )


def schema_for(entity: Entity) -> pa.Schema:
    if entity.unique_key == ("id",):
        keys = [pa.field("id", pa.int64())]
    else:
        keys = [pa.field(k, pa.string()) for k in entity.unique_key]
    return pa.schema(
        [
            *keys,
            pa.field("name", pa.string()),
            pa.field("score", pa.int64()),
            pa.field("note", pa.string()),
            pa.field("updated_at", pa.timestamp("us", "UTC")),
        ]
    )


def source_states(
    entity: Entity, steps: list[Step], tick: timedelta = SECOND
) -> Iterator[tuple[datetime, list[dict[str, Any]], bool]]:
    """(batch time, full extract, crash) per step: the source evolves by the steps' ops.

    Times move in ticks: whole seconds, or microseconds where the warehouse keeps them."""
    keys = SINGLE_KEYS if entity.unique_key == ("id",) else PAIR_KEYS
    source: dict[int, dict[str, Any]] = {}
    known: dict[int, dict[str, Any]] = {}  # last values of deleted keys: revivals reuse them
    ts = BASE
    for step in steps:
        ts += step.gap * tick
        for i, op in sorted(step.ops.items()):
            if op == DELETE:
                if i in source:
                    known[i] = source.pop(i)
                continue
            row = dict(source.get(i) or known.get(i) or _blank(entity, keys[i]))
            row.update({c: v for c, v in op.items() if c != "age"})
            if "age" in op:
                row["updated_at"] = ts - op["age"] * tick
            elif row["updated_at"] is None and entity.strategy == "timestamp":
                row["updated_at"] = ts
            source[i] = row
        yield ts, [dict(source[i]) for i in sorted(source)], step.crash


def _blank(entity: Entity, key: tuple[Any, ...]) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(entity.unique_key, key, strict=True))
    return row | {"name": None, "score": None, "note": None, "updated_at": None}


def batch_id(ts: datetime) -> str:
    return ts.strftime("%Y%m%dT%H%M%S%fZ")


def as_versions(rows: list[dict[str, Any]], entity: Entity) -> list[Version]:
    source = schema_for(entity).names
    return [
        Version(
            key=tuple(r[k] for k in entity.unique_key),
            values=tuple(sorted((c, _utc(r[c])) for c in source)),
            updated_at=_utc(r["dbt_updated_at"]),
            valid_from=_utc(r["dbt_valid_from"]),
            valid_to=_utc(r["dbt_valid_to"]),
            is_deleted=r.get("dbt_is_deleted"),
        )
        for r in rows
    ]


def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def oracle_for(entity: Entity) -> Oracle:
    return Oracle(
        unique_key=entity.unique_key,
        strategy=entity.strategy,
        check_cols=entity.check_cols,
        updated_at=entity.updated_at,
        hard_deletes=entity.hard_deletes,
    )


def describe(versions: list[Version]) -> str:
    def fmt(t: datetime | None) -> str:
        return "-" if t is None else f"+{(t - BASE).total_seconds():g}s"

    lines = []
    for v in sorted(versions, key=lambda v: (repr(v.key), v.valid_from)):
        values = {c: fmt(x) if c == "updated_at" and x else x for c, x in v.values}
        values = {c: x for c, x in values.items() if c not in ("id", "k1", "k2")}
        flag = f" deleted={v.is_deleted}" if v.is_deleted is not None else ""
        lines.append(
            f"  {v.key!r} [{fmt(v.valid_from)}, {fmt(v.valid_to)}) upd={fmt(v.updated_at)}"
            f"{flag} {values}"
        )
    return "\n".join(lines)


def assert_history(got: list[Version], expected: list[Version], entity: Entity) -> None:
    gaps = entity.hard_deletes == "invalidate"
    assert invariant_problems(got, gaps) == [], describe(got)
    # Version holds unorderable values (None next to str): compare sorted text forms
    if sorted(map(repr, got)) != sorted(map(repr, expected)):
        pytest.fail(f"history differs\nengine:\n{describe(got)}\noracle:\n{describe(expected)}")


def at(seconds: int) -> datetime:
    return BASE + timedelta(seconds=seconds)


def version(
    key: int,
    row: dict[str, Any],
    start: int,
    end: int | None,
    updated: int,
    deleted: str | None = None,
) -> Version:
    values = tuple(sorted({"id": key, **row}.items()))
    stop = None if end is None else at(end)
    return Version((key,), values, at(updated), at(start), stop, deleted)
