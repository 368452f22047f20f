"""The PostgreSQL type map and canonical JSON (`pipeline.extract.pg_types`), without a server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.extract import pg_types
from pipeline.extract.pg_types import Column, arrow_type, spec


@pytest.mark.parametrize(
    ("udt", "precision", "scale", "arrow"),
    [
        ("int2", None, None, pa.int16()),
        ("int4", None, None, pa.int32()),
        ("int8", None, None, pa.int64()),
        ("float4", None, None, pa.float32()),
        ("float8", None, None, pa.float64()),
        ("bool", None, None, pa.bool_()),
        ("date", None, None, pa.date32()),
        ("numeric", 12, 2, pa.decimal128(12, 2)),
        ("numeric", 38, 10, pa.decimal128(38, 10)),
        ("numeric", 38, 38, pa.decimal128(38, 38)),
        ("numeric", 5, 0, pa.decimal128(5, 0)),
        ("numeric", None, None, pa.string()),  # unconstrained: the exact text
        ("numeric", 39, 2, pa.string()),  # wider than decimal128
        ("numeric", 4, -2, pa.string()),  # PostgreSQL 15 allows scale < 0 ...
        ("numeric", 2, 4, pa.string()),  # ... and scale > precision
        ("timestamptz", None, None, pa.timestamp("us", "UTC")),
        ("timestamp", None, None, pa.timestamp("us", "UTC")),
        ("text", None, None, pa.string()),
        ("varchar", None, None, pa.string()),
        ("uuid", None, None, pa.string()),
        ("json", None, None, pa.string()),
        ("jsonb", None, None, pa.string()),
        ("_text", None, None, pa.string()),
        ("_int4", None, None, pa.string()),
        ("bytea", None, None, pa.string()),
        ("interval", None, None, pa.string()),  # anything else: the server's text
        ("inet", None, None, pa.string()),
    ],
)
def test_the_documented_type_map(
    udt: str, precision: int | None, scale: int | None, arrow: pa.DataType
) -> None:
    assert arrow_type(Column("c", udt, precision, scale)) == arrow


@pytest.mark.parametrize(
    ("udt", "parsed", "json"),
    [
        ("timestamptz", pa.timestamp("us"), False),  # read AT TIME ZONE 'UTC', parsed naive
        ("timestamp", pa.timestamp("us"), False),
        ("jsonb", pa.string(), True),
        ("json", pa.string(), True),
        ("_numeric", pa.string(), True),  # arrays leave as array_to_json
        ("bytea", pa.string(), False),  # base64 in SQL
        ("int8", pa.int64(), False),
        ("text", pa.string(), False),
    ],
)
def test_how_each_column_is_read(udt: str, parsed: pa.DataType, json: bool) -> None:
    column = Column("c", udt, None, None)
    read = spec(column)
    assert (read.parsed, read.final, read.json) == (parsed, arrow_type(column), json)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('{"b": [1.50, 2], "a": {"d": 1e5, "c": -0.0}}', '{"a":{"c":-0.0,"d":1e5},"b":[1.50,2]}'),
        ('{"k": "\\ue000 1.5", "n": 1.50}', '{"k":"\ue000 1.5","n":1.50}'),
        ('{"k": "\ue000", "n": 1.50}', '{"k":"\ue000","n":1.50}'),
        ('"\\u00e9\\n"', '"é\\n"'),
        ("12345678901234567890.123456789", "12345678901234567890.123456789"),
    ],
)
def test_canonical_json_keeps_numbers_exact(text: str, canonical: str) -> None:
    assert pg_types.canonical_json(text) == canonical


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (
            '{"b": {"d": [true, null], "c": "x"}, "a": 1, "A": 2}',
            '{"A":2,"a":1,"b":{"c":"x","d":[true,null]}}',
        ),
        ("[1.0, 1e400, 0.10, 12345678901234567890]", "[1.0,1e400,0.10,12345678901234567890]"),
        (
            '{"emoji": "😀", "esc": "\\u263a", "quote": "\\""}',
            '{"emoji":"😀","esc":"☺","quote":"\\""}',
        ),
        ("[ ]", "[]"),
        ("null", "null"),
    ],
)
def test_canonical_json_sorts_keys_and_drops_spaces(text: str, canonical: str) -> None:
    assert pg_types.canonical_json(text) == canonical
    assert pg_types.canonical_json(canonical) == canonical  # canonical text is a fixed point
