"""The COPY reader: `COPY (SELECT ...) TO STDOUT (FORMAT csv)` -> Arrow record batches.

A thread receives the COPY one row at a time (libpq's contract), cuts whole-row chunks of at
most `batch_rows` rows or CHUNK_BYTES, and hands them over a bounded queue, so memory stays flat
whatever the table size; Arrow's C++ CSV parser types each chunk (docs/postgres.md, "Which
reader"). Errors name the table and the column.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import SourceError
from pipeline.extract.pg_types import Column, canonical_json, spec

if TYPE_CHECKING:
    import pyarrow as pa


class PostgresSourceError(SourceError):
    """PostgreSQL is unreachable or a table/column is unusable; the message names it."""


CHUNK_BYTES = 16 << 20  # a chunk closes at batch_rows rows or this many bytes
QUEUE_CHUNKS = 2
_CSV_COLUMN = re.compile(r"CSV column #(\d+)")


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


def stream(
    conn: Any, statement: str, columns: list[Column], object_name: str, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Run the COPY `statement` on `conn` (closed at the end) and yield typed record batches."""
    chunks: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
    sink = _RowSink(chunks, threading.Event(), max(1, batch_rows))
    parser = _Parser(columns, object_name)
    thread = threading.Thread(
        target=_copy, args=(conn, statement, sink), name=f"copy {object_name}", daemon=True
    )
    thread.start()
    try:
        while (item := chunks.get()) is not _END:
            if isinstance(item, BaseException):
                raise PostgresSourceError(
                    f"PostgreSQL table {object_name}: read failed: {item}".strip(), retriable=True
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
        self.specs = [spec(c) for c in columns]
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
