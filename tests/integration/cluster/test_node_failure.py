"""A node stopped in the middle of a run and started again: the run fails or completes, a rerun
of the batch converges, the replicas agree, and the history equals the one a server builds."""

from __future__ import annotations

import threading
import time

from luigi.execution_summary import LuigiStatusCode

from pipeline.core.batch import new_batch_id
from setup import stack
from setup.simulate_cdc import simulate
from tests.conftest import Env
from tests.integration.cluster.conftest import Deployments, Node
from tests.integration.cluster.test_pipeline import read_all, run_both

USERS, PRODUCTS, ORDERS = 1500, 30, 1500
WAIT_S = 120.0


def bounce_when_loaded(cluster: stack.LocalCluster, node1: Node, database: str, batch: str) -> None:
    """Once the batch's users are in raw (the run is under way), stop node2, start it again."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            loaded = node1.rows(
                f"SELECT count() FROM `{database}`._cdc_batches"
                " WHERE entity = 'users' AND stage = 'raw' AND batch_id = %(b)s",
                {"b": batch},
            )[0][0]
        except Exception:  # the table may not exist yet
            loaded = 0
        if loaded:
            break
        time.sleep(0.05)
    stack.stop_node(cluster, "node2")
    time.sleep(1.0)
    stack.start_node(cluster, "node2")


def test_a_node_stopped_mid_run_then_a_rerun_converges(
    on_cluster: Env,
    on_server: Env,
    deployments: Deployments,
    local_cluster: stack.LocalCluster,
    node1: Node,
    node2: Node,
) -> None:
    on_cluster.generate(users=USERS, products=PRODUCTS, orders=ORDERS)
    v, db = on_cluster.values, on_cluster.database
    run_both(deployments, (on_cluster, on_server), new_batch_id())
    simulate(v["CDC_MONGO_URI"], v["CDC_MONGO_DB"], v["CDC_POSTGRES_DSN"], changes=300, seed=9)
    batch = new_batch_id()

    with deployments.use(on_cluster) as env:
        bouncer = threading.Thread(
            target=bounce_when_loaded, args=(local_cluster, node1, db, batch)
        )
        bouncer.start()
        try:
            _, first = env.run(batch)
        finally:
            bouncer.join()
        assert first in (
            LuigiStatusCode.SUCCESS,
            LuigiStatusCode.FAILED,
            LuigiStatusCode.SCHEDULING_FAILED,
        )
        _, rerun = env.run(batch)
    assert rerun == LuigiStatusCode.SUCCESS
    run_both(deployments, (on_server,), batch)

    for node in (node1, node2):
        node.sync(db)
    replicated = [
        r[0]
        for r in node1.rows("SELECT table FROM system.replicas WHERE database = %(d)s", {"d": db})
    ]
    assert "raw_users__local" in replicated and "users_snapshot__versions__local" in replicated
    if v["CDC_CLUSTER"] == "cdc_replicated":  # one shard: both nodes hold all of it
        for table in replicated:
            assert node1.digest(db, table) == node2.digest(db, table), table
    with deployments.use(on_server) as server:
        expected = read_all(server.rows, server.database)
    assert read_all(node1.rows, db) == expected
    assert read_all(node2.rows, db) == expected
