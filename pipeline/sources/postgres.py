"""PostgreSQL -> Arrow record batches: incremental on `updated_at`, or a full scan.

Rows leave the server as `COPY (SELECT ...) TO STDOUT (FORMAT csv)` and are typed by Arrow's C++
CSV parser: on our data that is several times faster than a psycopg2 fetchmany loop, at least as
fast as ADBC without its extra dependency, and exact (docs/postgres.md, "Which reader"). A thread
receives the COPY one row at a time (libpq's contract), cuts whole-row chunks of at most
`batch_rows` rows or CHUNK_BYTES, and hands them over a bounded queue, so memory stays flat
whatever the table size.

The incremental window is `(watermark - lookback, upper]`. `upper` is pinned just before the
REPEATABLE READ snapshot that reads the rows, and held below the start of the oldest transaction
then open on the server: a row that a long transaction commits late carries an `updated_at` at or
after that start, so it is still ahead of the watermark when it becomes visible.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("pipeline")

# PostgreSQL type name (information_schema.columns.udt_name) -> Arrow type factory
_SIMPLE = {
    "int2": "int16",
    "int4": "int32",
    "int8": "int64",
    "float4": "float32",
    "float8": "float64",
    "bool": "bool_",
    "date": "date32",
}
_TIMESTAMPS = ("timestamptz", "timestamp")
_JSON = ("json", "jsonb")
# Session settings the text the server sends depends on; fixed so output is the same everywhere.
_SESSION = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "1",  # shortest text that round-trips (0 would round floats)
    "bytea_output": "hex",
}
# Sessions that never write user rows, so they must not hold the window back.
_NOT_WRITERS = ("autovacuum worker", "autovacuum launcher", "walsender")
CHUNK_BYTES = 16 << 20  # a chunk closes at batch_rows rows or this many bytes
QUEUE_CHUNKS = 2
_CSV_COLUMN = re.compile(r"CSV column #(\d+)")
_MARK = "\ue000"  # a private-use character: brackets a fractional number inside the encoder
_ESCAPED_MARK = re.compile(r"\\u[eE]000")
_MARKED_NUMBER = re.compile(f'"{_MARK}([^"{_MARK}]*){_MARK}"')


class PostgresSourceError(RuntimeError):
    """PostgreSQL is unreachable or a table/column is unusable; the message names it."""


@dataclass(frozen=True)
class Column:
    name: str
    udt_name: str
    precision: int | None
    scale: int | None


@dataclass(frozen=True)
class Window:
    """Rows with lower < updated_at <= upper; lower None means from the beginning."""

    lower: datetime | None
    upper: datetime


def _is_decimal(column: Column) -> bool:
    """numeric(p, s) that decimal128 holds exactly (PostgreSQL 15 also allows s < 0 or s > p)."""
    p, s = column.precision, column.scale
    return column.udt_name == "numeric" and p is not None and s is not None and 0 <= s <= p <= 38


def arrow_type(column: Column) -> pa.DataType:
    """The documented Arrow type of a PostgreSQL column (docs/postgres.md, "Type mapping")."""
    import pyarrow as pa

    if column.udt_name in _SIMPLE:
        return getattr(pa, _SIMPLE[column.udt_name])()
    if _is_decimal(column):
        return pa.decimal128(column.precision, column.scale)
    if column.udt_name in _TIMESTAMPS:
        return pa.timestamp("us", "UTC")
    # text, uuid, unconstrained numeric (exact text), json/jsonb and arrays (canonical JSON),
    # bytea (base64), and every other type as the server's text
    return pa.string()


class _Spec(NamedTuple):
    """How one column is selected, parsed from CSV, and finished into its Arrow type."""

    expr: Any  # psycopg2.sql.Composable
    parsed: pa.DataType
    final: pa.DataType
    json: bool


def _spec(column: Column) -> _Spec:
    import pyarrow as pa
    from psycopg2 import sql

    ident = sql.Identifier(column.name)
    final = arrow_type(column)
    if column.udt_name == "timestamptz":
        return _Spec(
            sql.SQL("({} AT TIME ZONE 'UTC')").format(ident), pa.timestamp("us"), final, False
        )
    if column.udt_name == "timestamp":
        return _Spec(ident, pa.timestamp("us"), final, False)
    if column.udt_name.startswith("_"):
        return _Spec(sql.SQL("array_to_json({})").format(ident), final, final, True)
    if column.udt_name == "bytea":
        b64 = sql.SQL("translate(encode({}, 'base64'), E'\\n', '')").format(ident)
        return _Spec(b64, final, final, False)
    return _Spec(ident, final, final, column.udt_name in _JSON)


class _Number(str):
    """A fractional JSON number token, kept verbatim."""


def _exact_json(value: Any) -> Iterator[str]:
    """Canonical JSON with number tokens verbatim (the slow path of `canonical_json`)."""
    if isinstance(value, dict):
        yield "{"
        for i, key in enumerate(sorted(value)):
            yield ("," if i else "") + json.dumps(key, ensure_ascii=False) + ":"
            yield from _exact_json(value[key])
        yield "}"
    elif isinstance(value, list):
        yield "["
        for i, item in enumerate(value):
            if i:
                yield ","
            yield from _exact_json(item)
        yield "]"
    elif isinstance(value, _Number):
        yield value
    else:
        yield json.dumps(value, ensure_ascii=False)


def _marked(token: str) -> str:
    return _MARK + token + _MARK


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_MARKING = json.JSONDecoder(parse_float=_marked)


def canonical_json(text: str) -> str:
    """Sorted keys, no spaces, non-ASCII kept, numbers exactly as PostgreSQL wrote them.

    Fractional numbers travel through the C encoder as marked strings and are unquoted after;
    a document that could already contain the marker takes the slower exact path.
    """
    if _MARK in text or _ESCAPED_MARK.search(text):
        return "".join(_exact_json(json.loads(text, parse_float=_Number)))
    out = _ENCODER.encode(_MARKING.decode(text))
    return _MARKED_NUMBER.sub(r"\1", out) if _MARK in out else out


def connect(dsn: str) -> Any:
    import psycopg2

    from pipeline.config import mask_url

    try:
        conn = psycopg2.connect(dsn, connect_timeout=5, fallback_application_name="cdc-pipeline")
    except psycopg2.Error as exc:
        raise PostgresSourceError(
            f"PostgreSQL at {mask_url(dsn)} (CDC_POSTGRES_DSN) is unreachable: {exc}".strip()
        ) from exc
    return conn


def configure(conn: Any) -> None:
    """Fix the session settings the server's text output depends on (outside any transaction)."""
    conn.autocommit = True
    conn.set_client_encoding("UTF8")
    calls = ", ".join(["set_config(%s, %s, false)"] * len(_SESSION))
    with conn.cursor() as cur:
        cur.execute(f"SELECT {calls}", [v for pair in _SESSION.items() for v in pair])


