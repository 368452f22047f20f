"""A ClickHouse cluster (`[cdc] cluster`): what the DDL becomes, and how to know every node has it.

Every MergeTree-family table is its Replicated twin on every node, `<name>__local`, with the
ZooKeeper path `<replicated_path_prefix>/<database>/<name>__local` and replica `{replica}`, under
a `Distributed` table that keeps the name readers use today. Tables with a unique key (raw
tables, key lists, snapshot storage) are sharded by the same hash of the key's text, so every
version of a key lives on one shard: FINAL through the Distributed table stays exact, and the
pipeline's own anti-joins between them run on each shard over its local tables
(`distributed_product_mode = 'local'`). Tables without one (bookkeeping, marts) are spread by
`rand()` and read whole through the Distributed table.

What ClickHouse 18.16 needs, and why each rule is here:

* paths hold the database and table names as text, never the `{database}`/`{table}` macros:
  18.16 re-expands those with the current name at every start, so a renamed table is lost;
* a table that will be swapped in under another name gets a path of its own (`fresh`): RENAME
  keeps the path, and the next build's table of the same name would collide with it;
* ALTER of a Distributed table ON CLUSTER fails when shards have `internal_replication`; its
  columns change by swapping in a new Distributed table (`refresh_distributed`);
* an ON CLUSTER statement waits `distributed_ddl_task_timeout` for a down node (180 s by
  default; clickhouse-driver garbles it as a query setting, so it is a `SET`), so DDL first
  checks that every node answers and fails at once, naming the cluster, when one does not;
* mutations are asynchronous on every replica: a delete is finished when no node has a
  matching row and no node has an unfinished mutation of the table.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ConfigError, WarehouseError
from pipeline.warehouse.sql import literal, qualified, quote_ident

if TYPE_CHECKING:
    from pipeline.warehouse.base import Warehouse

LOCAL_SUFFIX = "__local"
# settings of every query of a cluster connection (see the module docstring and `Cluster`)
SESSION_SETTINGS: dict[str, Any] = {
    "insert_distributed_sync": 1,
    "distributed_product_mode": "local",
    "load_balancing": "in_order",
}
# SQL a user wrote (marts, their tests) may join tables that are not sharded alike
USER_SQL_SETTINGS: dict[str, Any] = {"distributed_product_mode": "global"}
_ENGINE = re.compile(r"^\s*([A-Za-z]\w*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_MACRO = re.compile(r"\{(\w+)\}")
# the node a refused connection names: "Connection refused (127.0.0.1:9000)"
_ADDRESS = re.compile(r"\((\[?[\w.:\-]+\]?:\d+)\)")
POLL_S = 0.05


@dataclass(frozen=True)
class Cluster:
    """The cluster a deployment writes to, and how its statements are rendered.

    Every query of its connection runs with `SESSION_SETTINGS`: a Distributed INSERT returns
    once each shard has its rows (18.16 otherwise queues them), co-located anti-joins stay on
    their shard, and every process picks the same replica of a remote shard, so what one task
    wrote the next one reads (the local shard's replica is the node itself).
    """

    name: str
    path_prefix: str
    ddl_timeout: int
    user: str = field(default="default", repr=False)
    password: str = field(default="", repr=False)

    @property
    def on(self) -> str:
        return f" ON CLUSTER {quote_ident(self.name)}"

    def zk_path(self, database: str, table: str, fresh: bool = False) -> str:
        """`<prefix>/<database>/<table>`; a `fresh` table's path is its own (see the module)."""
        suffix = f"__{uuid.uuid4().hex[:12]}" if fresh else ""
        return f"{self.path_prefix.rstrip('/')}/{database}/{table}{suffix}"

    def replicated(self, engine: str, database: str, table: str, fresh: bool = False) -> str:
        """The Replicated twin of a MergeTree-family engine, e.g. `ReplacingMergeTree(_version)`
        -> `ReplicatedReplacingMergeTree('<path>', '{replica}', _version)`."""
        match = _ENGINE.match(engine)
        if match is None or not match.group(1).endswith("MergeTree"):
            raise WarehouseError(f"engine {engine!r} is not of the MergeTree family")
        name, args = match.group(1), (match.group(2) or "").strip()
        if name.startswith("Replicated"):
            plain = name.removeprefix("Replicated")
            raise WarehouseError(
                f"engine {engine}: with [cdc] cluster set, write the plain engine ({plain});"
                " the pipeline makes it replicated, with a ZooKeeper path of its own"
            )
        path = literal(self.zk_path(database, table, fresh))
        return f"Replicated{name}({', '.join([path, literal('{replica}'), *filter(None, [args])])})"

    def distributed(self, database: str, local: str, sharding: str) -> str:
        return (
            f"Distributed({literal(self.name)}, {literal(database)}, {literal(local)}, {sharding})"
        )


def local_name(table: str) -> str:
    """The node-local replicated table under the Distributed table `table`."""
    return f"{table}{LOCAL_SUFFIX}"


def sharding_key(keys: Sequence[str]) -> str:
    """Where a row lives: a hash of its unique key's text (the same in every table, whatever
    the key's type or nullability there), or anywhere (`rand()`) for tables without a key."""
    if not keys:
        return "rand()"
    return (
        "cityHash64(" + ", ".join(f"toString(assumeNotNull({quote_ident(k)}))" for k in keys) + ")"
    )


def check(wh: Warehouse, cluster: Cluster, where: str) -> None:
    """Refuse a cluster the server does not know, a node outside it, or a path macro it lacks,
    before anything is created under wrong names."""
    rows = wh.query_rows(
        "SELECT host_name, port, is_local FROM system.clusters WHERE cluster = %(c)s",
        {"c": cluster.name},
    )
    if not rows:
        known = [r[0] for r in wh.query_rows("SELECT DISTINCT cluster FROM system.clusters")]
        raise ConfigError(
            f"CDC_CLUSTER = {cluster.name}: the server at {where} has no such cluster in its"
            f" remote_servers (it has: {', '.join(known) or 'none'})"
        )
    if not any(is_local for _, _, is_local in rows):
        nodes = ", ".join(f"{host}:{port}" for host, port, _ in rows)
        raise ConfigError(
            f"CDC_CLUSTER = {cluster.name}: CDC_WAREHOUSE_URL ({where}) is not a node of it"
            f" ({nodes}); point it at one of them"
        )
    defined = {str(r[0]) for r in wh.query_rows("SELECT macro FROM system.macros")}
    missing = sorted({*_MACRO.findall(cluster.path_prefix), "replica"} - defined)
    if missing:
        lacking = ", ".join("{" + m + "}" for m in missing)
        raise ConfigError(
            f"[cdc] replicated_path_prefix = {cluster.path_prefix}: the node at {where} defines"
            f" no macro {lacking} (it has: {', '.join(sorted(defined)) or 'none'}); add it to"
            " <macros> on every node, or use a prefix with the macros they have"
        )


def _nodes(wh: Warehouse, cluster: Cluster) -> str:
    """Every replica of every shard, as the address list of `remote()` (one shard each)."""
    rows = wh.query_rows(
        "SELECT host_name, port FROM system.clusters WHERE cluster = %(c)s"
        " ORDER BY shard_num, replica_num",
        {"c": cluster.name},
    )
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in rows)


