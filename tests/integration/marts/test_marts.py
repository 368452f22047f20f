"""Marts against real warehouses (embedded chDB and the ClickHouse server): builds, atomic swaps,
data tests and the shipped marts. The project's parsing and DAG: tests/unit/marts/."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.core.errors import MartError
from pipeline.marts.build import build
from pipeline.marts.data_tests import MartTestError, run_tests
from pipeline.marts.project import Mart, build_order, load_project
from pipeline.warehouse import Warehouse, connect, qualified
from tests.support import SQL_DIR
from tests.support.marts import SOURCES, write


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ---------------------------------------------------------------- against real warehouses


@dataclass
class Site:
    """A warehouse with a throw-away database for one test."""

    wh: Warehouse
    database: str
    scratch: Path

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.wh.query_rows(sql.replace("{db}", f"`{self.database}`"))

    def tables(self) -> list[str]:
        return sorted(
            r[0]
            for r in self.wh.query_rows(
                "SELECT name FROM system.tables WHERE database = %(d)s", {"d": self.database}
            )
        )

    def mart(self, name: str, sql: str, tests: str = "", settings: str = "") -> Mart:
        """A one-file project loaded like the real one; the database's tables are known."""
        directory = self.scratch / uuid.uuid4().hex
        directory.mkdir()
        header = settings + (f"-- tests:\n{tests}" if tests else "")
        write(directory, {name: header + sql})
        known = (SOURCES | set(self.tables())) - {name}
        return load_project(directory, self.database, known)[name]


@pytest.fixture(params=["chdb", "clickhouse"])
def wh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "chdb":
        url = request.getfixturevalue("stack_env")["CDC_WAREHOUSE_URL"]
    else:
        url = request.getfixturevalue("clickhouse").env["CDC_WAREHOUSE_URL"]
    warehouse = connect(url)
    database = f"test_marts_{uuid.uuid4().hex[:12]}"
    warehouse.create_database(database)
    try:
        yield Site(warehouse, database, tmp_path)
    finally:
        warehouse.execute(f"DROP DATABASE IF EXISTS `{database}`")
        warehouse.close()


def test_table_build_applies_settings_and_replaces_data(wh: Site) -> None:
    mart = wh.mart(
        "numbers_mart",
        "SELECT toUInt32(number) AS n, toDate('2024-01-01') + number AS d FROM numbers(40)",
        settings="-- order_by: n\n-- partition_by: toYYYYMM(d)\n",
    )
    assert build(wh.wh, wh.database, mart) == 40
    assert wh.rows("SELECT count(), sum(n) FROM {db}.numbers_mart") == [(40, 780)]
    info = wh.wh.query_rows(
        "SELECT engine, sorting_key, partition_key FROM system.tables"
        " WHERE database = %(d)s AND name = 'numbers_mart'",
        {"d": wh.database},
    )
    assert info == [("MergeTree", "n", "toYYYYMM(d)")]
    smaller = wh.mart("numbers_mart", "SELECT toUInt32(number) AS n FROM numbers(3)")
    assert build(wh.wh, wh.database, smaller) == 3
    assert wh.rows("SELECT n FROM {db}.numbers_mart ORDER BY n") == [(0,), (1,), (2,)]
    assert wh.tables() == ["numbers_mart"]


def test_failing_build_keeps_the_old_table(wh: Site) -> None:
    good = wh.mart("stable", "SELECT toUInt64(number) AS n FROM numbers(10)")
    build(wh.wh, wh.database, good)
    bad = wh.mart(
        "stable",
        "SELECT toUInt64(number) AS n, throwIf(number = 70000) AS boom FROM numbers(100000)",
    )
    with pytest.raises(MartError) as err:
        build(wh.wh, wh.database, bad)
    assert "building stable failed; the previous version is unchanged" in str(err.value)
    assert "throwIf" in str(err.value)
    assert wh.rows("SELECT count(), sum(n) FROM {db}.stable") == [(10, 45)]
    assert wh.tables() == ["stable"]