def split_table(object_name: str) -> tuple[str, str]:
    schema, _, table = object_name.rpartition(".")
    return schema or "public", table


def table_columns(conn: Any, object_name: str) -> list[Column]:
    schema, table = split_table(object_name)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT column_name, udt_name, numeric_precision, numeric_scale"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
            " ORDER BY ordinal_position",
            (schema, table),
        )
        rows = cur.fetchall()
    if not rows:
        raise PostgresSourceError(f"PostgreSQL table {schema}.{table} not found (or no columns)")
    return [Column(*row) for row in rows]


def pin_upper(conn: Any) -> datetime:
    """The server clock, held below the start of the oldest transaction open right now.

    Run in autocommit *before* the read's snapshot: a writer still open now is held below; one
    that commits between this query and the snapshot is visible to the snapshot; one that
    starts later stamps `updated_at` after the returned value.
    """
    with conn.cursor() as cur:
        cur.execute(
            "SELECT clock_timestamp(), current_user, pg_has_role('pg_read_all_stats', 'USAGE'),"
            " pg_is_in_recovery(), a.xact_start, a.pid, a.application_name"
            " FROM (SELECT 1) AS one LEFT JOIN LATERAL ("
            "  SELECT xact_start, pid, application_name FROM pg_stat_activity"
            "  WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
            "  AND datname = current_database() AND backend_type <> ALL(%s)"
            "  ORDER BY xact_start LIMIT 1) AS a ON true",
            (list(_NOT_WRITERS),),
        )
        now, role, sees_all, standby, oldest, pid, app = cur.fetchone()
    if not sees_all:
        raise PostgresSourceError(
            f"PostgreSQL role {role!r} cannot see other sessions' transactions in"
            f" pg_stat_activity, so late commits could be skipped:"
            f" GRANT pg_read_all_stats TO {role}"
        )
    if standby:
        log.warning(
            "reading a PostgreSQL standby: its pg_stat_activity does not show the primary's"
            " transactions, so only the lookback guards against late commits"
        )
    if oldest is not None and oldest <= now:
        log.info("window held at %s by transaction open since then (pid %s, %s)", oldest, pid, app)
        return oldest - timedelta(microseconds=1)
    return now


def _check_updated_at(columns: list[Column], object_name: str, updated_at: str) -> None:
    found = {c.name: c for c in columns}.get(updated_at)
    if found is None:
        raise PostgresSourceError(
            f"PostgreSQL table {object_name}: updated_at column {updated_at!r} not found"
        )
    if found.udt_name not in _TIMESTAMPS:
        raise PostgresSourceError(
            f"PostgreSQL table {object_name}: updated_at column {updated_at!r} is"
            f" {found.udt_name}, not timestamptz/timestamp (declare the table mode = full)"
        )


