"""PostgreSQL -> Arrow record batches: incremental on `updated_at`, or a full scan.

Rows leave the server through the COPY reader (`pg_copy`), typed by the map in `pg_types`.
The incremental window is `(watermark - lookback, upper]`. `upper` is pinned just before the
REPEATABLE READ snapshot that reads the rows, and held below the start of the oldest transaction
then open on the server: a row that a long transaction commits late carries an `updated_at` at or
after that start, so it is still ahead of the watermark when it becomes visible. Rows with a
NULL `updated_at` are in every window; an infinite one fails the read naming the row's key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.core.names import RAW_META_COLUMNS
from pipeline.core.secrets import mask_dsn
from pipeline.extract.base import Read, Source
from pipeline.extract.pg_copy import PostgresSourceError, stream
from pipeline.extract.pg_types import TIMESTAMPS, Column, spec

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("pipeline")

# Session settings the text the server sends depends on; fixed so output is the same everywhere
# (log-based capture gives its walsender the same, so both read a value as the same text).
SESSION = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "1",  # shortest text that round-trips (0 would round floats)
    "bytea_output": "hex",
}
# Sessions that never write user rows, so they must not hold the window back.
_NOT_WRITERS = ("autovacuum worker", "autovacuum launcher", "walsender")
INFINITE_SHOWN = 5
KEY_BATCH_ROWS = 200_000


@dataclass(frozen=True)
class Window:
    """Rows with lower < updated_at <= upper; lower None means from the beginning."""

    lower: datetime | None
    upper: datetime


def connect(dsn: str) -> Any:
    import psycopg2

    try:
        conn = psycopg2.connect(dsn, connect_timeout=5, fallback_application_name="cdc-pipeline")
    except psycopg2.Error as exc:
        raise PostgresSourceError(
            f"PostgreSQL at {mask_dsn(dsn)} (CDC_POSTGRES_DSN) is unreachable: {exc}".strip(),
            retriable=True,
        ) from exc
    return conn


def configure(conn: Any) -> None:
    """Fix the session settings the server's text output depends on (outside any transaction)."""
    conn.autocommit = True
    conn.set_client_encoding("UTF8")
    calls = ", ".join(["set_config(%s, %s, false)"] * len(SESSION))
    with conn.cursor() as cur:
        cur.execute(f"SELECT {calls}", [v for pair in SESSION.items() for v in pair])


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
    if found.udt_name not in TIMESTAMPS:
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
    statement = copy_statement(conn, found, object_name, updated_at, window)
    return window, stream(conn, statement, found, object_name, batch_rows)


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
        sql.SQL(", ").join(spec(c).expr for c in columns),
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


def read_keys(
    dsn: str, object_name: str, key: Sequence[str], batch_rows: int = KEY_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Every key of the table, typed (and so hashed) exactly like the extracted rows.

    An `updated_at` query never returns a deleted row; with `reconcile = true` each extract
    also reads every key (cheap next to the rows), and the snapshot stage retires the live
    keys that are gone, as `hard_deletes` says.
    """
    _, batches = read(dsn, object_name, None, None, timedelta(0), batch_rows, columns=list(key))
    return batches


def _watermark(position: str | None) -> datetime | None:
    """The last loaded batch's watermark; None before the first, and after a batch of another
    mode (an LSN of `mode = log`): the table is then read whole once."""
    try:
        return datetime.fromisoformat(position) if position else None
    except ValueError:
        return None


class PostgresSource(Source):
    """A table, read incrementally on `updated_at` (or whole with `mode = full`)."""

    kind = "postgres"
    modes: ClassVar[tuple[str, ...]] = ("incremental", "full")
    noun = "PostgreSQL table"

    def read(self) -> Read:
        cfg, entity = self.settings, self.entity
        position = self.context.position
        watermark = _watermark(position) if entity.incremental else None
        window, batches = read(
            cfg.postgres_dsn,
            entity.object_name,
            entity.updated_at if entity.incremental else None,
            watermark,
            timedelta(minutes=cfg.lookback_minutes),
            cfg.batch_rows,
            check=self.check_table_columns,
            finite=(entity.updated_at, entity.unique_key) if entity.updated_at else None,
        )
        bounds: dict[str, str | None] = {}
        if window is not None:
            lower = window.lower.isoformat() if window.lower else None
            bounds = {"lower": lower, "upper": window.upper.isoformat()}
        return Read(batches, bounds)

    def keys(self) -> Iterator[pa.RecordBatch]:
        return read_keys(
            self.settings.postgres_dsn, self.entity.object_name, self.entity.unique_key
        )

    def check_table_columns(self, columns: Collection[str]) -> None:
        """The table's columns against the entity's settings and the raw table's own."""
        self.check_columns(columns)
        clash = [c for c in columns if c in RAW_META_COLUMNS]
        if clash:
            raise PostgresSourceError(
                f"{self.described}: column(s) {clash} clash with the raw table's own columns"
                f" {list(RAW_META_COLUMNS)}; rename them or read the table through a view",
                entity=self.entity.name,
            )
