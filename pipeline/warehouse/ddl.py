"""DDL both backends share: create, alter and drop tables, swap a table in atomically, delete
rows and wait for it, on one server or on a cluster (`pipeline.warehouse.cluster`).

The stages describe a table once (`TableSpec`) and call these; nothing above the warehouse
writes CREATE, ALTER, RENAME or DROP text for a table that lasts. ClickHouse has no
transactions; these are the few multi-step operations the stages build on, each written so
that a crash between its steps leaves something a rerun completes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import WarehouseError
from pipeline.warehouse import cluster as cl
from pipeline.warehouse.base import Warehouse
from pipeline.warehouse.sql import qualified

if TYPE_CHECKING:
    import pyarrow as pa

# bookkeeping tables this process has seen exist: (warehouse url, database, table)
_SEEN: set[tuple[str, str, str]] = set()

# database engines whose tables EXCHANGE TABLES can swap (Ordinary ones cannot)
EXCHANGE_ENGINES = ("Atomic", "Replicated")


@dataclass(frozen=True)
class TableSpec:
    """A MergeTree-family table as a stage describes it, whatever the deployment.

    `shard_by`: the unique key, when rows of one key must share a shard (FINAL, co-located
    anti-joins); `fresh`: the table will be swapped in under another name (see `cluster`).
    """

    columns: str
    engine: str = "MergeTree"
    order_by: str = "tuple()"
    partition_by: str | None = None
    ttl: str = ""
    shard_by: tuple[str, ...] = ()
    fresh: bool = False
    sharding: str | None = None  # an expression that places rows instead of `shard_by`

    @property
    def clauses(self) -> str:
        partition = f" PARTITION BY {self.partition_by}" if self.partition_by else ""
        return f"{partition} ORDER BY {self.order_by}{self.ttl}"


def database_engine(wh: Warehouse, database: str) -> str:
    return str(
        wh.scalar("SELECT engine FROM system.databases WHERE name = %(d)s", {"d": database}) or ""
    )


def create_table(wh: Warehouse, database: str, table: str, spec: TableSpec) -> None:
    """CREATE TABLE IF NOT EXISTS; on a cluster, the replicated local table on every node and
    the Distributed table over it (each only when this node lacks it: DDL is a round trip
    through ZooKeeper)."""
    c = wh.cluster
    if c is None:
        if wh.knows_table(database, table):
            return
        wh.execute(
            f"CREATE TABLE IF NOT EXISTS {qualified(database, table)} ({spec.columns})"
            f" ENGINE = {spec.engine}{spec.clauses}"
        )
        return
    local = cl.local_name(table)
    if not wh.table_exists(database, local):
        engine = c.replicated(spec.engine, database, local, spec.fresh)
        cl.ddl(
            wh,
            c,
            f"CREATE TABLE IF NOT EXISTS {qualified(database, local)}{c.on} ({spec.columns})"
            f" ENGINE = {engine}{spec.clauses}",
        )
    if not wh.table_exists(database, table):
        sharding = spec.sharding or cl.sharding_key(spec.shard_by)
        _create_distributed(wh, c, database, table, local, sharding)


def _create_distributed(
    wh: Warehouse, c: cl.Cluster, database: str, table: str, local: str, sharding: str
) -> None:
    """A Distributed `table` over `local` on every node, with `local`'s columns as they are."""
    cl.ddl(
        wh,
        c,
        f"CREATE TABLE IF NOT EXISTS {qualified(database, table)}{c.on}"
        f" AS {qualified(database, local)} ENGINE = {c.distributed(database, local, sharding)}",
    )


def is_sharded(wh: Warehouse, database: str, table: str) -> bool:
    """Whether `table` is a Distributed table over our replicated `<table>__local`."""
    return wh.cluster is not None and wh.table_exists(database, cl.local_name(table))


def _target(wh: Warehouse, database: str, table: str) -> str:
    """What an ALTER of `table` changes: on a cluster, the local table under a Distributed one."""
    return (
        cl.q_local(database, table)
        if is_sharded(wh, database, table)
        else qualified(database, table)
    )