def read(
    dsn: str,
    object_name: str,
    updated_at: str | None,
    watermark: datetime | None,
    lookback: timedelta,
    batch_rows: int = 50_000,
    columns: Sequence[str] | None = None,
    check: Callable[[Sequence[str]], None] | None = None,
    finite: tuple[str, Sequence[str]] | None = None,
) -> tuple[Window | None, Iterator[pa.RecordBatch]]:
    """Pin the window, open the snapshot, and return the window with a lazy stream of batches.

    `updated_at` None (mode = full) scans the whole table; the window is then None. `columns`
    reads only those (e.g. the keys, for reconciliation), typed exactly as in a full read.
    `check` is handed the table's column names before any row is read (the entity's settings
    are validated against them). `finite` (column, key columns) refuses rows whose column is
    +/-infinity, naming their keys: such an `updated_at` lies outside every window.
    """
    conn = connect(dsn)
    try:
        configure(conn)
        window = None
        if updated_at is not None:
            upper = pin_upper(conn)
            window = Window(None if watermark is None else watermark - lookback, upper)
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
        found = table_columns(conn, object_name)  # the snapshot starts here, after the pin
        if check is not None:
            check([c.name for c in found])
        if updated_at is not None:
            _check_updated_at(found, object_name, updated_at)
        if finite is not None:
            refuse_infinite(conn, object_name, *finite)
        if columns is not None:
            found = _select_columns(found, object_name, columns)
    except BaseException:
        conn.close()
        raise
    return window, _stream(conn, found, object_name, updated_at, window, batch_rows)


INFINITE_SHOWN = 5


def refuse_infinite(conn: Any, object_name: str, column: str, key: Sequence[str]) -> None:
    """Fail naming the keys of rows whose `column` is 'infinity' or '-infinity'.

    No window `lower < updated_at <= upper` ever holds such a row, and ClickHouse could not
    store it: reporting it is the only way not to lose it in silence. One indexed probe.
    """
    from psycopg2 import sql

    schema, table = split_table(object_name)
    ident = sql.Identifier(column)
    template = "SELECT {}, {}::text FROM {}.{} WHERE {} IN ('infinity', '-infinity') LIMIT %s"
    query = sql.SQL(template).format(
        sql.SQL(", ").join(sql.Identifier(k) for k in key),
        ident,
        sql.Identifier(schema),
        sql.Identifier(table),
        ident,
    )
    with conn.cursor() as cur:
        cur.execute(query, (INFINITE_SHOWN + 1,))
        rows = cur.fetchall()
    if rows:
        shown = ", ".join(
            f"{dict(zip(key, row[:-1], strict=True))} = {row[-1]}" for row in rows[:INFINITE_SHOWN]
        )
        more = " and more" if len(rows) > INFINITE_SHOWN else ""
        raise PostgresSourceError(
            f"PostgreSQL table {object_name}: column {column!r} is infinite in row(s)"
            f" {shown}{more}; no window can hold such a row and ClickHouse cannot store it:"
            " give it a finite timestamp"
        )


