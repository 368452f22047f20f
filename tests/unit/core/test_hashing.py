"""`pipeline.core.hashing`: the canonical text of every Arrow type and the change-detection rule
(README, "Change detection rule"), checked on the exact strings that get hashed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pyarrow as pa
import pytest
import xxhash

from pipeline.core.hashing import (
    canonical_text,
    check_signature,
    encode_key,
    encode_rows,
    row_hash,
    xxh64_column,
)

NEW_YEAR = datetime(2024, 1, 1, tzinfo=UTC)
NEW_YEAR_US = "1704067200000000"  # microseconds since the epoch


@pytest.mark.parametrize(
    ("array", "text"),
    [
        (pa.array(["x", "", "é 😀", None]), ["x", "", "é 😀", None]),
        (pa.array(["x", None], pa.large_string()), ["x", None]),
        (pa.array([-128, 0, 127, None], pa.int8()), ["-128", "0", "127", None]),
        (pa.array([-(2**15)], pa.int16()), ["-32768"]),
        (pa.array([2**31 - 1], pa.int32()), ["2147483647"]),
        (pa.array([-(2**63)], pa.int64()), ["-9223372036854775808"]),
        (pa.array([255], pa.uint8()), ["255"]),
        (pa.array([65535], pa.uint16()), ["65535"]),
        (pa.array([2**32 - 1], pa.uint32()), ["4294967295"]),
        (pa.array([2**64 - 1], pa.uint64()), ["18446744073709551615"]),
        (pa.array([0.1, 1.0, -0.0], pa.float32()), ["0.1", "1", "-0"]),
        (pa.array([0.1, 3.0, 1e20, 1.5e-7], pa.float64()), ["0.1", "3", "1e+20", "1.5e-7"]),
        (
            pa.array([Decimal("1.50"), Decimal("-0.01"), None], pa.decimal128(12, 2)),
            ["1.50", "-0.01", None],
        ),
        (
            pa.array([Decimal("1234567890123456789012345678.0123456789")], pa.decimal128(38, 10)),
            ["1234567890123456789012345678.0123456789"],
        ),
        (pa.array([NEW_YEAR, None], pa.timestamp("us", "UTC")), [NEW_YEAR_US, None]),
        (pa.array([NEW_YEAR], pa.timestamp("s", "UTC")), [NEW_YEAR_US]),
        (pa.array([NEW_YEAR], pa.timestamp("ms", "UTC")), [NEW_YEAR_US]),
        (pa.array([NEW_YEAR], pa.timestamp("ns", "UTC")), [NEW_YEAR_US]),
        (pa.array([NEW_YEAR], pa.timestamp("us", "Europe/Berlin")), [NEW_YEAR_US]),
        (pa.array([datetime(2024, 1, 1)], pa.timestamp("us")), [NEW_YEAR_US]),  # naive = UTC
        (
            pa.array([datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)], pa.timestamp("us")),
            ["-1"],
        ),
        (
            pa.array([date(2024, 1, 1), date(1960, 1, 1), None], pa.date32()),
            ["19723", "-3653", None],
        ),
        (pa.array([date(2024, 1, 1)], pa.date64()), ["19723"]),
        (pa.array([True, False, None]), ["1", "0", None]),
        (pa.nulls(2), [None, None]),
        (pa.array([b"ab", b"", None], pa.binary()), ["ab", "", None]),
        (pa.array([b"ab"], pa.large_binary()), ["ab"]),
    ],
    ids=lambda value: str(value.type) if isinstance(value, pa.Array) else None,
)
def test_canonical_text_of_every_arrow_type(array: pa.Array, text: list[str | None]) -> None:
    assert canonical_text(array).to_pylist() == text


def test_an_instant_has_one_text_whatever_its_notation() -> None:
    berlin = timezone(timedelta(hours=1))
    instants = [
        pa.array([NEW_YEAR], pa.timestamp("us", "UTC")),
        pa.array([NEW_YEAR.astimezone(berlin)], pa.timestamp("us", "+01:00")),
        pa.array([NEW_YEAR.replace(tzinfo=None)], pa.timestamp("s")),
        pa.chunked_array([pa.array([NEW_YEAR], pa.timestamp("ms", "America/New_York"))]),
    ]
    assert {canonical_text(a).to_pylist()[0] for a in instants} == {NEW_YEAR_US}


def test_integers_of_any_width_and_decimals_hash_alike_when_their_digits_agree() -> None:
    """A column widened from int32 to int64 (drift) keeps every hash."""
    narrow = pa.table({"n": pa.array([5, -7], pa.int32())})
    wide = pa.table({"n": pa.array([5, -7], pa.int64())})
    assert row_hash(narrow, ["n"]) == row_hash(wide, ["n"])


# --- the change-detection rule ----------------------------------------------------------------


def test_encoding_names_each_non_null_column_with_its_byte_length() -> None:
    table = pa.table(
        {
            "b": ["x", None, "", "null", "é"],
            "a": pa.array([1, 2, None, 4, None], pa.int64()),
        }
    )
    assert encode_rows(table, ["b", "a"]).to_pylist() == [
        "a=1:1;b=1:x;",
        "a=1:2;",  # NULL contributes nothing
        "b=0:;",
        "a=1:4;b=4:null;",
        "b=2:é;",  # bytes, not characters
    ]


def test_null_empty_and_the_text_null_are_three_values() -> None:
    table = pa.table({"v": pa.array([None, "", "null", "NULL"], pa.string())})
    hashes = row_hash(table, ["v"]).to_pylist()
    assert len(set(hashes)) == 4


def test_values_cannot_run_into_each_other() -> None:
    joined = pa.table({"a": ["x;b=1:y"], "b": pa.array([None], pa.string())})
    apart = pa.table({"a": ["x"], "b": ["y"]})
    assert encode_rows(joined, ["a", "b"]).to_pylist() == ["a=7:x;b=1:y;"]
    assert encode_rows(apart, ["a", "b"]).to_pylist() == ["a=1:x;b=1:y;"]
    assert row_hash(joined, ["a", "b"]) != row_hash(apart, ["a", "b"])
    shifted = pa.table({"a": ["ab"], "b": ["c"]}), pa.table({"a": ["a"], "b": ["bc"]})
    assert row_hash(shifted[0], ["a", "b"]) != row_hash(shifted[1], ["a", "b"])


def test_column_order_does_not_matter() -> None:
    forward = pa.table({"a": [1, 2], "b": ["x", "y"], "c": [True, None]})
    backward = forward.select(["c", "b", "a"])
    assert encode_rows(forward, ["a", "b", "c"]) == encode_rows(backward, ["c", "a", "b"])
    assert row_hash(forward, ["a", "b", "c"]) == row_hash(backward, ["b", "c", "a"])


def test_a_new_column_that_is_null_everywhere_changes_no_hash() -> None:
    """Adding a column to a `check_cols = all` source never re-versions history."""
    before = pa.table({"id": [1, 2], "v": ["a", None]})
    after = before.append_column("added", pa.nulls(2, pa.string()))
    assert row_hash(after, after.column_names) == row_hash(before, before.column_names)
    assert row_hash(before, ["id", "v", "not_there"]) == row_hash(before, ["id", "v"])


def test_no_columns_encode_to_the_empty_text() -> None:
    table = pa.table({"a": [1, 2, 3]})
    assert encode_rows(table, []).to_pylist() == ["", "", ""]
    assert encode_rows(table, ["missing"]).to_pylist() == ["", "", ""]


def test_hash_is_xxh3_64_of_the_encoding() -> None:
    table = pa.table({"b": ["x", None], "a": [1, 2]})
    expected = [xxhash.xxh3_64_intdigest(b"a=1:1;b=1:x;"), xxhash.xxh3_64_intdigest(b"a=1:2;")]
    assert row_hash(table, ["a", "b"]).to_pylist() == expected
    assert row_hash(table, ["a", "b"]).type == pa.uint64()
    chunked = pa.chunked_array([["a=1:1;b=1:x;"], ["a=1:2;"]])
    assert xxh64_column(chunked).to_pylist() == expected


def test_chunked_tables_hash_as_whole_ones() -> None:
    whole = pa.table({"a": list(range(10)), "s": [str(i) * i for i in range(10)]})
    chunked = pa.concat_tables([whole.slice(0, 3), whole.slice(3, 4), whole.slice(7)])
    assert chunked.column("a").num_chunks == 3
    assert row_hash(chunked, ["a", "s"]) == row_hash(whole, ["a", "s"])


# --- keys -------------------------------------------------------------------------------------


def test_a_single_key_is_its_canonical_text() -> None:
    assert encode_key(pa.table({"id": [1, 22]}), ["id"]).to_pylist() == ["1", "22"]
    assert encode_key(pa.table({"id": ["x;y"]}), ["id"]).to_pylist() == ["x;y"]


def test_composite_keys_are_length_prefixed() -> None:
    table = pa.table({"k1": ["ab", "a", "abc", ""], "k2": ["c", "bc", "", "abc"]})
    encoded = encode_key(table, ["k1", "k2"]).to_pylist()
    assert encoded == ["2:ab;1:c;", "1:a;2:bc;", "3:abc;0:;", "0:;3:abc;"]
    assert len(set(encoded)) == 4
    mixed = pa.table({"tenant": ["t1"], "id": pa.array([7], pa.int32())})
    assert encode_key(mixed, ["tenant", "id"]).to_pylist() == ["2:t1;1:7;"]
    assert encode_key(mixed, ["id", "tenant"]).to_pylist() == ["1:7;2:t1;"]  # key order counts


# --- which columns a hash covers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("check_cols", "signature"),
    [(None, "*"), (("state",), "state"), (("state", "occupation"), "occupation,state"), ((), "")],
)
def test_check_signature(check_cols: tuple[str, ...] | None, signature: str) -> None:
    assert check_signature(check_cols) == signature
