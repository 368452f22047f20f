"""The SQL a snapshot merge runs, read as strings (`pipeline.snapshot.plan`): identifiers always
quoted, the batch filter and signature in every read of raw, "current" read by batch ids, bucket
conditions on both sides of each anti-join, and what differs between the strategies."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import replace

import pytest

from pipeline.config import Entity
from pipeline.core.hashing import check_signature
from pipeline.snapshot.plan import CURRENT, Parking, Plan, groups, scd_id_sql
from pipeline.snapshot.storage import Names
from pipeline.warehouse import quote_ident
from pipeline.warehouse.buckets import Buckets
from pipeline.warehouse.sql import render

BATCH = "20240101T000000000000Z"
MARK = "INJECTED"  # every hostile name holds it: it must never appear outside quotes
KEYS = (f"k`) OR 1=1; DROP TABLE t; -- {MARK}", f"back\\slash\\`{MARK}'")
UPDATED = f'upd\'ated "at" {MARK} ключ'
CHECKED = (f"ünï`{MARK}", "x" * 150 + MARK)
DB = "dp"
BATCH_TS = "toDateTime64('2024-01-01 00:00:00', 6, 'UTC')"


def lex(sql: str) -> tuple[list[str], list[str], str]:
    """(backtick identifiers, string literals, the text outside both), escapes decoded.

    An identifier that broke out of its quotes would leave one unbalanced: IndexError."""
    identifiers: list[str] = []
    strings: list[str] = []
    outside: list[str] = []
    i = 0
    while i < len(sql):
        quote = sql[i]
        if quote not in "`'":
            outside.append(quote)
            i += 1
            continue
        j, text = i + 1, []
        while sql[j] != quote:
            if sql[j] == "\\":
                j += 1
            text.append(sql[j])
            j += 1
        (identifiers if quote == "`" else strings).append("".join(text))
        outside.append(" ")
        i = j + 1
    return identifiers, strings, "".join(outside)


def entity(strategy: str = "check", hard_deletes: str = "invalidate", **kw: object) -> Entity:
    options: dict[str, object] = {
        "name": "item",
        "source": "postgres",
        "object_name": "public.item",
        "unique_key": KEYS,
        "strategy": strategy,
        "check_cols": CHECKED if strategy == "check" else None,
        "updated_at": UPDATED if strategy == "timestamp" else None,
        "hard_deletes": hard_deletes,
    }
    return Entity(**{**options, **kw})  # type: ignore[arg-type]


def plan(e: Entity, **kw: bool) -> Plan:
    flags = {"has_raw": True, "reconciled": False, "has_history": True, **kw}
    return Plan(Names.of(DB, e), e, BATCH, **flags)


def parking(p: Plan) -> Parking:
    key_types = {KEYS[0]: "String", KEYS[1]: "Int64"}
    return Parking(p, key_types, "DateTime64(6, 'UTC')", BATCH_TS)


def plans() -> Iterator[Plan]:
    """Every strategy x hard_deletes x scan x history, the way `merge.prepare` builds them."""
    for strategy, hard_deletes, mode, has_raw, has_history in itertools.product(
        ("check", "timestamp"),
        ("ignore", "invalidate", "new_record"),
        ("full", "incremental", "reconciled"),
        (True, False),
        (True, False),
    ):
        incremental = mode != "full"
        e = entity(
            strategy,
            hard_deletes,
            mode="incremental" if incremental else "full",
            reconcile=mode == "reconciled",
            updated_at=UPDATED,
        )
        yield plan(e, has_raw=has_raw, reconciled=mode == "reconciled", has_history=has_history)


def statements(p: Plan) -> Iterator[str]:
    buckets = Buckets(3, p.entity.unique_key)
    for where in (buckets.where(0), "1"):
        yield p.incoming_sql(where)
        yield p.current_or_empty_sql(where)
        if (ended := p.ended_sql(where)) is not None:
            yield ended
    yield p.validate_sql()
    yield p.repeated_keys_sql()
    yield p.live_digest_sql()
    yield p.stale_rows_sql()
    yield p.live_count_sql()
    yield p.bucket_counts_sql(buckets)
    yield from p.change_count_sqls()
    k = parking(p)
    yield from k.create_sqls()
    yield from k.drop_sqls()
    columns = [*KEYS, *CHECKED, UPDATED, "plain"]
    yield k.opens_of_parked(columns, [0, 2])
    if not k.timestamped:
        yield k.open_sql(columns, buckets.where_any([1]), None)
    stored = [*columns, "dbt_scd_id", "dbt_valid_to", "dbt_is_deleted", "_closed_by", "_version"]
    yield k.copy_sql([0], stored, k.close_columns)
    yield k.copy_sql([0, 1], stored, k.tombstone_columns, "_tombstone = 1")
    yield k.touched_keys_sql(True, [1], buckets)


ALLOWED = {
    DB,
    "raw_item",
    "raw_item__keys",
    "item_snapshot__versions",
    "item_snapshot__versions__open",
    "item_snapshot__versions__close",
    *KEYS,
    *CHECKED,
    UPDATED,
    "plain",
    "dbt_scd_id",
    "dbt_updated_at",
    "dbt_valid_from",
    "dbt_valid_to",
    "dbt_is_deleted",
    "_hash",
    "_opened_by",
    "_closed_by",
    "_version",
}


def test_hostile_names_stay_inside_their_backticks() -> None:
    count = 0
    for p in plans():
        for sql in statements(p):
            identifiers, strings, outside = lex(sql)
            assert MARK not in outside, sql
            assert set(identifiers) <= ALLOWED, set(identifiers) - ALLOWED
            assert all(MARK not in s for s in strings), sql
            count += 1
    assert count > 1000


def test_every_placeholder_is_a_parameter_of_the_plan() -> None:
    for p in plans():
        assert p.params == {"b": BATCH, "s": check_signature(p.entity.check_cols)}
        for sql in statements(p):
            used = set(re.findall(r"%\((\w+)\)s", sql))
            assert used <= {"b", "s", "v"}, sql
            rendered = render(sql, {**p.params, "v": 7})
            assert "%(" not in rendered
            assert f"'{BATCH}'" in rendered or "%(b)s" not in sql


def test_every_read_of_the_raw_batch_filters_batch_and_signature() -> None:
    raw = f"{quote_ident(DB)}.{quote_ident('raw_item')}"
    exact = f"{raw} WHERE _batch_id = %(b)s AND _check_cols = %(s)s AND "
    for p in plans():
        for sql in statements(p):
            if sql == p.stale_rows_sql():
                assert sql.endswith(f"{raw} WHERE _batch_id = %(b)s AND _check_cols != %(s)s")
                continue
            assert sql.count(raw) == sql.count(exact), sql


def test_current_means_current_before_this_batch() -> None:
    """Read by batch ids, so a crashed attempt's own writes do not change the diff."""
    assert CURRENT == "_opened_by < %(b)s AND (_closed_by = '' OR _closed_by >= %(b)s)"
    storage = f"{quote_ident(DB)}.{quote_ident('item_snapshot__versions')} FINAL WHERE "
    for p in plans():
        for sql in (p.live_digest_sql(), p.live_count_sql(), p.current_or_empty_sql("1")):
            assert sql.count(storage) == sql.count(storage + CURRENT) or "WHERE 0" in sql, sql


