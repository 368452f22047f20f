"""The first load of a log entity, and its whole re-reads, consistent with the slot.

**First load: chunks placed by their own snapshot** (the idea of Netflix's DBLog, with the
snapshot's xid visibility in place of watermark windows). The table is cut into chunks of
`snapshot_chunk_rows` keys, each read in a short REPEATABLE READ transaction of its own and
staged at once under `chunk=NNNNN/` of the batch, with its MVCC snapshot and its last key in its
manifest: a crash resumes after the last staged chunk. Then the batch pins an LSN and reads the
slot from its start: a change that a chunk's snapshot already saw is in that chunk's rows and is
dropped; every other change applies after the chunk rows, in commit order. For one key,
transactions become visible in the order they commit (row locks serialise them), so what a
snapshot did not see came after what it saw. Every chunk is read before the pin, so every
transaction it saw committed below the pin.

**Whole re-read** (a lost slot, a TRUNCATE): one REPEATABLE READ snapshot streams the table, and
the pin is taken after it; the next batch reads the slot from the re-read's start and passes
over the transactions that snapshot saw (`Position.skip`).

A transaction waiting for a synchronous standby is committed in WAL, so decoding may deliver it,
yet it stays invisible until the standby answers: a snapshot taken while such a transaction is
waiting is taken again a moment later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pipeline.core.manifest import Manifest
from pipeline.extract.pg_capture import Capture, pin
from pipeline.extract.pg_changes import READ_OP, Snapshot, with_meta
from pipeline.extract.pg_copy import stream
from pipeline.extract.pg_tuples import Pending
from pipeline.extract.pg_types import Column, spec
from pipeline.extract.pgoutput import Tuple
from pipeline.extract.postgres import configure, connect
from pipeline.staging import Store, manifest_exists, read_manifest, write_batch
from pipeline.state import failpoint

if TYPE_CHECKING:
    import pyarrow as pa

CHUNK_DIR: Final = "chunk="
SCAN_OP: Final = "scan"
_SYNCREP_RETRIES: Final = 50
_COLUMNS = """
SELECT column_name, udt_name, numeric_precision, numeric_scale FROM information_schema.columns
WHERE table_schema = %s AND table_name = %s AND is_generated = 'NEVER'
ORDER BY ordinal_position
"""
_SYNCREP_WAITERS = """
SELECT backend_xid::text::bigint FROM pg_stat_activity
WHERE wait_event = 'SyncRep' AND backend_xid IS NOT NULL
"""
_KEY_TYPES = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attcollation <> 0 THEN quote_ident(n.nspname) || '.' || quote_ident(c.collname)
       END
FROM pg_attribute a
LEFT JOIN pg_collation c ON c.oid = a.attcollation
LEFT JOIN pg_namespace n ON n.oid = c.collnamespace
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


def log_columns(conn: Any, capture: Capture) -> list[Column]:
    """The table's columns as the log sends them (no generated columns), in table order."""
    with conn.cursor() as cur:
        cur.execute(_COLUMNS, (capture.schema, capture.table))
        return [Column(*row) for row in cur.fetchall()]


@dataclass(frozen=True)
class Chunk:
    """One staged chunk of a first load: keys (previous chunk's upper, upper]."""

    index: int
    snapshot: Snapshot
    upper: tuple[str, ...] | None  # its last key as the server's text; None: to the end
    first_seq: int
    manifest: Manifest

    @classmethod
    def of(cls, index: int, manifest: Manifest) -> Chunk:
        window = manifest.window
        upper = window["upper"]
        return cls(
            index,
            Snapshot.parse(str(window["snapshot"])),
            tuple(json.loads(upper)) if upper is not None else None,
            int(str(window["first_seq"])),
            manifest,
        )


def chunk_subdir(index: int) -> str:
    return f"{CHUNK_DIR}{index:05d}/"


def staged_chunks(store: Store, prefix: str) -> list[Chunk]:
    """The chunks a crashed attempt of this batch staged completely (its manifest last)."""
    chunks: list[Chunk] = []
    while manifest_exists(store, prefix + chunk_subdir(len(chunks))):
        index = len(chunks)
        chunks.append(Chunk.of(index, read_manifest(store, prefix + chunk_subdir(index))))
    return chunks


@dataclass(frozen=True)
class Stager:
    """Where and how chunks are staged: the batch's store, a manifest factory, sizes."""

    store: Store
    new_manifest: Callable[[], Manifest]
    chunk_rows: int
    batch_rows: int
    part_rows: int


