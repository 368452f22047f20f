"""Pure decoder of PostgreSQL's `pgoutput` logical replication messages, protocol version 1.

No I/O: `decode(payload)` turns the payload of one XLogData message (what psycopg2's
`ReplicationMessage.payload` holds with `decode=False`) into a small dataclass. Column values stay
the server's text output as `bytes`: decoding UTF-8 and parsing numbers per value in Python would
cost more than the whole protocol walk, while Arrow does both in C++ over a whole column
(`pg_changes`). This module is the hot path of log-based capture, so tuples are walked with
precompiled `struct` unpackers and slices, and the per-change dataclasses use `slots` without
`frozen` (a frozen dataclass costs about 2.5x more to build).

Message layouts: https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_U64 = struct.Struct("!Q").unpack_from
_BEGIN = struct.Struct("!QqI").unpack_from
_COMMIT = struct.Struct("!BQQq").unpack_from
_RELATION_HEAD = struct.Struct("!I").unpack_from
_ATTR_TAIL = struct.Struct("!Ii").unpack_from
_TRUNCATE_HEAD = struct.Struct("!IB").unpack_from
_MESSAGE_HEAD = struct.Struct("!BQ").unpack_from

_TEXT: Final = 0x74  # 't'
_NULL: Final = 0x6E  # 'n'
_TOAST: Final = 0x75  # 'u'
_BINARY: Final = 0x62  # 'b' (only with the `binary` option, which this project does not use)


class ProtocolError(ValueError):
    """The payload is not a pgoutput v1 message this decoder understands."""


class _Unchanged:
    """Type of `UNCHANGED`; a class so the marker has a readable repr and survives copying."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()
"""An unchanged TOASTed value ('u'): the server did not send it; take the previous version's."""

Value: TypeAlias = bytes | _Unchanged | None
Tuple: TypeAlias = tuple[Value, ...]
OldKind: TypeAlias = Literal["K", "O"] | None  # 'K' old key only, 'O' whole old row (FULL)


def to_datetime(us: int) -> datetime:
    """Microseconds since the Unix epoch -> aware UTC datetime (exact, no float rounding)."""
    return _UNIX_EPOCH + timedelta(microseconds=us)


def format_lsn(lsn: int) -> str:
    """64-bit LSN -> PostgreSQL's text form `X/X`."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """PostgreSQL's `X/X` LSN text -> 64-bit integer (comparable, subtractable)."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(slots=True)
class Begin:
    """Start of a transaction; sent at commit time, so `final_lsn` is already known."""

    final_lsn: int  # LSN of the commit record (== Commit.commit_lsn)
    commit_time_us: int  # microseconds since the Unix epoch
    xid: int  # top-level transaction id (32 bits)


@dataclass(slots=True)
class Commit:
    """End of a transaction."""

    flags: int
    commit_lsn: int  # start of the commit record
    end_lsn: int  # end of the commit record
    commit_time_us: int


@dataclass(slots=True)
class Origin:
    """The transaction was replayed from another node (replication origin `name`)."""

    commit_lsn: int
    name: str


@dataclass(slots=True, frozen=True)
class Column:
    """One column of a Relation message (dropped and generated columns are never sent)."""

    name: str
    type_oid: int
    type_modifier: int  # atttypmod, -1 when none; numeric(p, s) is ((p << 16) | s) + 4
    is_key: bool  # part of the replica identity (every column under REPLICA IDENTITY FULL)


