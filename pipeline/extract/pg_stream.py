"""Reading a logical slot: every transaction that committed in [start, pin), without moving it.

`START_REPLICATION ... LOGICAL start (proto_version '1', publication_names ...)` on a
replication connection, then a `read_message()` loop (not `consume_stream()`: its callback never
sees keepalives, so it could not stop at an idle pin, and it sends status updates). The read
stops as soon as everything below the pin has arrived: at a Begin or Commit past it, or at a
keepalive whose `wal_end` reached it, which is what ends a read on an idle server. The batch is
"the transactions whose commit record starts below the pin", the server's own rule when a slot
restarts at an LSN, so the next batch, started at the pin, gets exactly the rest.

A TRUNCATE of the table ends the read after its transaction (`truncated`), so the next batch
can re-read the table whole: a truncate is never applied as if it had not happened.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from pipeline.extract import pgoutput
from pipeline.extract.pg_capture import (
    BUSY_SECONDS,
    NO_STATUS_UPDATES,
    Capture,
    LogCaptureError,
    SlotLostError,
    replication_connection,
)
from pipeline.extract.pg_changes import Shape
from pipeline.extract.pg_tuples import Pending
from pipeline.extract.pgoutput import Relation, format_lsn

IDLE_SECONDS: Final = 600.0
# When the socket is empty, wait a few ms before select(): a reader that wakes for every
# message makes the walsender send() each one alone; letting them pile up halves its CPU.
_NAP_SECONDS: Final = 0.005
_POLL_SECONDS: Final = 1.0
_INSERT, _UPDATE, _DELETE, _BEGIN, _COMMIT, _RELATION, _TRUNCATE, _NEW = map(ord, "IUDBCRTN")
relation_of = struct.Struct("!I").unpack_from
# (xid, commit LSN) -> whether the transaction is already loaded and must be passed over
Skip = Callable[[int, int], bool]


class SlotReader:
    """The changes of one batch from the slot, in commit order, as `Pending` record batches of
    at most `batch_rows` rows of one table shape each; iterate once.

    A primary-key UPDATE becomes a delete of the old key and an insert of the new one (in the
    same batch). `end` is where the batch ends once the read is over: the pin, or the end of the
    transaction that truncated the table.
    """

    def __init__(
        self,
        capture: Capture,
        start: int,
        pin: int,
        shape_of: Callable[[Relation], Shape],
        batch_rows: int,
        skip: Skip | None = None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.capture, self.start, self.pin, self.skip = capture, start, pin, skip
        self.shape_of, self.batch_rows = shape_of, max(1, batch_rows)
        self.idle_seconds = idle_seconds
        self.end = pin
        self.truncated = False

    def __iter__(self) -> Iterator[Pending]:
        conn, cur = self._start()
        try:
            yield from self._stream(cur)
        finally:
            conn.close()

    def _start(self) -> tuple[Any, Any]:
        """START_REPLICATION on a new connection, waiting while a previous reader's walsender
        still holds the slot (it needs a moment to notice its client is gone)."""
        import psycopg2

        capture = self.capture
        options = {"proto_version": "1", "publication_names": capture.name}
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            conn = replication_connection(capture)
            try:
                cur = conn.cursor()
                cur.start_replication(
                    slot_name=capture.name,
                    decode=False,
                    start_lsn=self.start,
                    status_interval=NO_STATUS_UPDATES,
                    options=options,
                )
                return conn, cur
            except psycopg2.errors.ObjectInUse as exc:
                conn.close()
                if time.monotonic() > deadline:
                    raise self._error(exc) from exc
                time.sleep(0.1)
            except psycopg2.Error as exc:
                conn.close()
                raise self._error(exc) from exc

    def _error(self, exc: Exception) -> LogCaptureError:
        text = (getattr(exc, "pgerror", None) or str(exc)).strip()
        capture = self.capture
        if "invalidated" in text or "can no longer get changes" in text:
            return capture.error(f"replication slot {capture.name} is lost: {text}", SlotLostError)
        return capture.error(
            f"cannot read replication slot {capture.name} of table {capture.qualified}: {text}"
        )

    def _idle(self, cur: Any, since: float) -> None:
        if time.monotonic() - since > self.idle_seconds:
            raise self.capture.error(
                f"slot {self.capture.name}: nothing received for {self.idle_seconds:.0f} s at"
                f" {format_lsn(cur.wal_end)}, waiting for {format_lsn(self.pin)} (see"
                " pg_stat_replication for its walsender)"
            )
        time.sleep(_NAP_SECONDS)
        select.select([cur], [], [], _POLL_SECONDS)

    def _stream(self, cur: Any) -> Iterator[Pending]:
        import psycopg2

        relations: dict[int, Relation] = {}
        shapes: dict[int, Shape] = {}
        pending: Pending | None = None
        in_transaction = skipping = False
        commit_lsn = commit_time = xid = 0
        pin, read, rows = self.pin, cur.read_message, self.batch_rows
        since: float | None = None  # when the socket last ran dry (None: data since)
        while True:
            try:
                msg = read()
            except psycopg2.Error as exc:
                raise self._error(exc) from exc
            if msg is None:
                if not in_transaction and cur.wal_end >= pin:
                    break
                since = since or time.monotonic()
                self._idle(cur, since)
                continue
            since = None
            payload = msg.payload
            kind = payload[0]
            if kind == _INSERT or kind == _UPDATE or kind == _DELETE:
                if skipping:
                    continue
                shape = shapes[relation_of(payload, 1)[0]]
                if pending is None or pending.shape is not shape or len(pending) >= rows:
                    if pending is not None and len(pending):
                        yield pending
                    pending = Pending(shape)
                if kind == _DELETE:  # the old key (or row) is the tuple at 6
                    pending.add(payload, 6, "delete", commit_lsn, commit_time, xid)
                elif payload[5] == _NEW:  # no old tuple: every insert, almost every update
                    op = "update" if kind == _UPDATE else "insert"
                    pending.add(payload, 6, op, commit_lsn, commit_time, xid)
                else:
                    _update(pending, payload, commit_lsn, commit_time, xid)
            elif kind == _BEGIN:
                begin = pgoutput.decode_begin(payload)
                if begin.final_lsn >= pin:
                    break
                in_transaction = True
                commit_lsn, commit_time, xid = begin.final_lsn, begin.commit_time_us, begin.xid
                skipping = self.skip is not None and self.skip(xid, commit_lsn)
            elif kind == _COMMIT:
                in_transaction = False
                end = pgoutput.decode_commit(payload).end_lsn
                if self.truncated:
                    self.end = end
                    break
                if end >= pin:
                    break
            elif kind == _RELATION:
                relation = pgoutput.decode_relation(payload)
                self._check_relation(relation)
                if relations.get(relation.relation_id) != relation:
                    relations[relation.relation_id] = relation
                    shapes[relation.relation_id] = self.shape_of(relation)
            elif kind == _TRUNCATE:
                if not skipping:
                    pgoutput.decode_truncate(payload)
                    self.truncated = True
            else:
                pgoutput.decode(payload)  # Origin, Type: nothing to act on; still validated
        if pending is not None and len(pending):
            yield pending

    def _check_relation(self, relation: Relation) -> None:
        capture = self.capture
        if (relation.namespace, relation.name) != (capture.schema, capture.table):
            raise capture.error(
                f"publication {capture.name} also publishes {relation.namespace}.{relation.name};"
                f" it must hold table {capture.qualified} alone"
            )


def _update(pending: Pending, payload: bytes, commit_lsn: int, commit_time: int, xid: int) -> None:
    """An UPDATE that carries its old key or row: one update, or, when it moved the row to
    another key, a delete of the old key and an insert of the new one (whose unsent values are
    the old key's). Under REPLICA IDENTITY FULL unsent values are taken from the old row."""
    u = pgoutput.decode_update(payload)
    new, _ = pgoutput.resolve_unchanged(u) if u.unchanged else (u.new, ())
    old, key = u.old, pending.shape.key_positions
    if old is not None and any(old[p] != new[p] for p in key):
        pending.add(payload, 6, "delete", commit_lsn, commit_time, xid)
        pending.add_row(new, "insert", commit_lsn, commit_time, xid, moved=old)
    else:
        pending.add_row(new, "update", commit_lsn, commit_time, xid)
