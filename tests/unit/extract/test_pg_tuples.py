"""The column-wise TupleData decoder (`pg_tuples`) equals the per-value one (`pgoutput`), on
the messages captured from PostgreSQL 15 and on drawn tuples; malformed tuples are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.extract.pg_tuples import Pending, decode_columns, encode_tuple
from pipeline.extract.pgoutput import UNCHANGED, ProtocolError, decode_tuple
from tests.unit.extract.test_pgoutput import CAPTURED, payload

VALUE = st.one_of(st.none(), st.just(UNCHANGED), st.text(max_size=40).map(str.encode))


def columnwise(payloads: list[bytes], offsets: list[int], count: int) -> list[tuple]:
    texts, unsent = decode_columns(payloads, offsets, count)
    rows = []
    for row in range(len(payloads)):
        values = []
        for text, mask in zip(texts, unsent, strict=True):
            if mask is not None and mask[row]:
                values.append(UNCHANGED)
            else:
                value = text[row].as_py()
                values.append(None if value is None else value.encode())
        rows.append(tuple(values))
    return rows


def test_captured_inserts_updates_and_deletes() -> None:
    messages = [payload(text) for text in CAPTURED if payload(text)[:1] in (b"I", b"U", b"D")]
    simple = [m for m in messages if m[5:6] == b"N" or m[:1] == b"D"]
    assert len(simple) == 6  # 3 inserts, 1 update without old tuple, 2 deletes
    expected = [decode_tuple(m, 6)[0] for m in simple]
    assert columnwise(simple, [6] * len(simple), 5) == expected


@given(st.lists(st.lists(VALUE, min_size=4, max_size=4).map(tuple), min_size=1, max_size=30))
def test_drawn_tuples(rows: list[tuple]) -> None:
    encoded = [b"xyz" + encode_tuple(row) for row in rows]  # a message head before each
    assert columnwise(encoded, [3] * len(rows), 4) == rows


def test_pending_rows_keep_their_order_and_moves() -> None:
    pending = Pending(shape=None)
    for i in range(4):
        pending.add_row(
            (str(i).encode(),), "insert", 10 + i, 0, 7, moved=(b"old",) if i == 2 else None
        )
    kept = pending.select([True, False, True, True])
    assert kept.ops == ["insert"] * 3 and kept.lsns == [10, 12, 13]
    assert kept.moved == {1: (b"old",)} and kept.values(1) == (b"2",)


@pytest.mark.parametrize(
    "data, count, problem",
    [
        (encode_tuple((b"a", None)), 3, "columns, expected 3"),
        (b"\x00\x01x", 1, "unknown tuple value kind"),
        (b"\x00\x01t\x00\x00\x00\x09abc", 1, "runs past the end"),
    ],
)
def test_malformed_tuples_are_refused(data: bytes, count: int, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode_columns([data], [0], count)