def read_chunks(capture: Capture, stager: Stager, prefix: str) -> list[Chunk]:
    """Every chunk of the table, resuming after those already staged for this batch."""
    chunks = staged_chunks(stager.store, prefix)
    while not chunks or chunks[-1].upper is not None:
        after = chunks[-1].upper if chunks else None
        first_seq = chunks[-1].first_seq + chunks[-1].manifest.rows if chunks else 0
        chunks.append(_stage_chunk(capture, stager, len(chunks), after, first_seq))
    return chunks


def _snapshot(conn: Any, capture: Capture) -> Snapshot:
    """Open a REPEATABLE READ snapshot that no transaction waiting for a standby is missing
    from (see the module docstring); it stays open on `conn`."""
    for _ in range(_SYNCREP_RETRIES):
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_current_snapshot()::text,"
                " current_setting('synchronous_standby_names') <> ''"
            )
            text, synchronous = cur.fetchone()
            snapshot = Snapshot.parse(text)
            if not synchronous:
                return snapshot
            cur.execute(_SYNCREP_WAITERS)
            waiting = [x for (x,) in cur.fetchall() if not snapshot.sees(x & 0xFFFFFFFF)]
        if not waiting:
            return snapshot
        conn.rollback()
        time.sleep(0.1)
    raise capture.error(
        f"reading table {capture.qualified}: transactions {waiting} stay in synchronous"
        " replication wait (SyncRep), so a snapshot cannot be placed in the log yet; check the"
        " standbys of synchronous_standby_names, then run the batch again"
    )


def _keys_sql(capture: Capture) -> Any:
    from psycopg2 import sql

    return sql.SQL(", ").join(sql.Identifier(k) for k in capture.key)


def _params(values: Sequence[str]) -> Any:
    from psycopg2 import sql

    return sql.SQL(", ").join(sql.Literal(v) for v in values)


def _upper(cur: Any, capture: Capture, after: Sequence[str] | None, rows: int) -> Any:
    """The text of the chunk's last key, or None when the rest of the table fits in it.

    ORDER BY names the table's columns: a bare name would sort by the ::text output column of
    the same name (output names win in ORDER BY), i.e. '10' before '9'.
    """
    from psycopg2 import sql

    source = sql.Identifier("source")
    keys = sql.SQL(", ").join(
        sql.SQL("{}.{}").format(source, sql.Identifier(k)) for k in capture.key
    )
    where = sql.SQL("")
    if after is not None:
        where = sql.SQL("WHERE ({}) > ({})").format(keys, _params(after))
    texts = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in capture.key)
    cur.execute(
        sql.SQL("SELECT {} FROM {} AS {} {} ORDER BY {} OFFSET %s LIMIT 1").format(
            texts, capture.table_sql(), source, where, keys
        ),
        (rows - 1,),
    )
    row = cur.fetchone()
    return tuple(row) if row is not None else None


def _copy_sql(conn: Any, capture: Capture, columns: list[Column], after: Any, upper: Any) -> str:
    from psycopg2 import sql

    keys, bounds = _keys_sql(capture), []
    if after is not None:
        bounds.append(sql.SQL("({}) > ({})").format(keys, _params(after)))
    if upper is not None:
        bounds.append(sql.SQL("({}) <= ({})").format(keys, _params(upper)))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(bounds) if bounds else sql.SQL("")
    select = sql.SQL("SELECT {} FROM {}{}").format(
        sql.SQL(", ").join(spec(c).expr for c in columns), capture.table_sql(), where
    )
    return str(sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(select).as_string(conn))


def _numbered(
    batches: Iterator[pa.RecordBatch], op: str, first_seq: int
) -> Iterator[pa.RecordBatch]:
    seq = first_seq
    for batch in batches:
        yield with_meta(batch, op, seq)
        seq += batch.num_rows


def _stage_chunk(capture: Capture, stager: Stager, index: int, after: Any, first_seq: int) -> Chunk:
    """Read one chunk in a snapshot of its own and stage it, its manifest last."""
    conn = connect(capture.dsn)
    try:
        configure(conn)
        snapshot = _snapshot(conn, capture)
        columns = log_columns(conn, capture)
        with conn.cursor() as cur:
            upper = _upper(cur, capture, after, stager.chunk_rows)
        statement = _copy_sql(conn, capture, columns, after, upper)
    except BaseException:
        conn.close()
        raise
    rows = stream(conn, statement, columns, capture.qualified, stager.batch_rows)
    manifest = stager.new_manifest()
    manifest.window = {
        "snapshot": str(snapshot),
        "upper": json.dumps(list(upper)) if upper is not None else None,
        "first_seq": str(first_seq),
    }
    numbered = _numbered(rows, READ_OP, first_seq)
    write_batch(stager.store, manifest, numbered, stager.part_rows, chunk_subdir(index))
    failpoint("log-first-load-chunk", f"{capture.qualified} chunk {index}")
    return Chunk.of(index, manifest)