def _select_columns(found: list[Column], object_name: str, names: Sequence[str]) -> list[Column]:
    by_name = {c.name: c for c in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PostgresSourceError(f"PostgreSQL table {object_name}: column(s) {missing} not found")
    return [by_name[n] for n in names]


def copy_statement(
    conn: Any,
    columns: list[Column],
    object_name: str,
    updated_at: str | None,
    window: Window | None,
) -> str:
    """COPY takes no bind parameters, so psycopg2 renders the window values client-side."""
    from psycopg2 import sql

    schema, table = split_table(object_name)
    select = sql.SQL("SELECT {} FROM {}.{}").format(
        sql.SQL(", ").join(_spec(c).expr for c in columns),
        sql.Identifier(schema),
        sql.Identifier(table),
    )
    params: tuple[Any, ...] = ()
    if window is not None and updated_at is not None:
        ts = sql.Identifier(updated_at)
        # rows without an updated_at are in every window: nothing else would ever read them
        if window.lower is None:
            select += sql.SQL(" WHERE ({ts} <= %s OR {ts} IS NULL)").format(ts=ts)
            params = (window.upper,)
        else:
            select += sql.SQL(" WHERE (({ts} > %s AND {ts} <= %s) OR {ts} IS NULL)").format(ts=ts)
            params = (window.lower, window.upper)
    query = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(select)
    with conn.cursor() as cur:
        return cur.mogrify(query, params).decode()


@dataclass
class _Chunk:
    data: bytearray
    rows: int
    widest: int


class _Stopped(Exception):
    """The consumer went away; raised inside psycopg2's write callback to end the COPY."""


_END = object()


@dataclass
class _RowSink:
    """The file psycopg2 copies into: one write() per row, gathered into whole-row chunks."""

    out: queue.Queue
    stop: threading.Event
    max_rows: int
    max_bytes: int = CHUNK_BYTES
    data: bytearray = field(default_factory=bytearray)
    rows: int = 0
    widest: int = 0

    def write(self, row: bytes) -> int:
        self.data += row
        self.rows += 1
        self.widest = max(self.widest, len(row))
        if self.rows >= self.max_rows or len(self.data) >= self.max_bytes:
            self.flush()
        return len(row)

    def flush(self) -> None:
        if self.rows:
            self.put(_Chunk(self.data, self.rows, self.widest))
            self.data, self.rows, self.widest = bytearray(), 0, 0

    def put(self, item: object) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


def _copy(conn: Any, statement: str, sink: _RowSink) -> None:
    """Thread body: run the COPY into the sink; the last item is _END or the exception."""
    try:
        with conn.cursor() as cur:
            cur.copy_expert(statement, sink)
        sink.flush()
        sink.put(_END)
    except _Stopped:
        return
    except BaseException as exc:
        if not sink.stop.is_set():
            try:
                sink.put(exc)
            except _Stopped:
                return


def _stream(
    conn: Any,
    columns: list[Column],
    object_name: str,
    updated_at: str | None,
    window: Window | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    chunks: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
    sink = _RowSink(chunks, threading.Event(), max(1, batch_rows))
    statement = copy_statement(conn, columns, object_name, updated_at, window)
    parser = _Parser(columns, object_name)
    thread = threading.Thread(
        target=_copy, args=(conn, statement, sink), name=f"copy {object_name}", daemon=True
    )
    thread.start()
    try:
        while (item := chunks.get()) is not _END:
            if isinstance(item, BaseException):
                raise PostgresSourceError(
                    f"PostgreSQL table {object_name}: read failed: {item}".strip()
                ) from item
            yield parser.batch(item)
    finally:
        if thread.is_alive():
            sink.stop.set()
            conn.cancel()
        thread.join()
        conn.close()


class _Parser:
    """CSV chunk -> record batch of the documented types; errors name the table and column."""

    def __init__(self, columns: list[Column], object_name: str) -> None:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        self.columns = columns
        self.object_name = object_name
        self.specs = [_spec(c) for c in columns]
        self.schema = pa.schema(
            [pa.field(c.name, s.final) for c, s in zip(columns, self.specs, strict=True)]
        )
        self.parse = pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False)
        self.convert = pacsv.ConvertOptions(
            column_types={c.name: s.parsed for c, s in zip(columns, self.specs, strict=True)},
            null_values=[""],  # PostgreSQL's CSV NULL; '' arrives quoted; 'NaN' stays a float
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        )

    def batch(self, chunk: _Chunk) -> pa.RecordBatch:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        options = pacsv.ReadOptions(
            column_names=[c.name for c in self.columns],
            block_size=max(1 << 20, chunk.widest + 1),  # a row must fit in one block
        )
        try:
            table = pacsv.read_csv(
                pa.py_buffer(chunk.data),
                read_options=options,
                parse_options=self.parse,
                convert_options=self.convert,
            )
        except pa.ArrowInvalid as exc:
            raise self._error(exc) from exc
        if table.num_rows != chunk.rows:
            raise PostgresSourceError(
                f"PostgreSQL table {self.object_name}: {chunk.rows} rows sent,"
                f" {table.num_rows} parsed"
            )
        arrays = [
            self._finish(table.column(i).combine_chunks(), i) for i in range(len(self.columns))
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _finish(self, array: pa.Array, i: int) -> pa.Array:
        import pyarrow as pa

        spec, column = self.specs[i], self.columns[i]
        if spec.json:
            try:
                values = [None if v is None else canonical_json(v) for v in array.to_pylist()]
            except ValueError as exc:
                raise self._named(column, f"not JSON: {exc}") from exc
            return pa.array(values, pa.string())
        if array.type != spec.final:
            return array.cast(spec.final)
        return array

    def _error(self, exc: Exception) -> PostgresSourceError:
        match = _CSV_COLUMN.search(str(exc))
        if match and int(match.group(1)) < len(self.columns):
            return self._named(self.columns[int(match.group(1))], str(exc))
        return PostgresSourceError(f"PostgreSQL table {self.object_name}: {exc}")

    def _named(self, column: Column, problem: str) -> PostgresSourceError:
        return PostgresSourceError(
            f"PostgreSQL table {self.object_name}: column {column.name!r} ({column.udt_name})"
            f" cannot be converted: {problem}"
        )
