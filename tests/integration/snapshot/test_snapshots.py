"""Snapshot stage through the real graph: rebuild, dbt adoption, meta names, guard, order."""

from __future__ import annotations

import time

import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import runtime
from pipeline.core.batch import new_batch_id
from pipeline.core.errors import SnapshotError
from pipeline.graph import Snapshot
from pipeline.runtime import settings
from pipeline.snapshot.invariants import first_load_violations
from pipeline.snapshot.maintenance import adopt, rebuild
from pipeline.snapshot.merge import apply_batch
from pipeline.snapshot.storage import Names
from setup.simulate_cdc import simulate
from tests.conftest import Env


def _history(env: Env, table: str, key: str) -> list[tuple]:
    return env.rows(f"SELECT * FROM {{db}}.{table} ORDER BY {key}, dbt_valid_from")


def _pause(env: Env) -> None:
    """Whole-second timestamps on servers without DateTime64: keep batches a second apart."""
    if not env.wh.features.datetime64:
        time.sleep(1.05)


def _add_people(env: Env, check_cols: str, **options: str) -> None:
    """A second entity over the users collection (check strategy), configured per test."""
    env.add_entity(
        "people",
        source="mongo",
        collection="users",
        unique_key="_id",
        strategy="check",
        check_cols=check_cols,
        **options,
    )


@pytest.fixture
def env(pipeline_env: Env) -> Env:
    pipeline_env.generate(users=80, products=6, orders=120, seed=3)
    return pipeline_env


def test_rebuild_from_raw_equals_incremental_history(env: Env) -> None:
    for step in range(3):
        _, status = env.run()
        assert status == LuigiStatusCode.SUCCESS
        v = env.values
        simulate(v["CDC_MONGO_URI"], v["CDC_MONGO_DB"], v["CDC_POSTGRES_DSN"], 12, seed=step)
        _pause(env)
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    users = _history(env, "users_snapshot", "_id")
    orders = _history(env, "orders_snapshot", "order_id")
    assert len(users) > 80 and len(orders) > 120  # history moved
    cfg = settings()
    assert rebuild(env.wh, env.database, cfg.entity("users")) == 4
    assert rebuild(env.wh, env.database, cfg.entity("orders")) == 4
    assert _history(env, "users_snapshot", "_id") == users
    assert _history(env, "orders_snapshot", "order_id") == orders


def test_adopt_a_dbt_snapshot_table_in_place(env: Env) -> None:
    ts = env.wh.features.timestamp_type
    db = f"`{env.database}`"
    env.wh.create_database(env.database)
    env.wh.execute(
        f"CREATE TABLE {db}.users_snapshot (_id String, user_id Nullable(String),"
        " firstName Nullable(String), lastName Nullable(String), occupation Nullable(String),"
        f" state Nullable(String), dbt_scd_id String, dbt_updated_at {ts},"
        f" dbt_valid_from {ts}, dbt_valid_to Nullable({ts}))"
        " ENGINE = MergeTree ORDER BY _id"
    )
    user = env.mongo().find_one({}, sort=[("user_id", 1)])
    uid, oid = user["user_id"], str(user["_id"])
    env.wh.execute(
        f"INSERT INTO {db}.users_snapshot SELECT %(id)s, %(u)s, 'A', 'B', 'Clerk', 'Kano',"
        " 'old', toDateTime('2024-01-01 00:00:00', 'UTC'),"
        " toDateTime('2024-01-01 00:00:00', 'UTC'), toDateTime('2024-02-01 00:00:00', 'UTC')",
        {"id": oid, "u": uid},
    )
    env.wh.execute(
        f"INSERT INTO {db}.users_snapshot SELECT %(id)s, %(u)s, 'A', 'B', %(o)s, %(s)s, 'cur',"
        " toDateTime('2024-02-01 00:00:00', 'UTC'), toDateTime('2024-02-01 00:00:00', 'UTC'),"
        " NULL",
        {"id": oid, "u": uid, "o": user["occupation"], "s": user["state"]},
    )
    assert adopt(env.wh, env.database, settings().entity("users")) == 2
    assert env.wh.table_exists(env.database, "users_snapshot__dbt")
    env.mongo().update_one({"_id": user["_id"]}, {"$set": {"occupation": "Senior Engineer"}})
    batch = new_batch_id()
    assert env.build([Snapshot(entity="users", batch=batch)]) == LuigiStatusCode.SUCCESS
    history = env.rows(
        "SELECT occupation, dbt_scd_id, dbt_valid_to IS NULL FROM {db}.users_snapshot"
        " WHERE user_id = %(u)s ORDER BY dbt_valid_from",
        {"u": uid},
    )
    assert [(h[0], h[2]) for h in history] == [
        ("Clerk", 0),
        (user["occupation"], 0),
        ("Senior Engineer", 1),
    ]
    assert [h[1] for h in history[:2]] == ["old", "cur"]
    others = env.rows(
        "SELECT count() FROM {db}.users_snapshot WHERE dbt_valid_to IS NULL AND user_id != %(u)s",
        {"u": uid},
    )
    assert others == [(79,)] and env.count("users_snapshot") == 82  # others start their history