def on_every_node(wh: Warehouse, cluster: Cluster, database: str, table: str) -> tuple[str, dict]:
    """A table function reading `database.table` on every node (all replicas, not one), and
    its parameters. `clusterAllReplicas` (20.5+) connects as `remote_servers` says; 18.16 has
    only `remote()`, which takes the pipeline's own user and password in the query text (so
    they show in the nodes' query_log there: give the pipeline a user of its own)."""
    if wh.features.version >= (20, 5):
        names = ", ".join(literal(n) for n in (cluster.name, database, table))
        return f"clusterAllReplicas({names})", {}
    params = {"_nodes": _nodes(wh, cluster), "_user": cluster.user, "_password": cluster.password}
    names = f"{literal(database)}, {literal(table)}"
    return f"remote(%(_nodes)s, {names}, %(_user)s, %(_password)s)", params


def require_nodes(wh: Warehouse, cluster: Cluster) -> None:
    """Fail now, naming the cluster and the node, rather than after the DDL timeout."""
    source, params = on_every_node(wh, cluster, "system", "one")
    try:
        wh.scalar(f"SELECT count() FROM {source}", params)
    except WarehouseError as exc:
        down = sorted(set(_ADDRESS.findall(str(exc)))) or ["?"]
        raise WarehouseError(
            f"cluster {cluster.name}: node {', '.join(down)} does not answer; DDL ON CLUSTER"
            " needs every node of the cluster up: start it and run again",
            retriable=True,
        ) from exc