@dataclass(slots=True, frozen=True)
class Relation:
    """A table's shape, sent before its first change in a session and again after it changes.

    Tuples of later changes to `relation_id` have exactly `len(columns)` values, in this order.
    """

    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default (primary key), 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Names of the replica identity columns, in table order."""
        return tuple(c.name for c in self.columns if c.is_key)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(slots=True, frozen=True)
class Type:
    """Name of a non built-in data type (enum, domain, extension type) used by a later Relation."""

    type_oid: int
    namespace: str
    name: str


@dataclass(slots=True)
class Insert:
    """A new row; inserts always carry every value (never UNCHANGED)."""

    relation_id: int
    new: Tuple


@dataclass(slots=True)
class Update:
    """`old` is None unless the key changed (DEFAULT/INDEX identity) or identity is FULL.

    `unchanged` lists the positions in `new` that hold UNCHANGED (TOASTed values the update did
    not touch); it is empty for almost every update.
    """

    relation_id: int
    old: Tuple | None
    old_kind: OldKind
    new: Tuple
    unchanged: tuple[int, ...] = ()


@dataclass(slots=True)
class Delete:
    """`old` holds the key columns (others None) or, under REPLICA IDENTITY FULL, the row."""

    relation_id: int
    old: Tuple
    old_kind: OldKind


@dataclass(slots=True, frozen=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(slots=True, frozen=True)
class Message:
    """A `pg_logical_emit_message` record (sent only with the `messages` option, PG 14+)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
)


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


def decode_tuple(buf: bytes, pos: int) -> tuple[Tuple, int, tuple[int, ...]]:
    """TupleData at `pos` -> (values, position after it, indexes of UNCHANGED values).

    Text values stay bytes; 'n' becomes None, 'u' becomes UNCHANGED. The index tuple is built
    only when a 'u' occurs, so callers can test it instead of scanning every value.
    """
    (count,) = _U16(buf, pos)
    pos += 2
    values: list[Value] = [None] * count
    unchanged: list[int] | None = None
    u32 = _U32
    for i in range(count):
        kind = buf[pos]
        if kind == _TEXT or kind == _BINARY:
            start = pos + 5
            pos = start + u32(buf, pos + 1)[0]
            values[i] = buf[start:pos]
        elif kind == _NULL:
            pos += 1
        elif kind == _TOAST:
            values[i] = UNCHANGED
            pos += 1
            if unchanged is None:
                unchanged = [i]
            else:
                unchanged.append(i)
        else:
            raise ProtocolError(f"unknown tuple value kind {kind!r} at offset {pos}")
    return tuple(values), pos, (tuple(unchanged) if unchanged else ())


# One decoder per message type, each taking the whole payload (type byte included). They are
# public so a reader's hot loop can dispatch on payload[0] itself and skip decode()'s lookup.


def decode_begin(buf: bytes) -> Begin:
    final_lsn, commit_time, xid = _BEGIN(buf, 1)
    return Begin(final_lsn, commit_time + PG_EPOCH_OFFSET_US, xid)


def decode_commit(buf: bytes) -> Commit:
    flags, commit_lsn, end_lsn, commit_time = _COMMIT(buf, 1)
    return Commit(flags, commit_lsn, end_lsn, commit_time + PG_EPOCH_OFFSET_US)


def decode_origin(buf: bytes) -> Origin:
    (commit_lsn,) = _U64(buf, 1)
    name, _ = _cstring(buf, 9)
    return Origin(commit_lsn, name)


