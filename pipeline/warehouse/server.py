"""ClickHouse server over the native protocol (clickhouse-driver): any version from 18.16 on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pipeline.core.errors import WarehouseError
from pipeline.warehouse.base import Features, Warehouse
from pipeline.warehouse.sql import qualified, quote_ident
from pipeline.warehouse.types import clickhouse_to_arrow

if TYPE_CHECKING:
    import pyarrow as pa


def _python_column(array: pa.ChunkedArray | pa.Array) -> list:
    """Arrow column -> the Python list clickhouse-driver's columnar insert expects."""
    import pyarrow as pa

    if pa.types.is_boolean(array.type):
        array = array.cast(pa.uint8())
    return array.to_pylist()


class ServerWarehouse(Warehouse):
    """clickhouse://user:password@host:port/ ; one native connection, reused."""

    def __init__(self, url: str) -> None:
        from clickhouse_driver import Client

        parts = urlsplit(url)
        self.url = url
        self._client = Client(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 9000,
            user=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            settings={"strings_encoding": "utf-8"},
        )
        version = self._run("SELECT version()")[0][0]
        self.features = Features(tuple(int(p) for p in version.split(".")[:3]))

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, params)

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        return self._run(sql, params)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        import pyarrow as pa

        columns, types = self._run(sql, params, columnar=True, with_column_types=True)
        fields = [pa.field(name, clickhouse_to_arrow(t)) for name, t in types]
        if not columns:
            return pa.Table.from_batches([], pa.schema(fields))
        arrays = [pa.array(list(col), type=f.type) for col, f in zip(columns, fields, strict=True)]
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def insert_arrow(self, database: str, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        names = ", ".join(quote_ident(n) for n in data.column_names)
        columns = [_python_column(data.column(i)) for i in range(data.num_columns)]
        self._run(
            f"INSERT INTO {qualified(database, table)} ({names}) VALUES", columns, columnar=True
        )

    def close(self) -> None:
        self._client.disconnect()

    def _run(self, sql: str, params: Any = None, **kwargs: Any) -> Any:
        from clickhouse_driver.errors import Error, NetworkError, SocketTimeoutError

        try:
            return self._client.execute(sql, params, **kwargs)
        except Error as exc:
            down = isinstance(exc, NetworkError | SocketTimeoutError)  # a rerun may succeed
            raise WarehouseError(f"{exc}\n-- while running: {sql[:500]}", retriable=down) from exc
