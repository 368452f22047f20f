"""ClickHouse server over the native protocol (clickhouse-driver): any version from 18.16 on."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pipeline.core.errors import WarehouseError
from pipeline.warehouse import cluster as cl
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
    """clickhouse://user:password@host:port/ ; one native connection, reused.

    With a `cluster` (its name, path prefix and DDL timeout) every query runs with the
    cluster's session settings, which survive the driver's reconnects (they travel with each
    query), and the cluster is checked against the server once, here.
    """

    def __init__(self, url: str, cluster: cl.Cluster | None = None) -> None:
        from clickhouse_driver import Client

        parts = urlsplit(url)
        self.url = url
        user, password = unquote(parts.username or "default"), unquote(parts.password or "")
        settings: dict[str, Any] = {"strings_encoding": "utf-8"}
        if cluster is not None:
            settings.update(cl.SESSION_SETTINGS)
        host, port = parts.hostname or "127.0.0.1", parts.port or 9000
        self._client = Client(host=host, port=port, user=user, password=password, settings=settings)
        version = self._run("SELECT version()")[0][0]
        self.features = Features(tuple(int(p) for p in version.split(".")[:3]))
        if cluster is not None:
            self.cluster = replace(cluster, user=user, password=password)
            cl.check(self, self.cluster, f"{host}:{port}")

    @contextmanager
    def settings_scope(self, **settings: Any) -> Iterator[None]:
        saved = dict(self._client.settings)
        self._client.settings.update(settings)
        try:
            yield
        finally:
            self._client.settings.clear()
            self._client.settings.update(saved)

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

        self._saw(sql)
        try:
            return self._client.execute(sql, params, **kwargs)
        except Error as exc:
            down = isinstance(exc, NetworkError | SocketTimeoutError)  # a rerun may succeed
            raise WarehouseError(f"{exc}\n-- while running: {sql[:500]}", retriable=down) from exc
