"""PostgreSQL log-based capture, the slot's side: names, connections, publication and slot, the
pin, the slot's status and its acknowledgement (safety checks: `pg_capture_checks`; the read
itself: `pg_stream`).

Each entity has its own publication and logical slot, both `cdc_<database>_<entity>`. The
publication comes first: pgoutput looks publications up as of each change, so a slot made before
its publication fails every read, for good. Reading never moves the slot; only `acknowledge`,
once a batch's raw load has committed, does (pg_replication_slot_advance: exact, synchronous).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pipeline.core.secrets import mask_dsn
from pipeline.extract.pg_copy import PostgresSourceError
from pipeline.extract.pgoutput import format_lsn, parse_lsn
from pipeline.extract.postgres import SESSION, split_table

# Reading must never move the slot. psycopg2 answers a keepalive that asks for a reply, and
# sends a status update every `status_interval`, with a flush position it silently forwards to
# the keepalive's wal_end while no data has arrived: that moves confirmed_flush_lsn. A walsender
# with wal_sender_timeout = 0 never asks, and a status interval of a year never comes round; TCP
# keepalives still let the server notice a reader that vanished.
READ_SETTINGS: Final = {
    **SESSION,
    "wal_sender_timeout": "0",
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
}
NO_STATUS_UPDATES: Final = 365 * 24 * 3600.0
BUSY_SECONDS: Final = 30.0  # a walsender lets its slot go a moment after its reader closed
_NAME = re.compile(r"[a-z0-9_]{1,63}")


class LogCaptureError(PostgresSourceError):
    """Log-based capture cannot go on; the message names the slot or table and the fix."""


class SlotLostError(LogCaptureError):
    """The slot is gone or its WAL was removed: its changes can never be read again."""


def capture_name(database: str, entity: str) -> str:
    """`cdc_<database>_<entity>` in lower case: the name of both the slot and the publication."""
    name = f"cdc_{database}_{entity}".lower()
    if not _NAME.fullmatch(name):
        raise LogCaptureError(
            f"[entity.{entity}]: replication slot name {name!r} (CDC_DATABASE {database!r},"
            " entity name) is not a valid slot name: at most 63 of a-z, 0-9 and _; use a shorter"
            " entity name or database",
            entity=entity,
        )
    return name


@dataclass(frozen=True)
class Capture:
    """What one entity captures: a table, through its own publication and slot."""

    entity: str
    database: str  # CDC_DATABASE (part of the names)
    schema: str
    table: str
    key: tuple[str, ...]  # the entity's unique_key
    dsn: str

    @classmethod
    def of(
        cls, entity: str, database: str, object_name: str, key: Sequence[str], dsn: str
    ) -> Capture:
        schema, table = split_table(object_name)
        return cls(entity, database, schema, table, tuple(key), dsn)

    @property
    def name(self) -> str:
        """The slot's and the publication's name."""
        return capture_name(self.database, self.entity)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    def table_sql(self) -> Any:
        from psycopg2 import sql

        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))

    def error(self, message: str, cls: type[LogCaptureError] = LogCaptureError) -> LogCaptureError:
        return cls(f"[entity.{self.entity}] {message}", entity=self.entity)


def _with_settings(dsn: str, settings: dict[str, str]) -> str:
    """The DSN with `options` carrying `settings` (after any options it already has)."""
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    extra = " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in settings.items())
    params["options"] = f"{params.get('options', '')} {extra}".strip()
    params.setdefault("connect_timeout", "5")
    params.setdefault("application_name", "cdc-pipeline")
    return str(psycopg2.extensions.make_dsn(**params))


def replication_connection(capture: Capture) -> Any:
    """A logical replication connection (a walsender) with the text settings fixed."""
    import psycopg2
    import psycopg2.extras

    try:
        return psycopg2.connect(
            _with_settings(capture.dsn, READ_SETTINGS),
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
        )
    except psycopg2.OperationalError as exc:
        text = str(exc).strip()
        if "replication role" in text or "pg_hba.conf" in text:
            raise capture.error(
                f"cannot open a replication connection for slot {capture.name} of table"
                f" {capture.qualified} at {mask_dsn(capture.dsn)}: {text}. The role needs"
                " REPLICATION (ALTER ROLE <role> REPLICATION;) and pg_hba.conf a `replication`"
                " line for this client (host replication <role> <address> <method>)"
            ) from exc
        raise PostgresSourceError(
            f"PostgreSQL at {mask_dsn(capture.dsn)} (CDC_POSTGRES_DSN) is unreachable for"
            f" replication: {text}",
            entity=capture.entity,
            retriable=True,
        ) from exc


def fetchone(conn: Any, query: Any, params: Sequence[Any] = ()) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()


# -- publication and slot -----------------------------------------------------------------------


def ensure_publication(conn: Any, capture: Capture) -> bool:
    """CREATE PUBLICATION for the table unless it exists; True when it was created."""
    from psycopg2 import sql

    if fetchone(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", (capture.name,)):
        return False
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(capture.name), capture.table_sql()
            )
        )
    return True


def create_slot(capture: Capture) -> int:
    """Create the pgoutput slot over the replication protocol; returns its consistent point.

    NOEXPORT_SNAPSHOT: the first load reads its chunks in snapshots of their own, and an
    exported snapshot would live only as long as this connection stayed open and idle.
    """
    import psycopg2
    from psycopg2 import sql

    conn = replication_connection(capture)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT").format(
                    sql.Identifier(capture.name)
                )
            )
            return parse_lsn(cur.fetchone()[1])
    except psycopg2.Error as exc:
        raise capture.error(
            f"cannot create replication slot {capture.name} for table {capture.qualified}:"
            f" {str(exc).strip()}"
        ) from exc
    finally:
        conn.close()


def drop_slot(conn: Any, capture: Capture) -> None:
    """Drop the slot if it exists (waits while a walsender that just let go still holds it)."""
    import psycopg2

    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            fetchone(
                conn,
                "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (capture.name,),
            )
            return
        except psycopg2.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- pin, status, acknowledgement ---------------------------------------------------------------


def pin(conn: Any) -> int:
    """An LSN below which lies every transaction committed (and visible) before this call.

    The insert position, not pg_current_wal_lsn(): the write position can lag behind commits
    made with synchronous_commit = off. Committing a transaction that has an xid then flushes
    WAL past the pin (synchronous_commit = local: never waiting for a standby), so the
    walsender, which decodes flushed WAL only, reaches it without waiting for other traffic.
    """
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL synchronous_commit = local")
            cur.execute("SELECT pg_current_wal_insert_lsn()::text, pg_current_xact_id()")
            lsn = cur.fetchone()[0]
        conn.commit()
    finally:
        conn.autocommit = True
    return parse_lsn(lsn)


@dataclass(frozen=True)
class SlotStatus:
    slot: str
    wal_status: str | None  # reserved | extended | unreserved | lost
    confirmed_flush_lsn: int | None
    lag_bytes: int | None  # WAL written since the last acknowledgement
    retained_bytes: int | None  # WAL the slot keeps on the server's disk (None once lost)
    safe_wal_size: int | None  # bytes left before max_slot_wal_keep_size invalidates it
    plugin: str
    database: str

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


_STATUS = """
SELECT slot_name, wal_status, confirmed_flush_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
       safe_wal_size, plugin, database