def test_bucket_conditions_bound_both_sides_of_each_anti_join() -> None:
    e = entity()
    p = plan(e)
    buckets = Buckets(3, e.unique_key)
    fingerprint = f"cityHash64(toString({quote_ident(KEYS[0])}), toString({quote_ident(KEYS[1])}))"
    assert buckets.of_key == f"modulo({fingerprint}, 3)"
    where = buckets.where(2)
    assert where == f"modulo({fingerprint}, 3) IN (2)"
    changed = p.changed_sql(where)
    assert changed.count(where) == 2  # the batch, and the current versions it is compared with
    current = p.current_sql(where)
    assert current is not None and current.count(where) == 2
    assert Buckets(1, e.unique_key).where(0) == "1"
    assert buckets.where_any([0, 1, 2]) == "1"
    assert buckets.where_any([0, 2]) == f"modulo({fingerprint}, 3) IN (0, 2)"
    assert Buckets.sized(250_000, 100_000, e.unique_key).count == 2
    assert Buckets.sized(199_999, 100_000, e.unique_key).count == 1
    assert Buckets.sized(0, 0, e.unique_key).count == 1


def test_check_and_timestamp_strategies_read_different_columns() -> None:
    check, stamp = plan(entity("check")), plan(entity("timestamp"))
    updated = quote_ident(UPDATED)
    assert updated not in check.changed_sql("1") and updated in stamp.changed_sql("1")
    keys = ", ".join(map(quote_ident, KEYS))
    assert check.current_columns == [keys, "dbt_scd_id", "_hash"]
    assert stamp.current_columns == [
        keys,
        "dbt_scd_id",
        "_hash",
        "dbt_updated_at",
        "dbt_valid_from",
    ]
    new_record = plan(entity("check", "new_record"))
    assert new_record.current_columns[-1] == "dbt_is_deleted"
    assert new_record.live == "ifNull(dbt_is_deleted, '') != 'True'" and check.live == "1"
    assert check.ended_sql("1") is None and stamp.ended_sql("1") is not None
    assert plan(entity("timestamp", "new_record")).ended_sql("1") is None
    first = {"has_history": False}
    assert plan(entity("check"), **first).opens_everything
    assert not plan(entity("timestamp"), **first).opens_everything
    assert not plan(entity("check")).opens_everything


