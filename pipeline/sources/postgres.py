"""PostgreSQL -> Arrow record batches: incremental on `updated_at`, or a full scan.

The incremental window is `(watermark - lookback, upper]`. `upper` is pinned inside the same
REPEATABLE READ snapshot that reads the rows, and held below the start of the oldest transaction
still open on the server: a row that a long transaction commits late carries an `updated_at`
at or after that start, so it is not behind the watermark when it becomes visible.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# PostgreSQL type name (information_schema.columns.udt_name) -> Arrow type factory
_SIMPLE = {
    "int2": "int16",
    "int4": "int32",
    "int8": "int64",
    "float4": "float32",
    "float8": "float64",
    "bool": "bool_",
    "text": "string",
    "varchar": "string",
    "bpchar": "string",
    "name": "string",
    "citext": "string",
    "uuid": "string",
    "date": "date32",
}


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


def arrow_type(column: Column) -> pa.DataType:
    """The documented Arrow type of a PostgreSQL column (README, "Type mapping")."""
    import pyarrow as pa

    if column.udt_name in _SIMPLE:
        return getattr(pa, _SIMPLE[column.udt_name])()
    if column.udt_name == "numeric":
        if column.precision is not None and column.precision <= 38:
            return pa.decimal128(column.precision, column.scale or 0)
        return pa.string()  # unconstrained numeric: exact as text
    if column.udt_name in ("timestamptz", "timestamp"):
        return pa.timestamp("us", "UTC")
    # json/jsonb (canonical text), arrays (canonical JSON), bytea (base64), anything else (text)
    return pa.string()


def _to_text(value: Any, udt_name: str) -> Any:
    """Values whose Arrow type is string but whose Python value is not."""
    if value is None or isinstance(value, str):
        return value
    if udt_name == "bytea" or isinstance(value, memoryview | bytes):
        return base64.b64encode(bytes(value)).decode()
    if udt_name in ("json", "jsonb") or udt_name.startswith("_"):
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
    return str(value)


def connect(dsn: str) -> Any:
    import psycopg2

    from pipeline.config import mask_url

    try:
        conn = psycopg2.connect(dsn, connect_timeout=5)
    except psycopg2.Error as exc:
        raise PostgresSourceError(
            f"PostgreSQL at {mask_url(dsn)} (CDC_POSTGRES_DSN) is unreachable: {exc}".strip()
        ) from exc
    return conn


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
    """now() of this snapshot, held below the oldest open transaction's start."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT now(), (SELECT min(xact_start) FROM pg_stat_activity"
            " WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
            " AND datname = current_database())"
        )
        now, oldest = cur.fetchone()
    if oldest is not None and oldest <= now:
        return oldest - timedelta(microseconds=1)
    return now


def _select(
    columns: list[Column], object_name: str, updated_at: str | None, window: Window | None
) -> tuple[Any, tuple[Any, ...]]:
    from psycopg2 import sql

    schema, table = split_table(object_name)
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    query = sql.SQL("SELECT {} FROM {}.{}").format(
        cols, sql.Identifier(schema), sql.Identifier(table)
    )
    params: tuple[Any, ...] = ()
    if window is not None and updated_at is not None:
        ts = sql.Identifier(updated_at)
        if window.lower is None:
            query += sql.SQL(" WHERE ({ts} <= %s OR {ts} IS NULL)").format(ts=ts)
            params = (window.upper,)
        else:
            query += sql.SQL(" WHERE {ts} > %s AND {ts} <= %s").format(ts=ts)
            params = (window.lower, window.upper)
    return query, params


def read(
    dsn: str,
    object_name: str,
    updated_at: str | None,
    watermark: datetime | None,
    lookback: timedelta,
    batch_rows: int = 50_000,
) -> tuple[Window | None, Iterator[pa.RecordBatch]]:
    """Open the snapshot, pin the window, and return it with a lazy stream of record batches.

    `updated_at` None (mode = full) scans the whole table; the window is then None.
    """
    conn = connect(dsn)
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    try:
        columns = table_columns(conn, object_name)
        names = {c.name for c in columns}
        if updated_at is not None and updated_at not in names:
            raise PostgresSourceError(
                f"PostgreSQL table {object_name}: updated_at column {updated_at!r} not found"
            )
        window = None
        if updated_at is not None:
            upper = pin_upper(conn)
            lower = None if watermark is None else watermark - lookback
            window = Window(lower, upper)
    except BaseException:
        conn.close()
        raise
    return window, _stream(conn, columns, object_name, updated_at, window, batch_rows)


def _stream(
    conn: Any,
    columns: list[Column],
    object_name: str,
    updated_at: str | None,
    window: Window | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa

    query, params = _select(columns, object_name, updated_at, window)
    types = [arrow_type(c) for c in columns]
    schema = pa.schema([pa.field(c.name, t) for c, t in zip(columns, types, strict=True)])
    try:
        with conn.cursor(name="cdc_extract") as cur:
            cur.itersize = batch_rows
            cur.execute(query, params)
            while rows := cur.fetchmany(batch_rows):
                yield _rows_to_batch(rows, columns, schema, object_name)
        conn.rollback()
    finally:
        conn.close()


def _rows_to_batch(
    rows: list[tuple], columns: list[Column], schema: pa.Schema, object_name: str
) -> pa.RecordBatch:
    import pyarrow as pa

    arrays = []
    for i, (column, field) in enumerate(zip(columns, schema, strict=True)):
        values = [row[i] for row in rows]
        if pa.types.is_string(field.type):
            values = [_to_text(v, column.udt_name) for v in values]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise PostgresSourceError(
                f"PostgreSQL table {object_name}: column {column.name!r} "
                f"({column.udt_name}) cannot be converted: {exc}"
            ) from exc
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