def scan(capture: Capture, batch_rows: int) -> tuple[Snapshot, int, Iterator[pa.RecordBatch]]:
    """A whole re-read: (its snapshot, a pin taken after it, its rows as `scan` rows)."""
    conn = connect(capture.dsn)
    try:
        configure(conn)
        snapshot = _snapshot(conn, capture)
        columns = log_columns(conn, capture)
        statement = _copy_sql(conn, capture, columns, None, None)
        pinning = connect(capture.dsn)
        try:
            configure(pinning)
            pinned = pin(pinning)
        finally:
            pinning.close()
    except BaseException:
        conn.close()
        raise
    rows = stream(conn, statement, columns, capture.qualified, batch_rows)
    return snapshot, pinned, _numbered(rows, SCAN_OP, 0)


class FirstLoadFilter:
    """Drops the log's changes that the chunk holding their key already saw."""

    def __init__(self, capture: Capture, chunks: list[Chunk]) -> None:
        self.capture = capture
        self.snapshots = [c.snapshot for c in chunks]
        self.uppers = [c.upper for c in chunks[:-1] if c.upper is not None]
        self.verdicts: dict[int, bool | None] = {}
        self.conn: Any = None

    def verdict(self, xid: int) -> bool | None:
        """Keep (True), drop (False), or it depends on the key's chunk (None)."""
        if xid not in self.verdicts:
            seen = {s.sees(xid) for s in self.snapshots}
            self.verdicts[xid] = None if len(seen) > 1 else not seen.pop()
        return self.verdicts[xid]

    def keep(self, keys: list[tuple[bytes | None, ...]], xids: list[int]) -> list[bool]:
        """Whether each change whose verdict depends on its key's chunk is kept."""
        if self.conn is None:
            self.conn = connect(self.capture.dsn)
            configure(self.conn)  # key texts are parsed with the settings they were made with
        chunks = locate(self.conn, self.capture, self.uppers, keys)
        return [not self.snapshots[i].sees(x) for x, i in zip(xids, chunks, strict=True)]

    def filtered(self, pendings: Iterable[Pending]) -> Iterator[Pending]:
        """The slot's changes minus those the chunk holding their key saw; a change whose
        verdict depends on its key's chunk is looked up (one query per record batch)."""
        try:
            for pending in pendings:
                verdicts = [self.verdict(xid) for xid in pending.xids]
                asked = [row for row, verdict in enumerate(verdicts) if verdict is None]
                if asked:
                    positions = pending.shape.key_positions
                    keys = [_key(pending.values(row), positions) for row in asked]
                    kept = self.keep(keys, [pending.xids[row] for row in asked])
                    for row, keep in zip(asked, kept, strict=True):
                        verdicts[row] = keep
                yield pending if all(verdicts) else pending.select([bool(v) for v in verdicts])
        finally:
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _key(values: Tuple, positions: Sequence[int]) -> tuple[bytes | None, ...]:
    return tuple(v if isinstance(v, bytes) else None for v in (values[p] for p in positions))


def locate(
    conn: Any, capture: Capture, uppers: list[tuple[str, ...]], keys: list[Any]
) -> list[int]:
    """Which chunk holds each key: how many chunk uppers it is above, as PostgreSQL orders
    the key (its types and collations, as the chunk query's keyset did)."""
    from psycopg2 import sql

    with conn.cursor() as cur:
        cur.execute(_KEY_TYPES, (str(capture.table_sql().as_string(conn)),))
        types = {name: (kind, collation) for name, kind, collation in cur.fetchall()}
        n = len(capture.key)
        names = [sql.Identifier(f"c{i}") for i in range(n)]

        def typed(alias: str) -> Any:
            parts = []
            for i, k in enumerate(capture.key):
                kind, collation = types[k]
                part = sql.SQL("{}.{}::{}").format(sql.Identifier(alias), names[i], sql.SQL(kind))
                if collation:
                    part = sql.SQL("{} COLLATE {}").format(part, sql.SQL(collation))
                parts.append(part)
            return sql.SQL("({})").format(sql.SQL(", ").join(parts))

        arrays = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(n))
        cols = sql.SQL(", ").join(names)
        query = sql.SQL(
            "SELECT (SELECT count(*) FROM unnest({a}) AS f({c}) WHERE {k} > {f})"
            " FROM unnest({a}) WITH ORDINALITY AS k({c}, i) ORDER BY k.i"
        ).format(a=arrays, c=cols, k=typed("k"), f=typed("f"))
        upper_columns = [[u[i] for u in uppers] for i in range(n)]
        key_columns = [[None if v is None else v.decode() for v in (k[i] for k in keys)]
                       for i in range(n)]  # fmt: skip
        cur.execute(query, [*upper_columns, *key_columns])
        return [int(count) for (count,) in cur.fetchall()]