def test_parked_opens_take_their_validity_from_the_diff_only_for_timestamps() -> None:
    check, stamp = parking(plan(entity("check"))), parking(plan(entity("timestamp")))
    assert "dbt_valid_from" not in check.create_sqls()[1]
    assert (
        "dbt_updated_at DateTime64(6, 'UTC'), dbt_valid_from DateTime64(6, 'UTC')"
        in (stamp.create_sqls()[1])
    )
    opens = check.open_sql(list(KEYS), "1", None)
    assert f"{BATCH_TS}, {BATCH_TS}, _check_hash" in opens and "JOIN" not in opens
    assert scd_id_sql(KEYS, BATCH_TS) in opens
    parked = stamp.opens_of_parked(list(KEYS), [1])
    assert "ANY INNER JOIN" in parked and "_p_updated_at, _p_valid_from, _check_hash" in parked
    assert scd_id_sql(KEYS, "_p_valid_from") in parked
    assert "'False'" in parking(plan(entity("check", "new_record"))).open_sql(list(KEYS), "1", None)
    assert "dbt_is_deleted" not in opens


def test_which_current_versions_the_diff_needs() -> None:
    full = entity("check", "invalidate")
    assert plan(full).retires
    assert plan(full, has_history=False).current_sql("1") is None
    assert plan(entity("check", "ignore")).current_sql("1") is not None
    assert plan(entity("check", "ignore"), has_raw=False).current_sql("1") is None
    gone = plan(full, has_raw=False).current_sql("1")
    assert gone is not None and gone.endswith("AND (1)")  # no raw table: every live key went
    assert plan(full, has_raw=False).incoming_sql("1").endswith("WHERE 0")
    window = replace(full, mode="incremental")
    assert not plan(window).retires and plan(window, reconciled=True).retires
    narrow = plan(window).current_sql("1")
    assert narrow is not None and narrow.count(" AND cityHash64(") == 1  # changed keys only
    listed = plan(window, reconciled=True).current_sql("1")
    assert listed is not None and "raw_item__keys" in listed and "AS _present" in listed
    assert len(plan(full).change_count_sqls()) == 2
    assert len(plan(full, has_history=False).change_count_sqls()) == 1


def test_dbt_scd_id_is_md5_of_the_key_text_and_valid_from() -> None:
    single = scd_id_sql(("id",), "dbt_valid_from")
    assert single == (
        "lower(hex(MD5(concat(toString(assumeNotNull(`id`)), '|', toString(dbt_valid_from)))))"
    )
    pair = scd_id_sql(("a", "b"), "t")
    text = "toString(assumeNotNull(`{}`))"
    assert pair == (
        "lower(hex(MD5(concat(concat("
        f"toString(length({text.format('a')})), ':', {text.format('a')}, ';', "
        f"toString(length({text.format('b')})), ':', {text.format('b')}, ';'"
        "), '|', toString(t)))))"
    )


@pytest.mark.parametrize(
    ("counts", "rows", "grouped"),
    [
        ({}, 10, []),
        ({0: 5, 1: 5, 2: 5}, 10, [[0, 1], [2]]),
        ({2: 3, 0: 3, 1: 3}, 100, [[0, 1, 2]]),
        ({0: 50, 1: 1, 2: 50}, 10, [[0], [1], [2]]),  # a big bucket stands alone
        ({3: 1, 7: 1}, 1, [[3], [7]]),
    ],
)
def test_groups_of_buckets_per_statement(
    counts: dict[int, int], rows: int, grouped: list[list[int]]
) -> None:
    assert groups(counts, rows) == grouped
