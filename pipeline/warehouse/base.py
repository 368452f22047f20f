"""The one warehouse interface both backends implement, and what a server can do.

Everything above this layer speaks Arrow and ClickHouse SQL; nothing above it knows whether the
warehouse is a ClickHouse server or chDB in this process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import WarehouseError
from pipeline.warehouse import cluster as cl
from pipeline.warehouse.sql import quote_ident

if TYPE_CHECKING:
    import pyarrow as pa

# statements that can change which tables exist or what columns they have
DDL_WORDS = frozenset({"CREATE", "DROP", "ALTER", "RENAME", "EXCHANGE", "ATTACH", "DETACH"})


@dataclass(frozen=True)
class Features:
    """What the connected server can do; probed once so old servers cost new ones nothing."""

    version: tuple[int, ...]

    @property
    def datetime64(self) -> bool:
        return self.version >= (20, 1)

    @property
    def bool_type(self) -> bool:
        return self.version >= (21, 12)

    @property
    def date32(self) -> bool:
        """Date32 spans 1900-2299; plain Date stops at 1970 and clamps silently."""
        return self.version >= (21, 9)

    @property
    def ttl(self) -> bool:
        return self.version >= (19, 6)

    @property
    def lightweight_exchange(self) -> bool:
        """EXCHANGE TABLES: atomic swap of two tables (Atomic database engine)."""
        return self.version >= (21, 1)

    @property
    def timestamp_range(self) -> str:
        """The documented range of `timestamp_type` (newer servers and chDB hold more)."""
        if self.datetime64:
            return "1900-01-01 00:00:00 .. 2299-12-31 23:59:59"
        return "1970-01-01 00:00:01 .. 2105-12-31 23:59:59"

    @property
    def timestamp_type(self) -> str:
        """The column type for instants: microseconds where the server has DateTime64."""
        return "DateTime64(6, 'UTC')" if self.datetime64 else "DateTime('UTC')"


class Warehouse(ABC):
    """A ClickHouse we can run SQL on and move Arrow tables in and out of."""

    url: str
    features: Features
    cluster: cl.Cluster | None = None  # set when `[cdc] cluster` names one (servers only)
    # database -> table -> column -> type, while a `catalog_scope` is open
    _catalog: dict[str, dict[str, dict[str, str]]] | None = None

    @abstractmethod
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""

    @abstractmethod
    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run a query and return its rows as tuples (small results only)."""

    @abstractmethod
    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query and return an Arrow table with normalised types."""

    @abstractmethod
    def insert_arrow(self, database: str, table: str, data: pa.Table) -> None:
        """Insert an Arrow table column-wise; columns are matched by name."""

    # whether `insert_select` can compute columns over an Arrow table in one statement
    reads_arrow_in_sql = False

    def insert_select(
        self, database: str, table: str, data: pa.Table, columns: dict[str, str]
    ) -> None:
        """Insert rows computed by SQL over `data` (target column -> expression over its
        columns), where `reads_arrow_in_sql`; elsewhere a caller parks the rows instead."""
        raise NotImplementedError(f"{type(self).__name__} cannot read Arrow in SQL")

    @abstractmethod
    def close(self) -> None: ...

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = self.query_rows(sql, params)
        return rows[0][0] if rows else None

    def table_exists(self, database: str, table: str) -> bool:
        if self._catalog is not None:
            return table in self._tables(database)
        return bool(
            self.scalar(
                "SELECT count() FROM system.tables WHERE database = %(d)s AND name = %(t)s",
                {"d": database, "t": table},
            )
        )

    def columns(self, database: str, table: str) -> dict[str, str]:
        """Column name -> ClickHouse type, in table order."""
        if self._catalog is not None:
            return dict(self._tables(database).get(table, {}))
        rows = self.query_rows(
            "SELECT name, type FROM system.columns WHERE database = %(d)s AND table = %(t)s",
            {"d": database, "t": table},
        )
        return dict(rows)

    def knows_table(self, database: str, table: str) -> bool:
        """Whether an open `catalog_scope` has seen `table` (never asks the server)."""
        return self._catalog is not None and self.table_exists(database, table)

    @contextmanager
    def catalog_scope(self) -> Iterator[None]:
        """Answer `table_exists` and `columns` from one read of a database's catalog, read
        again after any DDL this connection runs.

        A task opens one around its work: it is the only writer of its tables' shape, and a
        batch asks the same few questions about them a dozen times (3-15 ms each on chDB).
        Outside a scope every question goes to the server, as another process may have
        changed the answer.
        """
        if self._catalog is not None:
            yield
            return
        self._catalog = {}
        try:
            yield
        finally:
            self._catalog = None

    def _tables(self, database: str) -> dict[str, dict[str, str]]:
        assert self._catalog is not None
        tables = self._catalog.get(database)
        if tables is None:
            tables = {}
            rows = self.query_rows(
                "SELECT table, name, type FROM system.columns WHERE database = %(d)s",
                {"d": database},
            )
            for table, name, kind in rows:
                tables.setdefault(table, {})[name] = kind
            self._catalog[database] = tables
        return tables

    def _saw(self, sql: str) -> None:
        """Forget the catalog before a statement that may change it (backends call this)."""
        if self._catalog and (sql.lstrip()[:10].split(None, 1) or [""])[0].upper() in DDL_WORDS:
            self._catalog.clear()

    def holds_timestamp(self, text: str) -> bool:
        """Whether a UTC timestamp (`YYYY-MM-DD HH:MM:SS[.ffffff]`) survives a round trip.

        ClickHouse stores a DateTime outside its range as 1970 (or clamps it) without a word,
        and the range of DateTime64 grew across versions, so the server itself is asked.
        """
        base, _, fraction = text.partition(".")
        if self.features.datetime64:
            sent, expression = text, "toString(toDateTime64(%(t)s, 6, 'UTC'))"
        else:
            sent, expression, fraction = base, "toString(toDateTime(%(t)s, 'UTC'))", ""
        try:
            stored = str(self.scalar(f"SELECT {expression}", {"t": sent}))
        except WarehouseError:
            return False
        stored_base, _, stored_fraction = stored.partition(".")
        return (stored_base, stored_fraction.rstrip("0")) == (base, fraction.rstrip("0"))

    @contextmanager
    def settings_scope(self, **settings: Any) -> Iterator[None]:
        """Query settings for the statements of a `with` block (servers; chDB needs none)."""
        yield

    def create_database(self, database: str) -> None:
        sql = f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}"
        if self._catalog is not None and self._tables(database):
            return  # a database with tables exists
        if self.cluster is None:
            self.execute(sql)
        elif not self.scalar(
            "SELECT count() FROM system.databases WHERE name = %(d)s", {"d": database}
        ):
            cl.ddl(self, self.cluster, sql + self.cluster.on)

    def wait_mutations(self, database: str, table: str, timeout: float = 300.0) -> None:
        """Block until ALTER ... DELETE/UPDATE mutations on a table are done (they are async);
        on a cluster, on every node, of the local table under a Distributed one."""
        import time

        if self.cluster is not None:
            local = cl.local_name(table)
            name = local if self.table_exists(database, local) else table
            cl.wait_done(self, self.cluster, database, name, timeout=timeout)
            return

        deadline = time.monotonic() + timeout
        while True:
            pending = self.scalar(
                "SELECT count() FROM system.mutations"
                " WHERE database = %(d)s AND table = %(t)s AND is_done = 0",
                {"d": database, "t": table},
            )
            if not pending:
                return
            if time.monotonic() > deadline:
                raise WarehouseError(
                    f"mutations on {database}.{table} still running after {timeout}s"
                )
            time.sleep(0.05)

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