def test_meta_column_names_and_valid_to_current(env: Env) -> None:
    _add_people(
        env,
        "state",
        snapshot_meta_column_names="dbt_valid_from: valid_from, dbt_valid_to: valid_to",
        dbt_valid_to_current="2100-01-01 00:00:00",
    )
    assert env.build([Snapshot(entity="people", batch=new_batch_id())]) == LuigiStatusCode.SUCCESS
    columns = list(env.wh.columns(env.database, "people_snapshot"))
    assert "valid_from" in columns and "valid_to" in columns and "dbt_valid_to" not in columns
    far = env.rows("SELECT DISTINCT toYear(valid_to) FROM {db}.people_snapshot")
    assert far == [(2100,)]


def test_delete_guard_refuses_then_force_passes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    _add_people(env, "state, occupation", hard_deletes="invalidate")
    assert env.build([Snapshot(entity="people", batch=new_batch_id())]) == LuigiStatusCode.SUCCESS
    ids = [d["_id"] for d in env.mongo().find({}, {"_id": 1}).limit(30)]
    env.mongo().delete_many({"_id": {"$in": ids}})
    _pause(env)
    batch = new_batch_id()
    assert env.build([Snapshot(entity="people", batch=batch)]) == LuigiStatusCode.FAILED
    assert "would retire 30 of 80 live keys" in caplog.text
    hint = f"--entity people --Snapshot-batch {batch} --force-deletes"
    assert hint in caplog.text and f"cdc-run --batch {batch}" in caplog.text
    assert env.count("people_snapshot", "WHERE dbt_valid_to IS NULL") == 80
    forced = Snapshot(entity="people", batch=batch, force_deletes=True)
    assert env.build([forced]) == LuigiStatusCode.SUCCESS
    assert env.count("people_snapshot", "WHERE dbt_valid_to IS NULL") == 50


def test_batches_apply_in_order(env: Env) -> None:
    older, newer = new_batch_id(), new_batch_id()
    assert env.build([Snapshot(entity="users", batch=newer)]) == LuigiStatusCode.SUCCESS
    from pipeline.graph import LoadRaw

    assert env.build([LoadRaw(entity="users", batch=older)]) == LuigiStatusCode.SUCCESS
    with pytest.raises(SnapshotError, match=f"batch {older} is older than the last applied"):
        apply_batch(runtime.warehouse(), env.database, settings().entity("users"), older)
    before = env.count("users_snapshot__versions")
    apply_batch(runtime.warehouse(), env.database, settings().entity("users"), newer)
    assert env.count("users_snapshot__versions") == before  # re-applying changes nothing


def test_reconciliation_retires_rows_deleted_in_postgres(env: Env) -> None:
    env.add_entity(
        "orders_rec",
        source="postgres",
        table="public.orders",
        unique_key="order_id",
        strategy="timestamp",
        updated_at="updated_at",
        reconcile="true",
        hard_deletes="invalidate",
    )
    assert env.build([Snapshot(entity="orders_rec", batch=new_batch_id())]) == (
        LuigiStatusCode.SUCCESS
    )
    with env.pg() as conn, conn.cursor() as cur:
        cur.execute(
            "DELETE FROM orders WHERE order_id IN (SELECT min(order_id) FROM orders)"
            " RETURNING order_id"
        )
        (gone,) = cur.fetchone()
    _pause(env)
    assert env.build([Snapshot(entity="orders_rec", batch=new_batch_id())]) == (
        LuigiStatusCode.SUCCESS
    )
    history = env.rows(
        "SELECT dbt_valid_to IS NULL FROM {db}.orders_rec_snapshot WHERE order_id = %(o)s",
        {"o": gone},
    )
    assert history == [(0,)]  # closed: the row is gone from the source
    assert env.count("orders_rec_snapshot", "WHERE dbt_valid_to IS NULL") == 119