def test_view_materialization_and_switching_kinds(wh: Site) -> None:
    wh.wh.execute(f"CREATE TABLE {qualified(wh.database, 'base')} (x Int32) ENGINE = Memory")
    wh.wh.execute(
        f"INSERT INTO {qualified(wh.database, 'base')} SELECT toInt32(arrayJoin([1, 2, 3]))"
    )
    view = wh.mart(
        "doubled", "SELECT x * 2 AS y FROM {{ database }}.base", settings="-- materialized: view\n"
    )
    assert build(wh.wh, wh.database, view) == 3
    wh.wh.execute(f"INSERT INTO {qualified(wh.database, 'base')} SELECT toInt32(4)")
    assert wh.rows("SELECT sum(y) FROM {db}.doubled") == [(20,)]
    tripled = wh.mart(
        "doubled", "SELECT x * 3 AS y FROM {{ database }}.base", settings="-- materialized: view\n"
    )
    build(wh.wh, wh.database, tripled)
    assert wh.rows("SELECT sum(y) FROM {db}.doubled") == [(30,)]
    as_table = wh.mart("doubled", "SELECT x * 2 AS y FROM {{ database }}.base")
    assert build(wh.wh, wh.database, as_table) == 4
    engine = wh.rows(
        f"SELECT engine FROM system.tables WHERE database = '{wh.database}' AND name = 'doubled'"
    )
    assert engine == [("MergeTree",)]
    assert build(wh.wh, wh.database, view) == 4
    assert wh.rows(
        f"SELECT engine FROM system.tables WHERE database = '{wh.database}' AND name = 'doubled'"
    ) == [("View",)]
    assert wh.tables() == ["base", "doubled"]


def test_swap_is_atomic_for_a_concurrent_reader(clickhouse: Any) -> None:
    """A reader on its own connection counts rows throughout many rebuilds: it only ever sees a
    complete old or new version, never a missing table or a partial one."""
    url = clickhouse.env["CDC_WAREHOUSE_URL"]
    writer = connect(url)
    database = f"test_marts_swap_{uuid.uuid4().hex[:8]}"
    writer.create_database(database)
    sizes = (100_000, 200_000)
    marts = [
        Mart(
            "swapped",
            Path("swapped.sql"),
            f"SELECT number AS n FROM numbers({size})",
            "table",
            "MergeTree",
            "n",
            None,
            (),
            frozenset(),
        )
        for size in sizes
    ]
    build(writer, database, marts[0])
    seen: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        reader = connect(url)
        try:
            while not stop.is_set():
                try:
                    seen.append(int(reader.scalar(f"SELECT count() FROM `{database}`.swapped")))
                except Exception as exc:
                    errors.append(str(exc).splitlines()[0])
        finally:
            reader.close()

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        for i in range(30):
            assert build(writer, database, marts[(i + 1) % 2]) == sizes[(i + 1) % 2]
    finally:
        stop.set()
        for thread in readers:
            thread.join()
        writer.execute(f"DROP DATABASE IF EXISTS `{database}`")
        writer.close()
    assert errors == []
    assert len(seen) > 30
    assert set(seen) == set(sizes)


# ------------------------------------------------------------------------------- data tests


def _tested(wh: Site, sql: str, tests: str) -> Mart:
    mart = wh.mart("checked", sql, tests=tests)
    build(wh.wh, wh.database, mart)
    return mart


VALUES_SQL = (
    "SELECT * FROM (SELECT 1 AS id, toNullable('a') AS code UNION ALL SELECT 2, 'b'"
    " UNION ALL SELECT 3, NULL{extra})"
)


@pytest.mark.parametrize(
    ("tests", "extra", "failures", "sample"),
    [
        ("--   id: [unique]\n", "", 0, None),
        (
            "--   id: [unique]\n",
            " UNION ALL SELECT 2, 'c' UNION ALL SELECT 2, 'd'",
            3,
            "id=2 (3 rows)",
        ),
        ("--   code: [unique]\n", " UNION ALL SELECT 4, NULL", 0, None),
        ("--   code: [not_null]\n", "", 1, "{id: 3, code: None}"),
        ("--   id: [not_null]\n", "", 0, None),
        ("--   code: [{accepted_values: {values: [a, b]}}]\n", "", 0, None),
        (
            "--   code: [{accepted_values: {values: [a]}}]\n",
            " UNION ALL SELECT 4, 'b'",
            2,
            "code='b' (2 rows)",
        ),
        ("--   id: [{accepted_values: {values: [1, 2, 3]}}]\n", "", 0, None),
        ("--   id: [{accepted_values: {values: [1, 2]}}]\n", "", 1, "id=3 (1 row)"),
        ("--   code: [{relationships: {to: parent, field: code}}]\n", "", 0, None),
        (
            "--   code: [{relationships: {to: parent, field: code}}]\n",
            " UNION ALL SELECT 4, 'zz'",
            1,
            "code='zz' (1 row)",
        ),
    ],
)
def test_generic_data_tests(
    wh: Site, tests: str, extra: str, failures: int, sample: str | None
) -> None:
    wh.wh.execute(
        f"CREATE TABLE {qualified(wh.database, 'parent')} ENGINE = Memory AS"
        " SELECT arrayJoin(['a', 'b']) AS code"
    )
    mart = _tested(wh, VALUES_SQL.format(extra=extra), tests)
    if failures == 0:
        results = run_tests(wh.wh, wh.database, mart)
        assert [r.passed for r in results] == [True]
        return
    with pytest.raises(MartTestError) as err:
        run_tests(wh.wh, wh.database, mart)
    (result,) = err.value.results
    assert result.failures == failures
    assert sample in result.samples
    assert f"failed for {failures} row{'s' if failures > 1 else ''}, e.g. " in str(err.value)
    assert sample in str(err.value)
    assert str(err.value).startswith(f"{mart.path}: checked: {result.test.name} [error] failed for")


