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

    @abstractmethod
    def close(self) -> None: ...

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = self.query_rows(sql, params)
        return rows[0][0] if rows else None

    def table_exists(self, database: str, table: str) -> bool:
        return bool(
            self.scalar(
                "SELECT count() FROM system.tables WHERE database = %(d)s AND name = %(t)s",
                {"d": database, "t": table},
            )
        )

    def columns(self, database: str, table: str) -> dict[str, str]:
        """Column name -> ClickHouse type, in table order."""
        rows = self.query_rows(
            "SELECT name, type FROM system.columns WHERE database = %(d)s AND table = %(t)s",
            {"d": database, "t": table},
        )
        return dict(rows)

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
