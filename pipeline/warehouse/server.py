"""ClickHouse server over the native protocol (clickhouse-driver): any version from 18.16 on."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pipeline.warehouse.base import Features, Warehouse, WarehouseError, qualified, quote_ident

if TYPE_CHECKING:
    import pyarrow as pa

_WRAPPER = re.compile(r"^(?:Nullable|LowCardinality)\((.*)\)$")
_DECIMAL = re.compile(r"^Decimal(?:\d+)?\((\d+),\s*(\d+)\)$")


def arrow_type(ch_type: str) -> pa.DataType:
    """Map a ClickHouse column type to the Arrow type our stages use."""
    import pyarrow as pa

    while m := _WRAPPER.match(ch_type):
        ch_type = m.group(1)
    simple = {
        "String": pa.string(),
        "Int8": pa.int8(),
        "Int16": pa.int16(),
        "Int32": pa.int32(),
        "Int64": pa.int64(),
        "UInt8": pa.uint8(),
        "UInt16": pa.uint16(),
        "UInt32": pa.uint32(),
        "UInt64": pa.uint64(),
        "Float32": pa.float32(),
        "Float64": pa.float64(),
        "Date": pa.date32(),
        "Date32": pa.date32(),
        "Bool": pa.bool_(),
    }
    if ch_type in simple:
        return simple[ch_type]
    if ch_type.startswith("DateTime"):
        return pa.timestamp("us", "UTC")
    if m := _DECIMAL.match(ch_type):
        return pa.decimal128(int(m.group(1)), int(m.group(2)))
    if ch_type.startswith("FixedString"):
        return pa.string()
    raise WarehouseError(f"no Arrow mapping for ClickHouse type {ch_type}")


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
        version = self._client.execute("SELECT version()")[0][0]
        self.features = Features(tuple(int(p) for p in version.split(".")[:3]))

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, params)

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        return self._run(sql, params)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        import pyarrow as pa

        columns, types = self._run(sql, params, columnar=True, with_column_types=True)
        fields = [pa.field(name, arrow_type(t)) for name, t in types]
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
        from clickhouse_driver.errors import Error

        try:
            return self._client.execute(sql, params, **kwargs)
        except Error as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql[:500]}") from exc
