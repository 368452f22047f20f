"""Input a new user or a hostile source produces, against the real servers (issue 14).

Each test first shows the failure a user met (a stuck batch, a silently rewritten history, a row
never loaded) and asserts what must happen instead, on data read back from the warehouse.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from luigi.execution_summary import LuigiStatusCode

from tests.conftest import Env

WEIRD = "we`ird'\"; DROP TABLE x; --"
LONG = "f" * 300


def failures(env: Env) -> list[tuple[str, str, str]]:
    """(task, entity, error) of the failed task runs, from the run audit."""
    return [
        (task, entity, error)
        for task, entity, error in env.rows(
            "SELECT task, entity, error FROM {db}._cdc_runs WHERE status = 'FAILURE'"
            " ORDER BY finished_at"
        )
    ]


def table_exists(env: Env, table: str) -> bool:
    return env.wh.table_exists(env.database, table)


def test_field_names_that_break_sql_load_and_the_rest_lands_in_extra(pipeline_env: Env) -> None:
    """A backtick in a field name once failed LoadRaw on chDB forever; names that cannot be
    columns (too long for a column file, reserved) land in `_extra` instead."""
    env = pipeline_env
    env.generate(users=20, products=3, orders=10)
    env.mongo().insert_one(
        {
            "user_id": "WEIRD1",
            "state": "Lagos",
            "occupation": "Tester",
            WEIRD: "v1",
            LONG: "long value",
            "_batch_id": "not ours",
        }
    )
    batch, status = env.run()
    assert status == LuigiStatusCode.SUCCESS, failures(env)
    columns = env.wh.columns(env.database, "raw_users")
    assert WEIRD in columns and LONG not in columns
    (row,) = env.rows(
        "SELECT `we\\`ird'\"; DROP TABLE x; --`, _extra, _batch_id FROM {db}.raw_users"
        " WHERE user_id = 'WEIRD1'"
    )
    assert row[0] == "v1" and row[2] == batch
    assert json.loads(row[1]) == {LONG: "long value", "_batch_id": "not ours"}
    assert WEIRD in env.wh.columns(env.database, "users_snapshot")
    assert env.count("users_snapshot", "WHERE dbt_valid_to IS NULL") == 21
    env.mongo().update_one({"user_id": "WEIRD1"}, {"$set": {"state": "Kano", WEIRD: "v2"}})
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS, failures(env)
    states = env.rows(
        "SELECT state FROM {db}.users_snapshot WHERE user_id = 'WEIRD1' ORDER BY dbt_valid_from"
    )
    assert [s for (s,) in states] == ["Lagos", "Kano"]


@pytest.mark.parametrize("pipeline_env", ["chdb"], indirect=True)
@pytest.mark.parametrize(
    "check_cols", ["state, no_such_col", "state, occupation`); DROP TABLE x; --"]
)
def test_unknown_check_cols_fail_before_anything_is_written(
    pipeline_env: Env, check_cols: str
) -> None:
    """`check_cols = state, no_such_col` once ran with exit 0 and versioned every key again."""
    env = pipeline_env
    env.generate(users=20, products=3, orders=10)
    env.add_entity(
        "people",
        source="mongo",
        collection="users",
        unique_key="_id",
        strategy="check",
        check_cols=check_cols,
    )
    _, status = env.run()
    assert status == LuigiStatusCode.FAILED
    (failed,) = [f for f in failures(env) if f[1] == "people"]
    assert failed[0] == "Extract" and "[entity.people]" in failed[2]
    assert "check_cols = " in failed[2] and "no such column" in failed[2]
    assert ("no_such_col" in failed[2]) == ("no_such_col" in check_cols)
    assert not table_exists(env, "raw_people") and not table_exists(
        env, "people_snapshot__versions"
    )
    assert env.count("users_snapshot") == 20  # the other entities ran


@pytest.mark.parametrize("pipeline_env", ["chdb"], indirect=True)
def test_unknown_postgres_columns_fail_naming_entity_setting_and_column(pipeline_env: Env) -> None:
    env = pipeline_env
    env.generate(users=5, products=3, orders=10)
    env.add_entity(
        "bad_orders",
        source="postgres",
        table="public.orders",
        unique_key="order_id, no_key",
        strategy="check",
        check_cols="status, no_status",
    )
    _, status = env.run()
    assert status == LuigiStatusCode.FAILED
    (failed,) = [f for f in failures(env) if f[1] == "bad_orders"]
    assert "[entity.bad_orders]" in failed[2] and "PostgreSQL table public.orders" in failed[2]
    assert "unique_key = 'no_key'" in failed[2] and "check_cols = 'no_status'" in failed[2]
    assert not table_exists(env, "raw_bad_orders")


@pytest.mark.parametrize("pipeline_env", ["chdb"], indirect=True)
def test_infinite_updated_at_fails_naming_table_key_and_column(pipeline_env: Env) -> None:
    """A row with updated_at = 'infinity' was never in any window and never reported."""
    env = pipeline_env
    env.generate(users=5, products=3, orders=10)
    env.run()
    with env.pg() as conn, conn.cursor() as cur:
        cur.execute("UPDATE orders SET updated_at = 'infinity' WHERE order_id = 3")
        cur.execute("UPDATE orders SET updated_at = '-infinity' WHERE order_id = 4")
    _, status = env.run()
    assert status == LuigiStatusCode.FAILED
    (failed,) = [f for f in failures(env) if f[1] == "orders"]
    assert "public.orders" in failed[2] and "'updated_at' is infinite" in failed[2]
    assert "{'order_id': 3} = infinity" in failed[2] and "{'order_id': 4} = -infinity" in failed[2]
    with env.pg() as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE orders SET updated_at = now(), status = 'fixed' WHERE order_id IN (3, 4)"
        )
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    assert env.count("orders_snapshot", "WHERE status = 'fixed' AND dbt_valid_to IS NULL") == 2


def test_rows_with_null_updated_at_are_loaded_once_per_change(pipeline_env: Env) -> None:
    """A row written with a NULL updated_at after the first run was invisible to the window."""
    env = pipeline_env
    env.generate(users=5, products=3, orders=10)
    env.run()
    with env.pg() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO orders (order_id, user_id, product_id, amount, status, created_at,"
            " updated_at) SELECT 9001, user_id, product_id, amount, 'late', created_at, NULL"
            " FROM orders WHERE order_id = 1"
        )
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    assert env.count("raw_orders", "WHERE order_id = 9001") == 1
    assert env.count("orders_snapshot", "WHERE order_id = 9001 AND dbt_valid_to IS NULL") == 1
    _, status = env.run()  # read again, unchanged: not loaded again
    assert status == LuigiStatusCode.SUCCESS
    assert env.count("raw_orders", "WHERE order_id = 9001") == 1
    for value in ("changed", "late"):  # and back: a change to the earlier state is still one
        with env.pg() as conn, conn.cursor() as cur:
            cur.execute("UPDATE orders SET status = %s WHERE order_id = 9001", (value,))
        _, status = env.run()
        assert status == LuigiStatusCode.SUCCESS
    history = env.rows(
        "SELECT status, dbt_valid_to IS NULL FROM {db}.orders_snapshot WHERE order_id = 9001"
        " ORDER BY dbt_valid_from"
    )
    assert history == [("late", 0), ("changed", 0), ("late", 1)]
    assert env.count("raw_orders", "WHERE order_id = 9001") == 3


@pytest.mark.parametrize("pipeline_env", ["chdb"], indirect=True)
@pytest.mark.parametrize("hard_deletes", ["ignore", "invalidate"])
def test_missing_collection_fails_naming_database_and_collection(
    pipeline_env: Env, hard_deletes: str
) -> None:
    """A typo in `collection` read as an empty collection: with ignore it succeeded silently."""
    env = pipeline_env
    env.generate(users=5, products=3, orders=10)
    env.mongo("empty_one").database.create_collection("empty_one")
    common = {"source": "mongo", "unique_key": "_id", "hard_deletes": hard_deletes}
    env.add_entity("typo", collection="userz", **common)
    env.add_entity("empty", collection="empty_one", **common)
    _, status = env.run()
    assert status == LuigiStatusCode.FAILED
    failed = failures(env)
    assert [(task, entity) for task, entity, _ in failed] == [("Extract", "typo")]
    database = env.values["CDC_MONGO_DB"]
    assert f"MongoDB collection {database}.userz does not exist" in failed[0][2]
    assert env.rows(
        "SELECT count() FROM {db}._cdc_batches WHERE entity = 'empty' AND stage = 'snapshot'"
    ) == [(1,)]


@pytest.mark.parametrize("valid_to", ["9999-12-31", "2100-01-01 00:00:00"])
def test_valid_to_current_outside_the_warehouse_range_is_refused(
    pipeline_env: Env, valid_to: str
) -> None:
    """On ClickHouse 18.16 a `dbt_valid_to_current` of 9999-12-31 read as 1970-01-01."""
    env = pipeline_env
    env.generate(users=5, products=3, orders=10)
    env.add_entity(
        "people",
        source="mongo",
        collection="users",
        unique_key="_id",
        check_cols="state",
        dbt_valid_to_current=valid_to,
    )
    _, status = env.run()
    expected = datetime.fromisoformat(valid_to).replace(tzinfo=UTC)
    if env.wh.holds_timestamp(expected.strftime("%Y-%m-%d %H:%M:%S.%f")):
        assert status == LuigiStatusCode.SUCCESS, failures(env)
        shown = {to for (to,) in env.rows("SELECT DISTINCT dbt_valid_to FROM {db}.people_snapshot")}
        assert shown == {expected}
        return
    assert env.values["CDC_WAREHOUSE_URL"].startswith("clickhouse://")  # 18.16 has no DateTime64
    assert status == LuigiStatusCode.FAILED
    (failed,) = [f for f in failures(env) if f[1] == "people"]
    assert failed[0] == "Extract" and "dbt_valid_to_current" in failed[2]
    assert "1970-01-01 00:00:01 .. 2105-12-31 23:59:59" in failed[2]
    assert not table_exists(env, "raw_people")


@pytest.mark.parametrize("pipeline_env", ["chdb"], indirect=True)
def test_shipped_users_entity_keeps_a_deleted_user_current_as_the_seed_does(
    pipeline_env: Env,
) -> None:
    """The seed's dbt snapshot has no hard-delete setting (dbt: ignore); luigi.cfg shipped
    `invalidate`, which closed deleted users and changed dim_users."""
    env = pipeline_env
    env.generate(users=10, products=3, orders=10)
    env.run()
    gone: dict[str, Any] = env.mongo().find_one({}, sort=[("user_id", 1)])
    env.mongo().delete_one({"_id": gone["_id"]})
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    (current,) = env.rows(
        "SELECT dbt_valid_to FROM {db}.users_snapshot WHERE user_id = %(u)s", {"u": gone["user_id"]}
    )
    assert current == (None,)
    assert env.count("dim_users", f"WHERE user_id = '{gone['user_id']}'") == 1
