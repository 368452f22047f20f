"""DDL both backends share: swap a table in atomically, delete rows and wait for it.

ClickHouse has no transactions; these are the few multi-step operations the stages build on,
each written so that a crash between its steps leaves something a rerun completes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.warehouse.base import Warehouse
from pipeline.warehouse.sql import qualified

# database engines whose tables EXCHANGE TABLES can swap (Ordinary ones cannot)
EXCHANGE_ENGINES = ("Atomic", "Replicated")


def database_engine(wh: Warehouse, database: str) -> str:
    return str(
        wh.scalar("SELECT engine FROM system.databases WHERE name = %(d)s", {"d": database}) or ""
    )


def swap_in(wh: Warehouse, database: str, fresh: str, live: str) -> None:
    """Put `fresh` live under the name `live` in one statement, then drop the previous table.

    `EXCHANGE TABLES` where the server and database have it, else one `RENAME TABLE` statement
    for both names: readers see the old table or the new one, never none.
    """
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


def delete_where(
    wh: Warehouse, database: str, table: str, where: str, params: Mapping[str, Any]
) -> int:
    """Delete the rows `where` selects (a mutation, waited for); returns how many there were."""
    if not wh.table_exists(database, table):
        return 0
    q_table = qualified(database, table)
    left = wh.scalar(f"SELECT count() FROM {q_table} WHERE {where}", params)
    if left:
        wh.execute(f"ALTER TABLE {q_table} DELETE WHERE {where}", params)
        wh.wait_mutations(database, table)
    return int(left or 0)