def alter_table(wh: Warehouse, database: str, table: str, clauses: Sequence[str]) -> None:
    """ALTER TABLE with these clauses (ADD COLUMN, MODIFY COLUMN, ...); on a cluster the local
    table changes on every node, then the Distributed table takes its new columns."""
    c = wh.cluster
    if not clauses:
        return
    if c is None:
        wh.execute(f"ALTER TABLE {qualified(database, table)} {', '.join(clauses)}")
        return
    cl.ddl(wh, c, f"ALTER TABLE {_target(wh, database, table)}{c.on} {', '.join(clauses)}")
    if is_sharded(wh, database, table):
        refresh_distributed(wh, database, table)


def refresh_distributed(wh: Warehouse, database: str, table: str) -> None:
    """Give a Distributed table its local table's columns, by dropping and creating it again:
    18.16 cannot ALTER it ON CLUSTER when shards replicate internally, and a renamed
    Distributed table leaves its directory behind, which then blocks DROP DATABASE. Readers of
    `table` fail for the moment between the two statements (only when columns changed)."""
    c, local = wh.cluster, cl.local_name(table)
    if c is None or _same_columns(wh, database, table, local):
        return
    sharding = cl.sharding_of(cl.engine_full(wh, database, table))
    cl.ddl(wh, c, f"DROP TABLE IF EXISTS {qualified(database, table)}{c.on}")
    _create_distributed(wh, c, database, table, local, sharding)


def _same_columns(wh: Warehouse, database: str, a: str, b: str) -> bool:
    return list(wh.columns(database, a).items()) == list(wh.columns(database, b).items())


def drop_partition(wh: Warehouse, database: str, table: str, partition: int) -> None:
    c = wh.cluster
    if c is None:
        wh.execute(f"ALTER TABLE {qualified(database, table)} DROP PARTITION {int(partition)}")
        return
    target = cl.q_local(database, table) if is_sharded(wh, database, table) else None
    cl.ddl(
        wh,
        c,
        f"ALTER TABLE {target or qualified(database, table)}{c.on} DROP PARTITION {int(partition)}",
    )


def drop_table(wh: Warehouse, database: str, table: str) -> None:
    """DROP TABLE IF EXISTS (a view too); on a cluster, on every node, with its local table."""
    c = wh.cluster
    if c is None:
        wh.execute(f"DROP TABLE IF EXISTS {qualified(database, table)}")
        return
    # Atomic databases (21.1+) free a dropped table's ZooKeeper path minutes later unless SYNC
    sync = " SYNC" if wh.features.lightweight_exchange else ""
    for name in (table, cl.local_name(table)):
        if wh.table_exists(database, name):
            cl.ddl(wh, c, f"DROP TABLE IF EXISTS {qualified(database, name)}{c.on}{sync}")


def create_view(wh: Warehouse, database: str, view: str, select: str) -> None:
    on = wh.cluster.on if wh.cluster is not None else ""
    sql = f"CREATE VIEW IF NOT EXISTS {qualified(database, view)}{on} AS {select}"
    wh.execute(sql) if wh.cluster is None else cl.ddl(wh, wh.cluster, sql)


def rename_table(wh: Warehouse, database: str, old: str, new: str) -> None:
    """RENAME a table that is not ours to shard (a dbt table being adopted), on every node."""
    c = wh.cluster
    sql = f"RENAME TABLE {qualified(database, old)} TO {qualified(database, new)}"
    wh.execute(sql) if c is None else cl.ddl(wh, c, sql + c.on)


def swap_in(wh: Warehouse, database: str, fresh: str, live: str) -> None:
    """Put `fresh` live under the name `live` in one statement, then drop the previous table.

    `EXCHANGE TABLES` where the server and database have it, else one `RENAME TABLE` statement
    for both names: readers see the old table or the new one, never none.
    """
    if wh.cluster is not None:
        _swap_on_cluster(wh, wh.cluster, database, fresh, live)
        return
    q_live, q_fresh = qualified(database, live), qualified(database, fresh)
    if not wh.table_exists(database, live):
        wh.execute(f"RENAME TABLE {q_fresh} TO {q_live}")
        return
    if wh.features.lightweight_exchange and database_engine(wh, database) in EXCHANGE_ENGINES:
        wh.execute(f"EXCHANGE TABLES {q_fresh} AND {q_live}")
        wh.execute(f"DROP TABLE {q_fresh} SYNC")
        return
    old = qualified(database, f"{live}__old")
    wh.execute(f"DROP TABLE IF EXISTS {old}")
    wh.execute(f"RENAME TABLE {q_live} TO {old}, {q_fresh} TO {q_live}")
    wh.execute(f"DROP TABLE {old}")