def test_warn_severity_reports_without_failing(wh: Site, caplog: pytest.LogCaptureFixture) -> None:
    mart = _tested(
        wh,
        VALUES_SQL.format(extra=""),
        "--   code: [{not_null: {severity: warn}}]\n"
        "--   code: [{accepted_values: {values: [a], severity: warn}}]\n"
        "--   id: [unique]\n",
    )
    with caplog.at_level("WARNING", logger="pipeline.marts"):
        results = run_tests(wh.wh, wh.database, mart)
    assert [(r.test.name, r.failures) for r in results] == [
        ("not_null(code)", 1),
        ("accepted_values(code)", 1),
        ("unique(id)", 0),
    ]
    assert "accepted_values(code) [warn] failed for 1 row, e.g. code='b'" in caplog.text


# ------------------------------------------------------------------------- shipped marts


def _snapshot_tables(site: Site) -> None:
    """users/orders snapshots with the snapshot stage's column types (non-key columns Nullable)."""
    t = site.wh.features.timestamp_type
    db = site.database
    site.wh.execute(
        f"CREATE TABLE {qualified(db, 'users_snapshot')} (_id String, user_id Nullable(String),"
        " firstName Nullable(String), lastName Nullable(String), occupation Nullable(String),"
        f" state Nullable(String), dbt_scd_id String, dbt_updated_at {t}, dbt_valid_from {t},"
        f" dbt_valid_to Nullable({t})) ENGINE = MergeTree ORDER BY (_id, dbt_valid_from)"
    )
    site.wh.execute(
        f"CREATE TABLE {qualified(db, 'orders_snapshot')} (order_id Int64,"
        " user_id Nullable(String), product_id Nullable(Int32), quantity Nullable(Int32),"
        f" amount Nullable(Decimal(12, 2)), status Nullable(String), created_at Nullable({t}),"
        f" updated_at Nullable({t}), dbt_scd_id String, dbt_updated_at {t}, dbt_valid_from {t},"
        f" dbt_valid_to Nullable({t})) ENGINE = MergeTree ORDER BY (order_id, dbt_valid_from)"
    )