def decode_relation(buf: bytes) -> Relation:
    (relation_id,) = _RELATION_HEAD(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    identity = chr(buf[pos])
    (count,) = _U16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column, pos = _cstring(buf, pos + 1)
        type_oid, modifier = _ATTR_TAIL(buf, pos)
        pos += 8
        columns.append(Column(column, type_oid, modifier, bool(flags & 1)))
    return Relation(relation_id, namespace, name, identity, tuple(columns))


def decode_type(buf: bytes) -> Type:
    (type_oid,) = _U32(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, _ = _cstring(buf, pos)
    return Type(type_oid, namespace, name)


def decode_insert(buf: bytes) -> Insert:
    (relation_id,) = _U32(buf, 1)
    if buf[5] != 0x4E:  # 'N'
        raise ProtocolError(f"Insert without a new tuple: {buf[5:6]!r}")
    new, _, _ = decode_tuple(buf, 6)
    return Insert(relation_id, new)


def decode_update(buf: bytes) -> Update:
    (relation_id,) = _U32(buf, 1)
    marker = buf[5]
    old: Tuple | None = None
    old_kind: OldKind = None
    pos = 6
    if marker == 0x4B or marker == 0x4F:  # 'K' or 'O'
        old_kind = "K" if marker == 0x4B else "O"
        old, pos, _ = decode_tuple(buf, 6)
        marker = buf[pos]
        pos += 1
    if marker != 0x4E:
        raise ProtocolError(f"Update without a new tuple: {bytes([marker])!r}")
    new, _, unchanged = decode_tuple(buf, pos)
    return Update(relation_id, old, old_kind, new, unchanged)


def decode_delete(buf: bytes) -> Delete:
    (relation_id,) = _U32(buf, 1)
    marker = buf[5]
    if marker != 0x4B and marker != 0x4F:
        raise ProtocolError(f"Delete without an old tuple: {bytes([marker])!r}")
    old, _, _ = decode_tuple(buf, 6)
    return Delete(relation_id, old, "K" if marker == 0x4B else "O")


def decode_truncate(buf: bytes) -> Truncate:
    count, options = _TRUNCATE_HEAD(buf, 1)
    ids = struct.unpack_from(f"!{count}I", buf, 6)
    return Truncate(tuple(ids), bool(options & 1), bool(options & 2))


def decode_message(buf: bytes) -> Message:
    flags, lsn = _MESSAGE_HEAD(buf, 1)
    prefix, pos = _cstring(buf, 10)
    (size,) = _U32(buf, pos)
    return Message(bool(flags & 1), lsn, prefix, buf[pos + 4 : pos + 4 + size])


_DECODERS: Final[dict[int, Callable[[bytes], PgOutputMessage]]] = {
    ord("B"): decode_begin,
    ord("C"): decode_commit,
    ord("O"): decode_origin,
    ord("R"): decode_relation,
    ord("Y"): decode_type,
    ord("I"): decode_insert,
    ord("U"): decode_update,
    ord("D"): decode_delete,
    ord("T"): decode_truncate,
    ord("M"): decode_message,
}


def decode(payload: bytes) -> PgOutputMessage:
    """One pgoutput v1 message -> its dataclass. Raises ProtocolError on anything else.

    Stream messages (S, E, c, A) never arrive with proto_version 1, so they are rejected.
    """
    if not payload:
        raise ProtocolError("empty pgoutput message")
    decoder = _DECODERS.get(payload[0])
    if decoder is None:
        raise ProtocolError(f"unknown pgoutput message type {payload[:1]!r}")
    try:
        return decoder(payload)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"truncated or malformed {payload[:1]!r} message: {exc}") from exc


def resolve_unchanged(update: Update) -> tuple[Tuple, tuple[int, ...]]:
    """(new row, positions still UNCHANGED) after filling what a whole old row can fill.

    Under REPLICA IDENTITY FULL the old row is logged with its TOASTed values inline, so an
    update that did not touch a large value still carries it, in the old tuple: every marker
    resolves. Under DEFAULT the markers stay; only the previous version downstream knows them.
    """
    if not update.unchanged:
        return update.new, ()
    old = update.old
    if old is None or update.old_kind != "O":
        return update.new, update.unchanged
    new = list(update.new)
    for i in update.unchanged:
        new[i] = old[i]
    return tuple(new), ()


def numeric_precision_scale(type_modifier: int) -> tuple[int, int] | None:
    """numeric(p, s) typmod -> (p, s); None for unconstrained numeric."""
    if type_modifier < 4:
        return None
    packed = type_modifier - 4
    scale = ((packed & 0x7FF) ^ 0x400) - 0x400  # 11-bit signed: PostgreSQL 15 allows s < 0
    return packed >> 16, scale
