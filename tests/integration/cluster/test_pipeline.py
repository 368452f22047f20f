"""The whole graph on a cluster, in both shapes, against the same rounds on one server."""

from __future__ import annotations

from typing import Any

from luigi.execution_summary import LuigiStatusCode

from pipeline import runtime
from pipeline.core.batch import new_batch_id
from pipeline.snapshot.maintenance import rebuild
from setup.simulate_cdc import simulate
from tests.conftest import Env
from tests.integration.cluster.conftest import Deployments, Node

USERS, PRODUCTS, ORDERS = 300, 20, 300
# what readers query, with a sort order that makes two listings comparable row by row
READ = {
    "users_snapshot": "_id, dbt_valid_from",
    "orders_snapshot": "order_id, dbt_valid_from",
    "products_snapshot": "product_id, dbt_valid_from",
    "dim_users": "user_id",
    "fct_orders": "order_id",
    "mart_daily_revenue_by_state": "order_date, ifNull(state, '')",
}
SEED_USER = "USER00000001"


def listing(rows: list[tuple[Any, ...]]) -> list[tuple[str, ...]]:
    """Rows as text (the driver and chDB return some types differently)."""
    return [tuple(str(v) for v in row) for row in rows]


def read_all(query: Any, database: str) -> dict[str, list[tuple[str, ...]]]:
    return {
        table: listing(query(f"SELECT * FROM `{database}`.`{table}` ORDER BY {order}"))
        for table, order in READ.items()
    }


def run_both(deployments: Deployments, envs: tuple[Env, ...], batch: str) -> None:
    for env in envs:
        with deployments.use(env):
            _, status = env.run(batch)
        assert status == LuigiStatusCode.SUCCESS, env.values.get("CDC_CLUSTER", "server")


def test_rounds_on_a_cluster_equal_one_server_and_every_node_answers_alike(
    on_cluster: Env, on_server: Env, deployments: Deployments, node1: Node, node2: Node
) -> None:
    on_cluster.generate(users=USERS, products=PRODUCTS, orders=ORDERS)
    v, first = on_cluster.values, new_batch_id()
    run_both(deployments, (on_cluster, on_server), first)
    # the seed's CDC check, then a mix of inserts, updates and deletes in both sources
    on_cluster.mongo().update_one({"user_id": SEED_USER}, {"$set": {"occupation": "Sommelier"}})
    run_both(deployments, (on_cluster, on_server), new_batch_id())
    simulate(v["CDC_MONGO_URI"], v["CDC_MONGO_DB"], v["CDC_POSTGRES_DSN"], changes=60, seed=5)
    run_both(deployments, (on_cluster, on_server), new_batch_id())

    with deployments.use(on_server) as server:
        expected = read_all(server.rows, server.database)
    assert all(expected.values()) and len(expected["users_snapshot"]) > USERS
    assert read_all(node1.rows, on_cluster.database) == expected
    assert read_all(node2.rows, on_cluster.database) == expected
    seed = node2.rows(
        f"SELECT occupation, isNull(dbt_valid_to) FROM `{on_cluster.database}`.users_snapshot"
        " WHERE user_id = %(u)s ORDER BY dbt_valid_from",
        {"u": SEED_USER},
    )
    assert len(seed) == 2 and seed[0][1] == 0 and seed[1] == ("Sommelier", 1)
    check_layout(on_cluster, first, node1, node2)


