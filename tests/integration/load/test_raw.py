"""Load raw against the real servers: schema drift, retention of staging and raw, and a crash
in the middle of a load (exactly one copy of the batch after the rerun)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import runtime
from pipeline.core.batch import new_batch_id
from pipeline.graph import LoadRaw
from tests.conftest import Env

USERS, PRODUCTS, ORDERS = 60, 8, 150


def _load(env: Env, entity: str) -> str:
    batch = new_batch_id()
    assert env.build([LoadRaw(entity=entity, batch=batch)]) == LuigiStatusCode.SUCCESS
    return batch


@pytest.fixture
def env(pipeline_env: Env) -> Env:
    """A pipeline deployment with the demo data, small."""
    pipeline_env.generate(users=USERS, products=PRODUCTS, orders=ORDERS, seed=7)
    return pipeline_env


def test_drift_adds_columns_widens_types_and_loses_nothing(pipeline_env: Env) -> None:
    env = pipeline_env
    coll = env.mongo("drift")
    coll.insert_many([{"_id": 1, "n": 1, "s": "a"}, {"_id": 2, "n": 2, "s": "b"}])
    env.add_entity("drift", source="mongo", collection="drift", unique_key="_id")
    _load(env, "drift")
    coll.insert_many(
        [{"_id": 3, "n": 2.5, "s": 3, "new": "x"}, {"_id": 4, "n": "many", "s": {"k": 1}}]
    )
    batch = _load(env, "drift")
    rows = env.rows(
        "SELECT _id, n, s, new FROM {db}.raw_drift WHERE _batch_id = %(b)s ORDER BY _id",
        {"b": batch},
    )
    assert rows == [
        (1, "1", "a", None),
        (2, "2", "b", None),
        (3, "2.5", "3", "x"),
        (4, "many", '{"k":1}', None),
    ]


def test_retention_prunes_staging_and_bounds_raw_growth(pipeline_env: Env) -> None:
    from datetime import timedelta

    import pyarrow as pa

    from pipeline.staging import staged_batches

    env = pipeline_env
    env.mongo("events").insert_many([{"_id": i, "v": i} for i in range(5)])
    env.add_entity(
        "events", source="mongo", collection="events", unique_key="_id", raw_retention_days="30"
    )
    first = _load(env, "events")
    old_batch = "20200101T000000Z"
    runtime.store().put(f"mongo/events/batch={old_batch}/part-00000.parquet", b"old")
    runtime.store().put(f"mongo/events/batch={old_batch}/_manifest.json", b"{}")
    stale = env.wh.query_arrow(f"SELECT * FROM `{env.database}`.raw_events LIMIT 1")
    long_ago = datetime.now(UTC) - timedelta(days=400)
    for name, value in (
        ("_batch_id", pa.array([old_batch])),
        ("_loaded_at", pa.array([long_ago], pa.timestamp("us", "UTC"))),
    ):
        stale = stale.set_column(stale.column_names.index(name), name, value)
    env.wh.insert_arrow(env.database, "raw_events", stale)
    second = _load(env, "events")
    assert set(staged_batches(runtime.store(), "mongo", "events")) == {first, second}
    if env.wh.features.ttl:
        ddl = env.rows(
            "SELECT create_table_query FROM system.tables WHERE database = %(d)s"
            " AND name = 'raw_events'",
            {"d": env.database},
        )
        assert "TTL toDateTime(_loaded_at) + toIntervalSecond(2592000)" in ddl[0][0]
    else:
        batches = env.rows("SELECT DISTINCT _batch_id FROM {db}.raw_events ORDER BY _batch_id")
        assert batches == [(first,), (second,)]  # the 400-day-old month was dropped


def test_crash_in_the_middle_of_a_load_leaves_one_copy(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from luigi.configuration import get_config

    config = get_config()
    saved = {key: config.get("cdc", key) for key in ("part_rows", "batch_rows")}
    config.set("cdc", "part_rows", "20")
    config.set("cdc", "batch_rows", "20")
    runtime.reset()
    try:
        monkeypatch.setenv("CDC_FAILPOINT", "raw-after-part")
        batch, status = env.run()
        assert status != LuigiStatusCode.SUCCESS
        assert env.count("raw_users", f"WHERE _batch_id = '{batch}'") == 20  # one part landed
        monkeypatch.delenv("CDC_FAILPOINT")
        _, status = env.run(batch)
        assert status == LuigiStatusCode.SUCCESS
        copies = env.rows(
            "SELECT count(), uniqExact(_id) FROM {db}.raw_users WHERE _batch_id = %(b)s",
            {"b": batch},
        )
        assert copies == [(USERS, USERS)]
    finally:
        for key, value in saved.items():
            config.set("cdc", key, value)
        runtime.reset()