def _swap_on_cluster(wh: Warehouse, c: cl.Cluster, database: str, fresh: str, live: str) -> None:
    """One RENAME ON CLUSTER (atomic on each node) puts the fresh local table under the live
    local name, where the live Distributed table already reads it; the old ones go after it.

    Distributed tables are never renamed (18.16 leaves a renamed one's directory behind): the
    live one is created once, and again only when the columns changed (`refresh_distributed`).
    A live table that is not ours to shard (a view, a table of one server) is renamed away.
    """
    old, live_local = f"{live}__old", cl.local_name(live)
    drop_table(wh, database, old)
    distributed = cl.engine_full(wh, database, live).startswith("Distributed")
    renames: list[tuple[str, str]] = []
    if wh.table_exists(database, live_local):
        renames.append((live_local, cl.local_name(old)))
    sharded = is_sharded(wh, database, fresh)
    if sharded:
        renames.append((cl.local_name(fresh), live_local))
    if distributed and not sharded:
        cl.ddl(wh, c, f"DROP TABLE IF EXISTS {qualified(database, live)}{c.on}")
    elif wh.table_exists(database, live) and not distributed:
        renames.append((live, old))
    if not sharded:
        renames.append((fresh, live))
    pairs = ", ".join(f"{qualified(database, a)} TO {qualified(database, b)}" for a, b in renames)
    cl.ddl(wh, c, f"RENAME TABLE {pairs}{c.on}")
    if sharded and distributed:
        refresh_distributed(wh, database, live)
    elif sharded:
        sharding = cl.sharding_of(cl.engine_full(wh, database, fresh))
        _create_distributed(wh, c, database, live, live_local, sharding)
    drop_table(wh, database, old)
    if sharded:
        drop_table(wh, database, fresh)


def delete_where(
    wh: Warehouse, database: str, table: str, where: str, params: Mapping[str, Any]
) -> int:
    """Delete the rows `where` selects (a mutation, waited for); returns how many there were.

    On a cluster the mutation runs on every shard's local table, and it is finished when no
    node, replicas included, still has such a row or an unfinished mutation of the table.
    """
    if not wh.table_exists(database, table):
        return 0
    q_table = qualified(database, table)
    left = wh.scalar(f"SELECT count() FROM {q_table} WHERE {where}", params)
    if not left:
        return 0
    c = wh.cluster
    if c is None:
        wh.execute(f"ALTER TABLE {q_table} DELETE WHERE {where}", params)
        wh.wait_mutations(database, table)
    elif is_sharded(wh, database, table):
        cl.ddl(
            wh, c, f"ALTER TABLE {cl.q_local(database, table)}{c.on} DELETE WHERE {where}", params
        )
        cl.wait_done(wh, c, database, cl.local_name(table), where, params)
    else:
        cl.ddl(wh, c, f"ALTER TABLE {q_table}{c.on} DELETE WHERE {where}", params)
        cl.wait_done(wh, c, database, table, where, params)
    return int(left)


def exists_seen(wh: Warehouse, database: str, table: str) -> bool:
    """Whether a table we never drop exists, asking the server until it has once said yes.

    For the bookkeeping tables every task reads and writes a row of: a caller whose statement
    then fails on a missing table (dropped since, by hand or by a test) asks `vanished`.
    """
    key = (wh.url, database, table)
    if key not in _SEEN:
        if not wh.table_exists(database, table):
            return False
        _SEEN.add(key)
    return True


def vanished(wh: Warehouse, database: str, table: str) -> bool:
    """After a statement on a seen table failed: whether the table is gone (and so forgotten)."""
    if wh.table_exists(database, table):
        return False
    _SEEN.discard((wh.url, database, table))
    return True


def insert_ensured(
    wh: Warehouse, database: str, table: str, data: pa.Table, ensure: Callable[[], None]
) -> None:
    """Insert a bookkeeping row, creating the table (`ensure`) only when it is missing: one
    statement instead of three once the table has been seen, and a dropped table comes back."""
    if (wh.url, database, table) in _SEEN:
        try:
            wh.insert_arrow(database, table, data)
            return
        except WarehouseError:
            if not vanished(wh, database, table):
                raise
    ensure()
    wh.insert_arrow(database, table, data)
    _SEEN.add((wh.url, database, table))
