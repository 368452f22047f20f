"""PostgreSQL log-based capture (`mode = log`): every committed change, from a logical slot.

One batch, by what the last loaded batch left (`Position`, the saved `upper`):

- none yet: set the capture up (checks, publication, then slot), read the table in resumable
  chunks, pin, and read the slot from its start up to the pin (`pg_first_load`);
- a slot the server invalidated, or that is gone: alert, make a new slot, re-read the table
  whole (`_op = scan`: diffed against history by hash, deletes found);
- after a TRUNCATE: re-read the table whole on the same slot;
- otherwise: pin, and read every change committed in [position, pin).

The slot is acknowledged (confirmed flush) only once the batch's raw load has committed, and
again at the start of the next read: reading always starts at the saved position, so a crash
anywhere re-reads, and nothing is read twice once loaded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import notify
from pipeline.core.hashing import with_check_hash
from pipeline.core.manifest import Manifest
from pipeline.core.names import RAW_META_COLUMNS, batch_prefix
from pipeline.extract.base import CaptureStatus, Read
from pipeline.extract.pg_capture import (
    Capture,
    SlotLostError,
    acknowledge,
    create_slot,
    drop_slot,
    ensure_publication,
    pin,
    slot_status,
)
from pipeline.extract.pg_capture_checks import require_capture
from pipeline.extract.pg_changes import Shape, Snapshot, batches, pg_column
from pipeline.extract.pg_first_load import (
    FirstLoadFilter,
    Stager,
    log_columns,
    read_chunks,
    scan,
)
from pipeline.extract.pg_stream import SlotReader
from pipeline.extract.pg_tuples import Pending
from pipeline.extract.pg_types import Column
from pipeline.extract.pgoutput import Relation, format_lsn, parse_lsn
from pipeline.extract.postgres import PostgresSource, configure, connect
from pipeline.state import failpoint

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("pipeline")
_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")
MIB = 1 << 20
_TYPES = """
SELECT t.oid, b.typname, CASE WHEN t.typtype = 'd' THEN t.typtypmod END,
       format_type(b.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod END)
