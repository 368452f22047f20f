"""chDB: ClickHouse inside this process, the zero-setup default warehouse.

chDB can serve one data directory per process, so sessions are cached per path and a second path
is refused with a message that says why.

chDB's allocator (jemalloc) keeps the memory of finished queries for later ones; in a pipeline
process that memory is RSS nothing else can use (1M rows through a few INSERT ... SELECT took a
process from 290 MB to 1.2 GB), and so does pyarrow's pool. Once the process has grown by
`PURGE_STEP_MB` since the last purge, the next statement hands both back (`SYSTEM JEMALLOC
PURGE`, 10-40 ms).
Inserts are also squashed into blocks of at most 16K rows / 4 MB instead of 1M rows, which
bounds what one INSERT ... SELECT holds at once.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import WarehouseError
from pipeline.warehouse.base import Features, Warehouse
from pipeline.warehouse.sql import literal, qualified, quote_ident, render

if TYPE_CHECKING:
    import pyarrow as pa

_SESSIONS: dict[str, Any] = {}
_OPENED_BY = [0]  # the pid that opened the sessions: a forked child inherits them, unusable
PURGE_STEP_MB = 64
SMALL_INSERT_ROWS = 64  # inserted as VALUES (see `_values`)


def rss_mb() -> float:
    """This process's resident memory (0 where /proc is missing: then nothing is purged)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


ONE_PROCESS = (
    "chDB is embedded in one process, so one process at a time can use {path}: run one Luigi"
    " worker (no --workers N, no second luigi, cdc-run or assistant on this warehouse), or"
    " set CDC_WAREHOUSE_URL to a ClickHouse server (clickhouse://...) to run several"
)


def _session(path: str) -> Any:
    from chdb import session

    if _SESSIONS and _OPENED_BY[0] != os.getpid():  # a forked worker (luigi --workers N)
        raise WarehouseError(
            f"this process ({os.getpid()}) was forked from process {_OPENED_BY[0]}, which has"
            " chDB open. " + ONE_PROCESS.format(path=path)
        )
    if path not in _SESSIONS:
        if _SESSIONS:
            other = next(iter(_SESSIONS))
            raise WarehouseError(
                f"chDB already serves {other} in this process; it cannot also open {path}"
            )
        try:
            _SESSIONS[path] = session.Session(path)
        except Exception as exc:  # chDB's own words: "Error initializing EmbeddedServer"
            raise WarehouseError(
                f"chDB could not open {path}; another process probably has it open ({exc})."
                " " + ONE_PROCESS.format(path=path)
            ) from exc
        _OPENED_BY[0] = os.getpid()
        if len(_SESSIONS) == 1:
            atexit.register(_close_sessions)
    return _SESSIONS[path]


def _close_sessions() -> None:
    """Stop chDB before the interpreter tears down: left running, its background threads
    (merges, the schedule pool) crashed the process at exit in about a third of the runs
    (SIGSEGV, exit 139, after every task had succeeded)."""
    while _SESSIONS:
        _, open_session = _SESSIONS.popitem()
        open_session.close()


class EmbeddedWarehouse(Warehouse):
    """chdb:///absolute/path ; data persists under that directory."""

    def __init__(self, url: str) -> None:
        path = url.removeprefix("chdb://")
        if not path.startswith("/"):
            raise WarehouseError(f"chDB warehouse URL needs an absolute path: {url}")
        self.url = url
        self.path = path
        self._session = _session(path)
        self._purged_at = rss_mb()
        self._query(
            "SET min_insert_block_size_rows = 16384, min_insert_block_size_bytes = 4194304,"
            " precise_float_parsing = 1",
            "CSV",
        )
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
        names = ", ".join(quote_ident(n) for n in data.column_names)
        values = _values(data)
        if values is not None:
            self._query(
                f"INSERT INTO {qualified(database, table)} ({names}) VALUES {values}", "CSV"
            )
            return
        self.insert_select(database, table, data, {n: quote_ident(n) for n in data.column_names})

    reads_arrow_in_sql = True

    def insert_select(
        self, database: str, table: str, data: pa.Table, columns: dict[str, str]
    ) -> None:
        if data.num_rows == 0:
            return
        arrow_input = data  # noqa: F841 -- read by name by chDB's Python() table function
        self._query(
            f"INSERT INTO {qualified(database, table)} ({', '.join(map(quote_ident, columns))})"
            f" SELECT {', '.join(columns.values())} FROM Python(arrow_input)",
            "CSV",
        )

    def close(self) -> None:
        """Sessions live for the process (chDB cannot reopen another path), so this is a no-op."""

    def _query(self, sql: str, fmt: str) -> Any:
        self._saw(sql)
        try:
            result = self._session.query(sql, fmt)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql[:500]}") from exc
        self._release_memory()
        return result

    def _release_memory(self) -> None:
        if rss_mb() - self._purged_at < PURGE_STEP_MB:
            return
        import pyarrow as pa

        try:
            self._session.query("SYSTEM JEMALLOC PURGE", "CSV")
        except Exception:  # a chDB built without jemalloc: nothing to hand back
            pass
        pa.default_memory_pool().release_unused()
        self._purged_at = rss_mb()


def _values(data: pa.Table) -> str | None:
    """A few rows (markers, positions, run audit) as a VALUES list, which chDB inserts in half
    the time of its Python() table function; None for more rows or for a type whose literal is
    not exact (text, integers, floats (`repr`, parsed precisely), bools, UTC timestamps)."""
    import pyarrow.types as t

    if data.num_rows > SMALL_INSERT_ROWS:
        return None
    for field in data.schema:
        kind = field.type
        utc = t.is_timestamp(kind) and kind.tz in ("UTC", "+00:00")
        if not (t.is_string(kind) or t.is_integer(kind) or t.is_float64(kind) or utc):
            if not t.is_boolean(kind):
                return None
    columns = [column.to_pylist() for column in data.columns]
    if any(isinstance(v, str) and "\x00" in v for values in columns for v in values):
        return None
    rows = zip(*columns, strict=True)
    return ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in rows)


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
