"""chDB: ClickHouse inside this process, the zero-setup default warehouse.

chDB can serve one data directory per process, so sessions are cached per path and a second path
is refused with a message that says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.warehouse.base import Features, Warehouse, WarehouseError, qualified, render

if TYPE_CHECKING:
    import pyarrow as pa

_SESSIONS: dict[str, Any] = {}


def _session(path: str) -> Any:
    from chdb import session

    if path not in _SESSIONS:
        if _SESSIONS:
            other = next(iter(_SESSIONS))
            raise WarehouseError(
                f"chDB already serves {other} in this process; it cannot also open {path}"
            )
        _SESSIONS[path] = session.Session(path)
    return _SESSIONS[path]


class EmbeddedWarehouse(Warehouse):
    """chdb:///absolute/path ; data persists under that directory."""

    def __init__(self, url: str) -> None:
        path = url.removeprefix("chdb://")
        if not path.startswith("/"):
            raise WarehouseError(f"chDB warehouse URL needs an absolute path: {url}")
        self.url = url
        self.path = path
        self._session = _session(path)
        version = self.scalar("SELECT version()")
        self.features = Features(tuple(int(p) for p in str(version).split(".")[:3]))

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._query(render(sql, params), "CSV")

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        table = self.query_arrow(sql, params)
        columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
        return list(zip(*columns, strict=True)) if columns else []

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        result = self._query(render(sql, params), "ArrowStream")
        table = ipc.open_stream(pa.py_buffer(result.bytes())).read_all()
        return _normalise(table)

    def insert_arrow(self, database: str, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        names = ", ".join(f"`{n}`" for n in data.column_names)
        arrow_input = data  # noqa: F841 -- read by name by chDB's Python() table function
        self._query(
            f"INSERT INTO {qualified(database, table)} ({names})"
            f" SELECT {names} FROM Python(arrow_input)",
            "CSV",
        )

    def close(self) -> None:
        """Sessions live for the process (chDB cannot reopen another path), so this is a no-op."""

    def _query(self, sql: str, fmt: str) -> Any:
        try:
            return self._session.query(sql, fmt)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql[:500]}") from exc


def _normalise(table: pa.Table) -> pa.Table:
    """chDB returns DateTime as timestamp[s]: align timestamps with the server backend (us, UTC)."""
    import pyarrow as pa

    fields = []
    changed = False
    for field in table.schema:
        if pa.types.is_timestamp(field.type) and field.type != pa.timestamp("us", "UTC"):
            fields.append(field.with_type(pa.timestamp("us", "UTC")))
            changed = True
        elif pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            fields.append(field.with_type(pa.string()))
            changed = True
        else:
            fields.append(field)
    return table.cast(pa.schema(fields)) if changed else table