FROM pg_type t
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE t.oid = ANY(%s)
"""


@dataclass(frozen=True)
class Position:
    """Where a loaded batch ended: the LSN the next read starts at (every transaction that
    committed below it is loaded), plus what the next batch must do first.

    As text: the LSN alone (`0/16B3748`), or followed by JSON when `resync` (the next batch
    re-reads the table: a TRUNCATE) or `skip`/`below` (it passes over the transactions a whole
    re-read's snapshot saw, among those committed below `below`) is set.
    """

    lsn: int
    resync: str | None = None
    skip: Snapshot | None = None
    below: int | None = None

    def text(self) -> str:
        extra: dict[str, str] = {}
        if self.resync:
            extra["resync"] = self.resync
        if self.skip is not None and self.below is not None:
            extra |= {"skip": str(self.skip), "below": format_lsn(self.below)}
        lsn = format_lsn(self.lsn)
        return f"{lsn} {json.dumps(extra, sort_keys=True)}" if extra else lsn

    @classmethod
    def parse(cls, text: str | None) -> Position | None:
        """None before the first log batch, and after a batch of another mode (a watermark):
        an entity switched to `mode = log` starts with a first load."""
        lsn, _, rest = (text or "").partition(" ")
        if not _LSN.fullmatch(lsn):
            return None
        extra = json.loads(rest) if rest else {}
        skip, below = extra.get("skip"), extra.get("below")
        return cls(
            parse_lsn(lsn),
            extra.get("resync"),
            Snapshot.parse(skip) if skip is not None else None,
            parse_lsn(below) if below is not None else None,
        )

    def skips(self, xid: int, commit_lsn: int) -> bool:
        """Whether a transaction is in the whole re-read already (its snapshot saw it)."""
        assert self.skip is not None and self.below is not None
        return commit_lsn < self.below and self.skip.sees(xid)


class PostgresLogSource(PostgresSource):
    """A table's committed changes, read from its own logical replication slot."""

    modes: ClassVar[tuple[str, ...]] = ("log",)

    @property
    def capture(self) -> Capture:
        cfg, entity = self.settings, self.entity
        return Capture.of(
            entity.name, cfg.database, entity.object_name, entity.unique_key, cfg.postgres_dsn
        )

    def read(self) -> Read:
        capture = self.capture
        position = Position.parse(self.context.position)
        conn = connect(capture.dsn)
        try:
            configure(conn)
            require_capture(conn, capture)
            self.check_table_columns([c.name for c in log_columns(conn, capture)])
            if position is None:
                return self._first_load(conn, capture)
            status = slot_status(conn, capture)
            if status is None or status.lost or (status.confirmed_flush_lsn or 0) > position.lsn:
                return self._lost(conn, capture, status)
            acknowledge(conn, capture, position.lsn)  # a crash may have come between load and ack
            if position.resync:
                return self._whole(capture, position.lsn, f"after a {position.resync}")
            skip = position.skips if position.skip is not None else None
            types = _Types(capture)
            rows = self.settings.batch_rows
            reader = SlotReader(capture, position.lsn, pin(conn), types.shape, rows, skip)
            return self._changes(reader, reader, types, first_seq=0)
        finally:
            conn.close()

    def _first_load(self, conn: Any, capture: Capture) -> Read:
        """Publication, then slot, then the chunks (resumed), the pin, and the slot's changes
        the chunks did not see."""
        ensure_publication(conn, capture)
        status = slot_status(conn, capture)
        if status is not None and status.lost:
            drop_slot(conn, capture)
            status = None
        start = create_slot(capture) if status is None else (status.confirmed_flush_lsn or 0)
        chunks = read_chunks(capture, self._stager(), self._prefix)
        types = _Types(capture)
        reader = SlotReader(capture, start, pin(conn), types.shape, self.settings.batch_rows)
        events = FirstLoadFilter(capture, chunks).filtered(reader)
        first_seq = chunks[-1].first_seq + chunks[-1].manifest.rows
        read = self._changes(events, reader, types, first_seq)
        read.staged = [c.manifest for c in chunks]
        log.info("%s: first load of %s in %d chunk(s)", self.entity.name, capture.qualified,
                 len(chunks))  # fmt: skip
        return read

    def _lost(self, conn: Any, capture: Capture, status: Any) -> Read:
        """Alert, then a new slot and one whole re-read: the changes in between are gone."""
        why = (
            "is missing" if status is None else "was invalidated by the server (wal_status = lost)"
        )
        if status is not None and not status.lost:
            why = "was moved past the loaded position by someone else"
        text = (
            f"[entity.{self.entity.name}] replication slot {capture.name} of table"
            f" {capture.qualified} {why}: its changes since the last batch cannot be read. This"
            " batch re-reads the table whole on a new slot (history diffed by hash, deletes"
            " found); raise max_slot_wal_keep_size or run batches more often to avoid it"
        )
        log.warning("%s", text)
        notify.send(self.context.batch_id, f"Extract {self.entity.name}", text)
        drop_slot(conn, capture)
        ensure_publication(conn, capture)
        return self._whole(capture, create_slot(capture), "on a new slot")

    def _whole(self, capture: Capture, start: int, why: str) -> Read:
        """The table in one snapshot; the next batch passes over what that snapshot saw."""
        snapshot, pinned, rows = scan(capture, self.settings.batch_rows)
        log.info("%s: re-reading %s whole %s", self.entity.name, capture.qualified, why)
        upper = Position(start, skip=snapshot, below=pinned).text()
        return Read(rows, {"lower": format_lsn(start), "upper": upper}, whole=True)

    def _changes(
        self, events: Iterable[Pending], reader: SlotReader, types: _Types, first_seq: int
    ) -> Read:
        window: dict[str, str | None] = {
            "lower": format_lsn(reader.start),
            "upper": format_lsn(reader.pin),
        }
        rows = batches(events, first_seq, types.arrays_to_json)
        hashed = (with_check_hash(b, self.entity.check_cols, RAW_META_COLUMNS) for b in rows)
        return Read(_completing(hashed, reader, window, types), window, whole=False)

    def _stager(self) -> Stager:
        assert self.context.store is not None, "Extract hands log sources the staging store"
        cfg, entity, batch = self.settings, self.entity, self.context.batch_id

        def manifest() -> Manifest:
            at = datetime.now(UTC).isoformat()
            return Manifest(entity.name, entity.source, entity.name, batch, at, full_scan=False)

        return Stager(
            self.context.store(), manifest, cfg.snapshot_chunk_rows, cfg.batch_rows, cfg.part_rows
        )

    @property
    def _prefix(self) -> str:
        return batch_prefix(self.entity.source, self.entity.name, self.context.batch_id)

    def acknowledge(self, position: str) -> None:
        """Move the slot to a loaded batch's end (never further)."""
        failpoint("log-before-ack", f"{self.entity.name} at {position}")
        found = Position.parse(position)
        if found is None:
            return
        capture = self.capture
        conn = connect(capture.dsn)
        try:
            configure(conn)
            acknowledge(conn, capture, found.lsn)
        except SlotLostError as exc:  # the next read finds it and re-reads the table
            log.warning("%s", exc)
        finally:
            conn.close()

    def status(self) -> list[CaptureStatus]:
        capture, entity = self.capture, self.entity.name
        limit = self.settings.slot_lag_warn_mb * MIB
        try:
            conn = connect(capture.dsn)
        except Exception as exc:
            return [CaptureStatus(entity, capture.name, "-", "-", f"unreachable: {exc}")]
        try:
            configure(conn)
            found = slot_status(conn, capture)
        finally:
            conn.close()
        if found is None:
            return [CaptureStatus(entity, capture.name, "-", "-", "no slot: made by the next run")]
        lag = "-" if found.lag_bytes is None else f"{found.lag_bytes} bytes"
        held = found.retained_bytes
        holds = f"{_mib(held)} of WAL ({found.wal_status})"
        warning = ""
        if found.lost:
            warning = "lost: the next batch re-reads the table on a new slot"
        elif (held or 0) > limit or (found.lag_bytes or 0) > limit:
            warning = f"holds more WAL than slot_lag_warn_mb = {self.settings.slot_lag_warn_mb:g}"
        elif found.wal_status in ("extended", "unreserved"):
            warning = f"wal_status {found.wal_status}: near max_slot_wal_keep_size"
        return [CaptureStatus(entity, capture.name, lag, holds, warning)]


def _mib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / MIB:.1f} MiB" if value >= MIB else f"{value / 1024:.1f} KiB"