FROM pg_replication_slots WHERE slot_name = %s
"""


def slot_status(conn: Any, capture: Capture) -> SlotStatus | None:
    """The slot's lag and retained WAL; None when it does not exist."""
    row = fetchone(conn, _STATUS, (capture.name,))
    if row is None:
        return None
    name, wal_status, flushed, lag, retained, safe, plugin, database = row
    flushed_lsn = parse_lsn(flushed) if flushed else None
    return SlotStatus(name, wal_status, flushed_lsn, lag, retained, safe, plugin, database)


def acknowledge(conn: Any, capture: Capture, lsn: int) -> None:
    """Move the slot's confirmed_flush_lsn up to `lsn` (a loaded batch's end); never back.

    pg_replication_slot_advance over a normal connection: synchronous, so the slot has moved
    when it returns. It refuses while a walsender holds the slot, which also happens for a
    moment after a reader closed its connection: wait. An LSN in the future would be clamped to
    the flush position, silently skipping changes: only loaded positions come here.
    """
    import psycopg2

    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        status = slot_status(conn, capture)
        if status is None or status.lost:
            raise capture.error(
                f"replication slot {capture.name} of table {capture.qualified} is"
                f" {'lost' if status else 'missing'}; the next batch re-reads the table",
                SlotLostError,
            )
        if (status.confirmed_flush_lsn or 0) >= lsn:
            return
        try:
            fetchone(
                conn,
                "SELECT end_lsn FROM pg_replication_slot_advance(%s, %s::pg_lsn)",
                (capture.name, format_lsn(lsn)),
            )
            return
        except psycopg2.errors.ObjectInUse as exc:
            if time.monotonic() > deadline:
                raise capture.error(
                    f"cannot acknowledge slot {capture.name}: {str(exc).strip()} (another"
                    " reader holds it: see pg_stat_replication)"
                ) from exc
            time.sleep(0.1)
        except psycopg2.errors.ObjectNotInPrerequisiteState:
            continue  # moved past `lsn` meanwhile, or lost: look again
