"""Changes from the slot -> Arrow record batches of the raw contract (pure; `pg_stream` reads
them, `pg_tuples` decodes their values).

Each staged row is one change: the table's columns plus `_op`, `_seq` (the batch's commit
order), `_lsn` (the commit's LSN), `_commit_ts`, `_xid`, `_unchanged` (the columns an UPDATE
left unchanged, TOASTed values the server did not send: NULL here, filled at load) and
`_old_key` (the key a moved row had). pgoutput sends the server's text; each column becomes the
Arrow type the COPY reader gives the same column (`pg_types`), so a log entity's raw columns
equal a polled one's, value for value.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import SourceError
from pipeline.core.hashing import encode_key
from pipeline.core.names import OLD_KEY, OP, SEQ, UNCHANGED
from pipeline.extract.pg_tuples import Pending, decode_columns
from pipeline.extract.pg_types import Column, arrow_type, canonical_json
from pipeline.extract.pgoutput import Relation, numeric_precision_scale

if TYPE_CHECKING:
    import pyarrow as pa

LSN, COMMIT_TS, XID = "_lsn", "_commit_ts", "_xid"
READ_OP = "read"  # a first-load row
# PostgreSQL's text of a column's values -> that column's JSON text (arrays: array_to_json)
ArraysToJson = Callable[[Column, str, list[str | None]], list[str | None]]


class ChangeError(SourceError):
    """A value from the log cannot be held in its column's type; names table and column."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An MVCC snapshot (pg_current_snapshot()): which transactions a query saw committed."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"

    def sees(self, xid: int) -> bool:
        """Whether a committed transaction with this 32-bit xid (the log's) is visible.

        The log carries 32-bit xids: widen to the 64-bit xid nearest xmax (epoch-safe). An xid
        at or above xmax started after the snapshot, so it is invisible though not in xip.
        """
        low = self.xmax & 0xFFFFFFFF
        full = self.xmax + ((xid - low + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        return full < self.xmin or (full < self.xmax and full not in self.xip)


def pg_column(name: str, udt_name: str, type_modifier: int) -> Column:
    """A Relation column as the catalog describes it (the form `pg_types` maps)."""
    precision = scale = None
    if udt_name == "numeric":
        found = numeric_precision_scale(type_modifier)
        if found is not None:
            precision, scale = found
    return Column(name, udt_name, precision, scale)


def meta_fields() -> list[pa.Field]:
    """The change columns, in the order every part of a change batch has them."""
    import pyarrow as pa

    return [
        pa.field(OP, pa.string()),
        pa.field(SEQ, pa.uint64()),
        pa.field(LSN, pa.uint64()),
        pa.field(COMMIT_TS, pa.timestamp("us", "UTC")),
        pa.field(XID, pa.uint32()),
        pa.field(UNCHANGED, pa.string()),
        pa.field(OLD_KEY, pa.string()),
    ]


def with_meta(batch: pa.RecordBatch, op: str, first_seq: int) -> pa.RecordBatch:
    """A first-load or whole re-read batch (rows, not changes) as rows of the raw contract."""
    import pyarrow as pa

    n = batch.num_rows
    fields = meta_fields()
    values = {
        OP: pa.repeat(pa.scalar(op), n),
        SEQ: pa.array(range(first_seq, first_seq + n), pa.uint64()),
        UNCHANGED: pa.repeat(pa.scalar(""), n),
    }
    arrays = [*batch.columns] + [values.get(f.name, pa.nulls(n, f.type)) for f in fields]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([*batch.schema, *fields]))


class Shape:
    """How the rows of one Relation become Arrow columns."""

    def __init__(self, relation: Relation, columns: list[Column], key: Sequence[str]) -> None:
        self.relation = relation
        self.columns = columns
        self.table = f"{relation.namespace}.{relation.name}"
        names = relation.column_names
        missing = [k for k in key if k not in names]
        if missing:
            raise ChangeError(f"table {self.table}: unique_key column(s) {missing} not in the log")
        self.key_names = tuple(key)
        self.key_positions = tuple(names.index(k) for k in key)
        self.schema = _schema(columns)

    def typed(self, i: int, text: pa.Array, arrays: ArraysToJson) -> pa.Array:
        return _typed(self.columns[i], self.table, text, arrays)


def _schema(columns: list[Column]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(c.name, arrow_type(c)) for c in columns] + meta_fields())


