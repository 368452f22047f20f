"""One local cluster for the session (ZooKeeper + node1 + node2, both shapes), started only when
a test of this directory asks for it, and deployments on it that tests can switch between.

Every deployment connects to node1 (the pipeline's rule: its processes use one node); tests
read node2 directly to prove that any node answers the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from setup import stack
from tests.conftest import Env

SHAPES = ("cdc_replicated", "cdc_sharded")
# a DDL that waits for a stopped node gives up after this (the product default is 300 s)
DDL_TIMEOUT = "15"


@pytest.fixture(scope="session")
def local_cluster(stack_root: Path) -> Iterator[stack.LocalCluster]:
    cluster = stack.start_cluster(stack_root / "cluster")
    yield cluster
    stack.stop_cluster(cluster, timeout=5)


class Node:
    """Queries on one node, over a connection of its own (nodes get restarted)."""

    def __init__(self, cluster: stack.LocalCluster, name: str) -> None:
        self.cluster, self.name = cluster, name

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        from clickhouse_driver import Client

        client = Client(stack.HOST, port=self.cluster.node(self.name).tcp_port)
        try:
            return list(client.execute(sql, params))
        finally:
            client.disconnect()

    def tables(self, database: str) -> dict[str, str]:
        """Table name -> engine."""
        rows = self.rows(
            "SELECT name, engine FROM system.tables WHERE database = %(d)s", {"d": database}
        )
        return dict(rows)

    def digest(self, database: str, table: str) -> tuple[int, int]:
        """(rows, sum of a hash of each row's text): equal digests, equal contents."""
        columns = [
            r[0]
            for r in self.rows(
                "SELECT name FROM system.columns WHERE database = %(d)s AND table = %(t)s",
                {"d": database, "t": table},
            )
        ]
        text = ", '|', ".join(f"ifNull(toString(`{c}`), '\\\\N')" for c in columns)
        count, total = self.rows(
            f"SELECT count(), sum(cityHash64(concat({text}, ''))) FROM `{database}`.`{table}`"
        )[0]
        return int(count), int(total or 0)

    def sync(self, database: str) -> None:
        """Fetch everything this node's replicas are behind on."""
        for (table,) in self.rows(
            "SELECT table FROM system.replicas WHERE database = %(d)s", {"d": database}
        ):
            self.rows(f"SYSTEM SYNC REPLICA `{database}`.`{table}`")


class Deployments:
    """Several deployments over the same sources; `use` points the pipeline at one of them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    @contextmanager
    def use(self, env: Env) -> Iterator[Env]:
        from pipeline import runtime

        with self.monkeypatch.context() as patch:
            for key in ("CDC_CLUSTER", "CDC_REPLICATED_PATH_PREFIX"):
                patch.delenv(key, raising=False)
            for key, value in env.values.items():
                patch.setenv(key, value)
            runtime.reset()
            try:
                yield env
            finally:
                runtime.reset()


@pytest.fixture
def sources(
    stack_env: dict[str, str], pg_dsn_factory: Callable[[], str], mongo_db_name: str
) -> dict[str, str]:
    """Source databases of this test's own, with a staging prefix per deployment added later."""
    return {
        **stack_env,
        "CDC_MONGO_DB": mongo_db_name,
        "CDC_POSTGRES_DSN": pg_dsn_factory(),
        "CDC_DDL_TIMEOUT_SECONDS": DDL_TIMEOUT,
    }


def deployment(sources: dict[str, str], **values: str) -> Env:
    """A deployment of `sources` with its own warehouse database and staging prefix."""
    tag = uuid.uuid4().hex[:10]
    return Env(
        {
            **sources,
            "CDC_DATABASE": f"t_{tag}",
            "CDC_STAGING_URL": f"s3://cdc-staging/{tag}/",
            **values,
        }
    )


@pytest.fixture
def deployments(monkeypatch: pytest.MonkeyPatch) -> Deployments:
    return Deployments(monkeypatch)


@pytest.fixture(params=SHAPES)
def on_cluster(
    request: pytest.FixtureRequest,
    local_cluster: stack.LocalCluster,
    sources: dict[str, str],
    deployments: Deployments,
) -> Iterator[Env]:
    """A deployment on the local cluster, in each shape; its database is dropped afterwards."""
    env = deployment(sources, **local_cluster.env(request.param))
    yield env
    drop(deployments, env)


@pytest.fixture
def on_server(
    clickhouse: stack.Service, sources: dict[str, str], deployments: Deployments
) -> Iterator[Env]:
    """The same sources on the session's single ClickHouse server."""
    env = deployment(sources, **clickhouse.env)
    yield env
    drop(deployments, env)


def drop(deployments: Deployments, env: Env) -> None:
    from pipeline import runtime

    on = f" ON CLUSTER {env.values['CDC_CLUSTER']}" if "CDC_CLUSTER" in env.values else ""
    with deployments.use(env):
        runtime.warehouse().execute(f"DROP DATABASE IF EXISTS `{env.database}`{on}")


@pytest.fixture
def node1(local_cluster: stack.LocalCluster) -> Node:
    return Node(local_cluster, "node1")


@pytest.fixture
def node2(local_cluster: stack.LocalCluster) -> Node:
    return Node(local_cluster, "node2")