def _completing(
    rows: Iterator[pa.RecordBatch], reader: SlotReader, window: dict[str, str | None], types: Any
) -> Iterator[pa.RecordBatch]:
    """The batches, then the window's final `upper` (a TRUNCATE ends the batch early)."""
    try:
        yield from rows
    finally:
        types.close()
    if reader.truncated:
        log.warning(
            "%s was truncated (transaction ending at %s): the batch ends there and the next"
            " one re-reads the table whole",
            reader.capture.qualified,
            format_lsn(reader.end),
        )
    window["upper"] = Position(reader.end, "truncate" if reader.truncated else None).text()


class _Types:
    """Relation columns -> the catalog's type names (one query per new shape), and arrays ->
    JSON the way COPY stages them (array_to_json on the server)."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.conn: Any = None
        self.sql_types: dict[tuple[str, str], str] = {}

    def _cursor(self) -> Any:
        if self.conn is None:
            self.conn = connect(self.capture.dsn)
            configure(self.conn)
        return self.conn.cursor()

    def shape(self, relation: Relation) -> Shape:
        oids = sorted({c.type_oid for c in relation.columns})
        with self._cursor() as cur:
            cur.execute(_TYPES, (oids,))
            found = {oid: (name, modifier, sql) for oid, name, modifier, sql in cur.fetchall()}
        columns = []
        for c in relation.columns:
            name, modifier, sql_type = found[c.type_oid]
            column = pg_column(c.name, name, c.type_modifier if modifier is None else modifier)
            self.sql_types[c.name, name] = sql_type
            columns.append(column)
        return Shape(relation, columns, self.capture.key)

    def arrays_to_json(self, column: Column, table: str, texts: list[str | None]) -> Any:
        from psycopg2 import sql

        kind = sql.SQL(self.sql_types[column.name, column.udt_name])
        query = sql.SQL(
            "SELECT array_to_json(u.v::{})::text FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, i)"
            " ORDER BY u.i"
        ).format(kind)
        with self._cursor() as cur:
            cur.execute(query, (texts,))
            return [value for (value,) in cur.fetchall()]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
