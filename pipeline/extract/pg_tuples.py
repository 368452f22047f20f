"""pgoutput TupleData of many changes -> Arrow string columns, in a few numpy passes (pure).

Decoding tuples value by value in Python costs more than everything else a change goes
through, so the reader keeps each staged row's TupleData where it arrived (a slice of its
message, `Pending`), and a whole record batch is decoded column by column: for every row at
once, the kind byte and the big-endian length of column j give where column j + 1 starts, and
the values' bytes are gathered into one Arrow string buffer. 'n' is NULL; 'u' (a TOASTed value
the server did not send) is NULL too and reported per row and column.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.extract.pgoutput import UNCHANGED, ProtocolError, Tuple, decode_tuple

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

_TEXT, _BINARY, _NULL, _UNSENT = map(ord, "tbnu")
_LENGTH = struct.Struct("!I").pack
_COUNT = struct.Struct("!H").pack


def encode_tuple(values: Tuple) -> bytes:
    """Values back into TupleData (for the few rows the reader had to decode itself)."""
    out = [_COUNT(len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        else:
            assert isinstance(value, bytes)
            out.append(b"t" + _LENGTH(len(value)) + value)
    return b"".join(out)


class Pending:
    """The staged rows of one record batch as they came off the wire: each row's TupleData
    (message bytes and where in them the tuple starts), its operation and its commit.
    `moved[i]`: the old key tuple of row i, an insert that is the second half of a key move."""

    __slots__ = ("lsns", "moved", "offsets", "ops", "payloads", "shape", "times", "xids")

    def __init__(self, shape: Any) -> None:
        self.shape = shape
        self.payloads: list[bytes] = []
        self.offsets: list[int] = []
        self.ops: list[str] = []
        self.lsns: list[int] = []
        self.times: list[int] = []
        self.xids: list[int] = []
        self.moved: dict[int, Tuple] = {}

    def __len__(self) -> int:
        return len(self.ops)

    def add(self, payload: bytes, offset: int, op: str, lsn: int, time: int, xid: int) -> None:
        self.payloads.append(payload)
        self.offsets.append(offset)
        self.ops.append(op)
        self.lsns.append(lsn)
        self.times.append(time)
        self.xids.append(xid)

    def add_row(
        self, values: Tuple, op: str, lsn: int, time: int, xid: int, moved: Tuple | None = None
    ) -> None:
        if moved is not None:
            self.moved[len(self.ops)] = moved
        self.add(encode_tuple(values), 0, op, lsn, time, xid)

    def values(self, row: int) -> Tuple:
        """One row decoded in Python (for the rare question about a single row)."""
        return decode_tuple(self.payloads[row], self.offsets[row])[0]

    def select(self, keep: Sequence[bool]) -> Pending:
        """The rows `keep` marks, in order."""
        out = Pending(self.shape)
        for row, kept in enumerate(keep):
            if kept:
                if row in self.moved:
                    out.moved[len(out.ops)] = self.moved[row]
                out.add(self.payloads[row], self.offsets[row], self.ops[row], self.lsns[row],
                        self.times[row], self.xids[row])  # fmt: skip
        return out


def decode_columns(
    payloads: Sequence[bytes], offsets: Sequence[int], columns: int
) -> tuple[list[pa.Array], list[np.ndarray | None]]:
    """Every row's TupleData -> one Arrow string array per column, and per column a mask of
    the rows whose value was not sent ('u'), or None when none was."""
    import numpy as np

    n = len(payloads)
    sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    ends = starts + sizes
    buf = np.frombuffer(b"".join(payloads) + bytes(8), dtype=np.uint8)
    pos = starts + np.fromiter(offsets, dtype=np.int64, count=n)
    try:
        counts = (buf[pos].astype(np.int64) << 8) | buf[pos + 1]
        if n and (counts != columns).any():
            raise ProtocolError(
                f"TupleData with {set(counts.tolist())} columns, expected {columns}"
            )
        pos = pos + 2
        texts, unsent = [], []
        for _ in range(columns):
            text, missing, pos = _column(buf, pos, n)
            texts.append(text)
            unsent.append(missing)
        if n and (pos > ends).any():
            raise ProtocolError("TupleData runs past the end of its message")
    except IndexError as exc:
        raise ProtocolError(f"truncated TupleData: {exc}") from exc
    return texts, unsent


def _column(buf: np.ndarray, pos: np.ndarray, n: int) -> tuple[pa.Array, Any, np.ndarray]:
    """One column of every row: its string array, its unsent mask, the next column's position."""
    import numpy as np
    import pyarrow as pa

    kind = buf[pos]
    text = (kind == _TEXT) | (kind == _BINARY)
    nulls = kind == _NULL
    unsent = kind == _UNSENT
    if not (text | nulls | unsent).all():
        bad = int(kind[~(text | nulls | unsent)][0])
        raise ProtocolError(f"unknown tuple value kind {bytes([bad])!r}")
    length = buf[pos[:, None] + np.arange(1, 5)].astype(np.int64)
    size = np.where(text, (length[:, 0] << 24) | (length[:, 1] << 16) | (length[:, 2] << 8)
                    | length[:, 3], 0)  # fmt: skip
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(size, out=bounds[1:])
    if bounds[-1] >= 1 << 31:
        raise ProtocolError("a record batch of more than 2 GiB of one column's text")
    total = int(bounds[-1])
    gather = np.repeat(pos + 5 - bounds[:-1], size) + np.arange(total, dtype=np.int64)
    data = buf[gather]
    validity = None if text.all() else pa.py_buffer(np.packbits(text, bitorder="little"))
    array = pa.StringArray.from_buffers(
        n, pa.py_buffer(bounds.astype(np.int32)), pa.py_buffer(data), validity
    )
    return array, (unsent if unsent.any() else None), np.where(text, pos + 5 + size, pos + 1)