def test_check_cols_change_rehashes_the_batch_even_after_a_crash_in_it(env: Env) -> None:
    """Hashes stored at load cover the old `check_cols`: the snapshot rehashes the batch first.

    A half-written copy with the new hashes (a crash inside the rehash) is dropped, and the
    batch ends with exactly one copy, all hashed for the new columns.
    """
    from luigi.configuration import get_config

    from pipeline.graph import LoadRaw
    from tests.support.load_hashes import hash_mismatches

    _add_people(env, "state, occupation")
    assert env.build([Snapshot(entity="people", batch=new_batch_id())]) == LuigiStatusCode.SUCCESS
    _pause(env)
    batch = new_batch_id()
    assert env.build([LoadRaw(entity="people", batch=batch)]) == LuigiStatusCode.SUCCESS
    get_config().set("entity.people", "check_cols", "state")
    runtime.reset()
    raw = f"`{env.database}`.raw_people"
    columns = list(env.wh.columns(env.database, "raw_people"))
    crashed = {"_check_cols": "'state'", "_check_hash": "toUInt64(1)"}
    select = ", ".join(crashed.get(c, f"`{c}`") for c in columns)
    env.wh.execute(  # what a rehash that crashed after three rows would have left
        f"INSERT INTO {raw} ({', '.join(f'`{c}`' for c in columns)}) SELECT {select}"
        f" FROM {raw} WHERE _batch_id = %(b)s LIMIT 3",
        {"b": batch},
    )
    assert env.build([Snapshot(entity="people", batch=batch)]) == LuigiStatusCode.SUCCESS
    copies = env.rows(
        f"SELECT _check_cols, count() FROM {raw} WHERE _batch_id = %(b)s GROUP BY _check_cols",
        {"b": batch},
    )
    assert copies == [("state", 80)]
    assert hash_mismatches(env.wh, env.database, settings().entity("people"), batch) == []
    # other columns checked, other hashes: every key opened one version (README, Limits)
    assert env.count("people_snapshot", "WHERE dbt_valid_to IS NULL") == 80
    assert env.count("people_snapshot") == 160

    first, second = list(env.mongo().find({}, {"_id": 1}).sort("_id", 1).limit(2))
    env.mongo().update_one({"_id": first["_id"]}, {"$set": {"occupation": "juggler"}})
    env.mongo().update_one({"_id": second["_id"]}, {"$set": {"state": "ZZ"}})
    _pause(env)
    assert env.build([Snapshot(entity="people", batch=new_batch_id())]) == LuigiStatusCode.SUCCESS
    versions = dict(
        env.rows("SELECT _id, count() FROM {db}.people_snapshot GROUP BY _id HAVING count() > 2")
    )
    assert versions == {str(second["_id"]): 3}  # occupation is no longer checked


def test_first_load_check_names_a_key_with_two_current_versions(env: Env) -> None:
    """A first load's invariants are one aggregate; a broken one still names the key."""
    assert env.build([Snapshot(entity="users", batch=new_batch_id())]) == LuigiStatusCode.SUCCESS
    entity = settings().entity("users")
    names = Names.of(env.database, entity)
    assert first_load_violations(env.wh, names, entity, 80) == []
    assert first_load_violations(env.wh, names, entity, 81) == [
        "users: a first load of 81 keys left 80 version(s) of 80 key(s), 80 current"
    ]
    columns = list(env.wh.columns(env.database, names.storage))
    later = {"dbt_valid_from": "addSeconds(dbt_valid_from, 1)"}
    select = ", ".join(later.get(c, f"`{c}`") for c in columns)
    key = env.rows("SELECT min(_id) FROM {db}.users_snapshot")[0][0]
    env.wh.execute(  # a second current version of one key, as a broken merge could leave
        f"INSERT INTO {names.q_storage} ({', '.join(f'`{c}`' for c in columns)})"
        f" SELECT {select} FROM {names.q_storage} WHERE _id = %(k)s",
        {"k": key},
    )
    assert first_load_violations(env.wh, names, entity, 80) == [
        f"users: key {key!r}: validity windows overlap",
        f"users: key {key!r}: more than one current version",
    ]