def ddl(wh: Warehouse, cluster: Cluster, sql: str, params: Mapping[str, Any] | None = None) -> None:
    """Run an ON CLUSTER statement: every node must answer, and within `ddl_timeout`."""
    require_nodes(wh, cluster)
    wh.execute(f"SET distributed_ddl_task_timeout = {int(cluster.ddl_timeout)}")
    wh.query_rows(sql, params)


def wait_done(
    wh: Warehouse,
    cluster: Cluster,
    database: str,
    table: str,
    where: str | None = None,
    params: Mapping[str, Any] | None = None,
    timeout: float = 300.0,
) -> None:
    """Until no node has an unfinished mutation of `table` (nor a row `where` selects)."""
    mutations, node_params = on_every_node(wh, cluster, "system", "mutations")
    node_params = {**(params or {}), **node_params}
    pending = [
        f"SELECT count() FROM {mutations}"
        f" WHERE database = {literal(database)} AND table = {literal(table)} AND is_done = 0"
    ]
    if where is not None:
        rows, _ = on_every_node(wh, cluster, database, table)
        pending.append(f"SELECT count() FROM {rows} WHERE {where}")
    deadline = time.monotonic() + timeout
    while any(int(wh.scalar(sql, node_params) or 0) for sql in pending):
        if time.monotonic() > deadline:
            raise WarehouseError(
                f"mutations on {database}.{table} still running on a node of cluster"
                f" {cluster.name} after {timeout:.0f} s (see system.mutations on each node)"
            )
        time.sleep(POLL_S)


def user_sql(wh: Warehouse) -> AbstractContextManager[None]:
    """Settings for SQL a user wrote: IN/JOIN over two Distributed tables read them whole."""
    if wh.cluster is None:
        return nullcontext()
    return wh.settings_scope(**USER_SQL_SETTINGS)


def no_deduplication(wh: Warehouse) -> AbstractContextManager[None]:
    """For an INSERT that repeats rows deleted before (a rehash after a crash): replicated
    tables drop a block equal to one of the last 100 they took, even if its rows are gone."""
    if wh.cluster is None:
        return nullcontext()
    return wh.settings_scope(insert_deduplicate=0)


def scratch_in(wh: Warehouse) -> str:
    """`IN` for a subquery over a node-local scratch table: GLOBAL on a cluster, so that the
    shards get its rows from this node instead of reading their own (absent) copy."""
    return "GLOBAL IN" if wh.cluster is not None else "IN"


def engine_full(wh: Warehouse, database: str, table: str) -> str:
    return str(
        wh.scalar(
            "SELECT engine_full FROM system.tables WHERE database = %(d)s AND name = %(t)s",
            {"d": database, "t": table},
        )
        or ""
    )


def sharding_of(engine: str) -> str:
    """The sharding expression of a `Distributed(cluster, db, table, expression)` engine."""
    match = re.match(r"^Distributed\((.*)\)$", engine.strip(), re.DOTALL)
    parts = _top_level_args(match.group(1)) if match else []
    if len(parts) < 4:
        raise WarehouseError(f"not a sharded Distributed engine: {engine}")
    return parts[3]


def _top_level_args(text: str) -> list[str]:
    """Split `'c', 'db', 't', cityHash64(f(a), b)` at its top-level commas (ClickHouse writes
    the names as plain quoted strings; the expression may nest calls)."""
    parts, depth, quoted, current = [], 0, False, ""
    for char in text:
        quoted = not quoted if char == "'" else quoted
        depth += (char == "(") - (char == ")") if not quoted else 0
        if char == "," and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def q_local(database: str, table: str) -> str:
    return qualified(database, local_name(table))