def check_layout(env: Env, first_batch: str, node1: Node, node2: Node) -> None:
    """What the pipeline created: the same tables on every node, replicated and sharded."""
    shape, db = env.values["CDC_CLUSTER"], env.database
    tables = node1.tables(db)
    assert node2.tables(db) == tables
    for name in ("raw_users", "users_snapshot__versions", "_cdc_batches", "_cdc_runs", "dim_users"):
        assert tables[name] == "Distributed"
    assert tables["users_snapshot"] == "View"
    assert tables["raw_users__local"] == "ReplicatedMergeTree"
    assert tables["users_snapshot__versions__local"] == "ReplicatedReplacingMergeTree"
    assert all(tables[t].startswith("Replicated") for t in tables if t.endswith("__local")), tables
    engine = node1.rows(
        "SELECT engine_full FROM system.tables WHERE database = %(d)s AND name = 'raw_users'",
        {"d": db},
    )[0][0]
    assert "cityHash64(toString(assumeNotNull(_id)))" in engine
    replicas = dict(
        node2.rows(
            "SELECT table, zookeeper_path FROM system.replicas WHERE database = %(d)s", {"d": db}
        )
    )
    shard = "01" if shape == "cdc_replicated" else "02"
    assert (
        replicas["raw_users__local"] == f"/clickhouse/tables/{shape}-{shard}/{db}/raw_users__local"
    )
    # marts are swapped in with a path of their own per build (RENAME keeps the path)
    assert replicas["dim_users__local"].startswith(
        f"/clickhouse/tables/{shape}-{shard}/{db}/dim_users__new__local__"
    )
    first = [
        node.rows(
            f"SELECT count() FROM `{db}`.raw_users__local WHERE _batch_id = %(b)s",
            {"b": first_batch},
        )[0][0]
        for node in (node1, node2)
    ]
    if shape == "cdc_replicated":
        assert first == [USERS, USERS]  # each replica holds the shard
    else:
        assert sum(first) == USERS and all(first)  # the two shards split the keys


def test_drift_reaches_every_shard_and_a_rebuild_swaps_in_the_same_history(
    on_cluster: Env, deployments: Deployments, node1: Node, node2: Node
) -> None:
    on_cluster.generate(users=40, products=5, orders=40)
    with deployments.use(on_cluster) as env:
        _, status = env.run()
        assert status == LuigiStatusCode.SUCCESS
        users = env.mongo()
        ids = [d["_id"] for d in users.find({}, {"_id": 1}).sort("_id", 1)]
        for number, _id in enumerate(ids[::2]):
            users.update_one(
                {"_id": _id}, {"$set": {"loyalty": number, "occupation": "Drift tester"}}
            )
        _, status = env.run()
        assert status == LuigiStatusCode.SUCCESS
    db = on_cluster.database
    for node in (node1, node2):
        for table in (
            "raw_users",
            "raw_users__local",
            "users_snapshot__versions",
            "users_snapshot__versions__local",
            "users_snapshot",
        ):
            columns = dict(
                node.rows(
                    "SELECT name, type FROM system.columns"
                    " WHERE database = %(d)s AND table = %(t)s",
                    {"d": db, "t": table},
                )
            )
            assert columns.get("loyalty") == "Nullable(Int64)", (node.name, table)
        current = node.rows(
            f"SELECT count(), sum(loyalty) FROM `{db}`.users_snapshot"
            " WHERE dbt_valid_to IS NULL AND isNotNull(loyalty)"
        )[0]
        assert current == (len(ids[::2]), sum(range(len(ids[::2]))))

    # named columns: a rebuilt storage orders them as raw does (`loyalty` is no longer last)
    columns = "_id, user_id, occupation, state, loyalty, dbt_scd_id, dbt_valid_from, dbt_valid_to"
    history = f"SELECT {columns} FROM `{db}`.users_snapshot ORDER BY _id, dbt_valid_from"
    before = listing(node2.rows(history))
    with deployments.use(on_cluster) as env:
        replayed = rebuild(env.wh, db, runtime.settings().entity("users"))
    assert replayed == 2
    assert listing(node1.rows(history)) == listing(node2.rows(history)) == before
    paths = node1.rows(
        "SELECT zookeeper_path FROM system.replicas"
        " WHERE database = %(d)s AND table = 'users_snapshot__versions__local'",
        {"d": db},
    )
    assert "users_snapshot__versions__rebuild__local__" in paths[0][0]  # swapped in by rename