def _insert(site: Site, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    site.wh.insert_arrow(site.database, table, pa.Table.from_pylist(rows, schema=schema))


TS = pa.timestamp("us", "UTC")
USERS = pa.schema(
    [
        ("_id", pa.string()),
        ("user_id", pa.string()),
        ("firstName", pa.string()),
        ("lastName", pa.string()),
        ("occupation", pa.string()),
        ("state", pa.string()),
        ("dbt_scd_id", pa.string()),
        ("dbt_updated_at", TS),
        ("dbt_valid_from", TS),
        ("dbt_valid_to", TS),
    ]
)
ORDERS = pa.schema(
    [
        ("order_id", pa.int64()),
        ("user_id", pa.string()),
        ("product_id", pa.int32()),
        ("quantity", pa.int32()),
        ("amount", pa.decimal128(12, 2)),
        ("status", pa.string()),
        ("created_at", TS),
        ("updated_at", TS),
        ("dbt_scd_id", pa.string()),
        ("dbt_updated_at", TS),
        ("dbt_valid_from", TS),
        ("dbt_valid_to", TS),
    ]
)


def _user(
    uid: str, occupation: str | None, state: str | None, start: str, end: str | None
) -> dict[str, Any]:
    return {
        "_id": f"oid-{uid}",
        "user_id": uid,
        "firstName": "F",
        "lastName": "L",
        "occupation": occupation,
        "state": state,
        "dbt_scd_id": f"{uid}-{start}",
        "dbt_updated_at": ts(start),
        "dbt_valid_from": ts(start),
        "dbt_valid_to": ts(end) if end else None,
    }


def _order(
    oid: int, uid: str | None, created: str, amount: str, status: str, end: str | None = None
) -> dict[str, Any]:
    return {
        "order_id": oid,
        "user_id": uid,
        "product_id": 1,
        "quantity": 1,
        "amount": Decimal(amount),
        "status": status,
        "created_at": ts(created),
        "updated_at": ts(created),
        "dbt_scd_id": f"o{oid}-{status}",
        "dbt_updated_at": ts(created),
        "dbt_valid_from": ts(created),
        "dbt_valid_to": ts(end) if end else None,
    }


@pytest.fixture
def shipped(wh: Site) -> tuple[Site, dict[str, Mart]]:
    """The repo's sql/ built on a small history where users moved state."""
    _snapshot_tables(wh)
    _insert(
        wh,
        "users_snapshot",
        [
            # U1 lives in CA as an engineer, then moves to NY on 2024-03-01 (history starts 01-10).
            _user("U1", "engineer", "CA", "2024-01-10 00:00:00", "2024-03-01 00:00:00"),
            _user("U1", "engineer", "NY", "2024-03-01 00:00:00", None),
            # U2: changes job within TX; the first version has no state at all.
            _user("U2", "nurse", None, "2024-01-10 00:00:00", "2024-02-01 12:00:00"),
            _user("U2", "doctor", "TX", "2024-02-01 12:00:00", None),
            # U3 was deleted on 2024-02-01 (version closed, no current one).
            _user("U3", "pilot", "WA", "2024-01-10 00:00:00", "2024-02-01 00:00:00"),
        ],
        USERS,
    )
    _insert(
        wh,
        "orders_snapshot",
        [
            _order(1, "U1", "2023-12-24 10:00:00", "10.00", "delivered"),  # before U1's history
            _order(2, "U1", "2024-02-15 09:30:00", "20.00", "delivered"),  # CA
            _order(3, "U1", "2024-02-29 23:59:59", "30.00", "pending", "2024-03-02 00:00:00"),
            _order(3, "U1", "2024-02-29 23:59:59", "30.00", "cancelled"),  # CA, now cancelled
            _order(4, "U1", "2024-03-01 00:00:00", "40.50", "paid"),  # NY from this instant
            _order(5, "U1", "2024-03-05 08:00:00", "50.25", "delivered"),  # NY
            _order(6, "U2", "2024-01-05 00:00:00", "5.00", "paid"),  # before history: state NULL
            _order(7, "U2", "2024-02-15 00:00:00", "7.00", "paid"),  # TX, doctor
            _order(8, "U3", "2024-01-20 00:00:00", "8.00", "paid"),  # WA
            _order(9, "U3", "2024-03-05 00:00:00", "9.00", "paid"),  # U3 deleted by then
            _order(10, "U9", "2024-03-05 00:00:00", "1.00", "paid"),  # unknown user
        ],
        ORDERS,
    )
    marts = load_project(SQL_DIR, wh.database, SOURCES)
    for name in build_order(marts):
        build(wh.wh, wh.database, marts[name])
        run_tests(wh.wh, wh.database, marts[name])
    return wh, marts


def test_dim_users_has_current_users_only(shipped: tuple[Site, dict[str, Mart]]) -> None:
    site, _ = shipped
    assert site.rows("SELECT user_id, occupation, state FROM {db}.dim_users ORDER BY user_id") == [
        ("U1", "engineer", "NY"),
        ("U2", "doctor", "TX"),
    ]


def test_fct_orders_point_in_time_join(shipped: tuple[Site, dict[str, Mart]]) -> None:
    site, _ = shipped
    rows = site.rows(
        "SELECT order_id, user_id, status, state, occupation FROM {db}.fct_orders ORDER BY order_id"
    )
    assert rows == [
        (1, "U1", "delivered", "CA", "engineer"),
        (2, "U1", "delivered", "CA", "engineer"),
        (3, "U1", "cancelled", "CA", "engineer"),
        (4, "U1", "paid", "NY", "engineer"),
        (5, "U1", "delivered", "NY", "engineer"),
        (6, "U2", "paid", None, "nurse"),
        (7, "U2", "paid", "TX", "doctor"),
        (8, "U3", "paid", "WA", "pilot"),
        (9, "U3", "paid", None, None),
        (10, "U9", "paid", None, None),
    ]


def test_daily_revenue_excludes_cancelled_orders(shipped: tuple[Site, dict[str, Mart]]) -> None:
    site, _ = shipped
    rows = site.rows(
        "SELECT order_date, state, orders, revenue FROM {db}.mart_daily_revenue_by_state"
        " ORDER BY order_date, state"
    )
    assert rows == [
        (date(2023, 12, 24), "CA", 1, Decimal("10.00")),
        (date(2024, 1, 5), None, 1, Decimal("5.00")),
        (date(2024, 1, 20), "WA", 1, Decimal("8.00")),
        (date(2024, 2, 15), "CA", 1, Decimal("20.00")),
        (date(2024, 2, 15), "TX", 1, Decimal("7.00")),
        (date(2024, 3, 1), "NY", 1, Decimal("40.50")),
        (date(2024, 3, 5), "NY", 1, Decimal("50.25")),
        (date(2024, 3, 5), None, 2, Decimal("10.00")),
    ]


def test_shipped_marts_rebuild_in_place(shipped: tuple[Site, dict[str, Mart]]) -> None:
    site, marts = shipped
    assert build(site.wh, site.database, marts["fct_orders"]) == 10
    assert site.rows("SELECT count() FROM {db}.fct_orders") == [(10,)]
    assert not [t for t in site.tables() if t.endswith(("__new", "__old"))]