def _typed(column: Column, table: str, text: pa.Array, arrays: ArraysToJson) -> pa.Array:
    """The server's text of one column -> its documented Arrow type (as the COPY reader's)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target, udt = arrow_type(column), column.udt_name
    try:
        text.validate(full=True)  # UTF-8, as the COPY reader's text is
        if udt == "bool":
            return pc.equal(text, "t")
        if udt == "timestamp":
            return text.cast(pa.timestamp("us")).cast(target)
        if udt == "bytea":
            return pa.array([None if v is None else _base64(v) for v in text.to_pylist()], target)
        if udt.startswith("_") or udt in ("json", "jsonb"):
            texts = text.to_pylist()
            if udt.startswith("_"):
                texts = arrays(column, table, texts)
            return pa.array([None if v is None else canonical_json(v) for v in texts], target)
        return text if target == pa.string() else text.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise ChangeError(
            f"PostgreSQL table {table}: column {column.name!r} ({udt}) cannot be converted: {exc}"
        ) from exc


def _base64(value: str) -> str:
    """bytea text (`\\x00ff`, bytea_output = hex) -> base64, as the COPY reader stages it."""
    return base64.b64encode(bytes.fromhex(value[2:])).decode()


def _unchanged(shape: Shape, unsent: list[Any], rows: int) -> pa.Array:
    """Per row, the comma-separated names of the columns the server did not send ('' none)."""
    import pyarrow as pa

    if all(mask is None for mask in unsent):
        return pa.repeat(pa.scalar(""), rows)
    names: dict[int, list[str]] = {}
    for column, mask in zip(shape.relation.column_names, unsent, strict=True):
        if mask is not None:
            for row in mask.nonzero()[0].tolist():
                names.setdefault(row, []).append(column)
    return pa.array([",".join(names.get(row, ())) for row in range(rows)], pa.string())


def _old_keys(shape: Shape, pending: Pending, arrays: ArraysToJson) -> pa.Array:
    """`_old_key` of each row: the encoded key a moved row had, else NULL."""
    import pyarrow as pa

    out: list[str | None] = [None] * len(pending)
    if pending.moved:
        rows = sorted(pending.moved)
        olds = [pending.moved[row] for row in rows]
        columns = {
            name: shape.typed(p, pa.array([o[p] for o in olds], pa.string()), arrays)
            for name, p in zip(shape.key_names, shape.key_positions, strict=True)
        }
        encoded = encode_key(pa.table(columns), shape.key_names).to_pylist()
        for row, value in zip(rows, encoded, strict=True):
            out[row] = value
    return pa.array(out, pa.string())


def to_batch(pending: Pending, first_seq: int, arrays: ArraysToJson) -> pa.RecordBatch:
    """One record batch of changes (all of one Relation shape), values decoded column-wise."""
    import pyarrow as pa

    shape: Shape = pending.shape
    size = len(pending)
    texts, unsent = decode_columns(pending.payloads, pending.offsets, len(shape.columns))
    columns = [shape.typed(i, text, arrays) for i, text in enumerate(texts)]
    meta = [
        pa.array(pending.ops, pa.string()),
        pa.array(range(first_seq, first_seq + size), pa.uint64()),
        pa.array(pending.lsns, pa.uint64()),
        pa.array(pending.times, pa.int64()).cast(pa.timestamp("us", "UTC")),
        pa.array(pending.xids, pa.uint32()),
        _unchanged(shape, unsent, size),
        _old_keys(shape, pending, arrays),
    ]
    return pa.RecordBatch.from_arrays([*columns, *meta], schema=shape.schema)


def batches(
    pendings: Iterable[Pending], first_seq: int, arrays: ArraysToJson
) -> Iterator[pa.RecordBatch]:
    """The record batches of a read, `_seq` numbered on from `first_seq`."""
    seq = first_seq
    for pending in pendings:
        if len(pending):
            yield to_batch(pending, seq, arrays)
            seq += len(pending)
