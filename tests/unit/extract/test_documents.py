"""BSON documents -> Arrow (`pipeline.extract.documents`): the README's type map, widening, the
field mapping and `_extra`, with no MongoDB (documents are what pymongo would hand over)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Regex
from bson.binary import UuidRepresentation

from pipeline.extract.documents import (
    EXTRA,
    MAX_EXACT_FLOAT_INT,
    FieldMapping,
    canonical_json,
    coalesce,
    column_array,
    documents_to_batch,
)

OID = ObjectId("64b7f0000000000000000001")
WHEN = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
IDENT = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("values", "arrow", "python"),
    [
        (["a", None, ""], pa.string(), ["a", None, ""]),
        ([OID, None], pa.string(), [str(OID), None]),
        ([OID, OID], pa.string(), [str(OID)] * 2),
        ([1, Int64(2**40), None], pa.int64(), [1, 2**40, None]),
        ([0.25, None], pa.float64(), [0.25, None]),
        ([True, False, None], pa.bool_(), [True, False, None]),
        ([WHEN, None], pa.timestamp("us", "UTC"), [WHEN, None]),
        ([datetime(2024, 1, 1)], pa.timestamp("us", "UTC"), [datetime(2024, 1, 1, tzinfo=UTC)]),
        ([Decimal128("12.345"), None], pa.string(), ["12.345", None]),
        ([IDENT], pa.string(), [str(IDENT)]),
        ([Binary.from_uuid(IDENT, UuidRepresentation.STANDARD)], pa.string(), [str(IDENT)]),
        ([b"\x00\x01\xff"], pa.string(), ["AAH/"]),
        ([Binary(b"\x00\x01\xff")], pa.string(), ["AAH/"]),
        (
            [{"b": 1, "a": [1, {"d": None, "c": 2}]}],
            pa.string(),
            ['{"a":[1,{"c":2,"d":null}],"b":1}'],
        ),
        ([["b", "a"], []], pa.string(), ['["b","a"]', "[]"]),
        (
            [Regex("^a", "i")],
            pa.string(),
            ['{"$regularExpression":{"options":"i","pattern":"^a"}}'],
        ),
        ([None, None], pa.null(), [None, None]),
    ],
)
def test_each_bson_type_maps_to_its_documented_arrow_type(
    values: list[Any], arrow: pa.DataType, python: list[Any]
) -> None:
    column = column_array(values, "c", "f")
    assert column.type == arrow
    assert column.to_pylist() == python


def test_datetimes_in_any_zone_are_utc_instants() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=-5)))
    assert column_array([local], "c", "f").to_pylist() == [WHEN]


@pytest.mark.parametrize(
    ("values", "arrow", "python"),
    [
        ([1, 2.5, None], pa.float64(), [1.0, 2.5, None]),  # exact as a double: widened to it
        ([MAX_EXACT_FLOAT_INT, 0.5], pa.float64(), [float(MAX_EXACT_FLOAT_INT), 0.5]),
        ([MAX_EXACT_FLOAT_INT + 1, 0.5], pa.string(), [str(MAX_EXACT_FLOAT_INT + 1), "0.5"]),
        ([1, "x"], pa.string(), ["1", "x"]),
        ([True, 1], pa.string(), ["true", "1"]),  # a bool is not an int
        ([WHEN, "x"], pa.string(), ["2024-05-06T07:08:09.123000Z", "x"]),
        ([OID, 3], pa.string(), [str(OID), "3"]),
        ([{"k": 1}, "s", None], pa.string(), ['{"k":1}', "s", None]),
        ([2**64, 1], pa.string(), [str(2**64), "1"]),  # beyond int64: text, never an error
        ([-(2**63) - 1], pa.string(), [str(-(2**63) - 1)]),
    ],
)
def test_mixed_fields_widen_and_lose_nothing(
    values: list[Any], arrow: pa.DataType, python: list[Any]
) -> None:
    column = column_array(values, "c", "f")
    assert column.type == arrow
    assert column.to_pylist() == python


def test_canonical_json_sorts_keys_and_encodes_bson_values() -> None:
    doc = {"z": OID, "a": Decimal128("1.10"), "é": b"ab", "t": WHEN, "u": IDENT, "n": None}
    assert canonical_json(doc) == (
        '{"a":"1.10","n":null,"t":"2024-05-06T07:08:09.123000Z",'
        '"u":"12345678-1234-5678-1234-567812345678","z":"64b7f0000000000000000001","é":"YWI="}'
    )
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1})


def test_fields_keep_first_seen_order_across_batches() -> None:
    fields: list[str] = []
    first = documents_to_batch([{"_id": 1, "a": 1}, {"_id": 2, "b": "x"}], "c", fields)
    second = documents_to_batch([{"_id": 3, "c": True, "a": 2}], "c", fields)
    assert fields == ["_id", "a", "b", "c"]
    assert first.schema.names == ["_id", "a", "b"]
    assert first.to_pylist() == [{"_id": 1, "a": 1, "b": None}, {"_id": 2, "a": None, "b": "x"}]
    assert second.schema.names == ["_id", "a", "b", "c"]
    assert second.schema.field("b").type == pa.null()  # absent in this batch: typed later
    assert second.to_pylist() == [{"_id": 3, "a": 2, "b": None, "c": True}]


def test_unmapped_fields_land_in_extra_and_paths_flatten() -> None:
    mapping = FieldMapping(fields=("name",), flatten=("address.city", "address.geo.lat"))
    docs = [
        {"_id": 1, "name": "Ada", "address": {"city": "Lagos", "zip": "1"}, "x": 1},
        {"_id": 2, "name": "Obi", "address": "unknown"},
        {"_id": 3, "address": {"geo": {"lat": 6.5}}},
    ]
    batch = documents_to_batch(docs, "people", [], mapping)
    assert batch.to_pylist() == [
        {
            "address__city": "Lagos",
            "address__geo__lat": None,
            "_id": 1,
            "name": "Ada",
            EXTRA: '{"address":{"city":"Lagos","zip":"1"},"x":1}',
        },
        {
            "address__city": None,
            "address__geo__lat": None,
            "_id": 2,
            "name": "Obi",
            EXTRA: '{"address":"unknown"}',
        },
        {
            "address__city": None,
            "address__geo__lat": 6.5,
            "_id": 3,
            "name": None,
            EXTRA: '{"address":{"geo":{"lat":6.5}}}',
        },
    ]


def test_field_names_that_cannot_be_columns_go_to_extra_once_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    collection = f"c_{uuid.uuid4().hex[:8]}"  # warnings are once per process and collection
    docs = [{"_id": 1, "": 5, "_batch_id": "mine", "ok": 1, "x" * 201: 2}, {"_id": 2, "ok": 2}]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        batch = documents_to_batch(docs, collection, [])
        documents_to_batch(docs, collection, [])
    assert batch.schema.names == ["_id", "ok", EXTRA]
    assert batch.to_pylist()[0][EXTRA] == canonical_json({"": 5, "_batch_id": "mine", "x" * 201: 2})
    assert batch.to_pylist()[1][EXTRA] is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert f"MongoDB collection {collection}: field '' is an empty name" in warnings[0]
    assert "'_batch_id' is a name the raw table reserves for its own column" in warnings[1]
    assert "is a name too long for a column file (201 > 200 bytes)" in warnings[2]
    assert all(w.endswith("its values land in _extra (canonical JSON)") for w in warnings)


def test_documents_without_oddities_pass_through_unshaped() -> None:
    docs = [{"_id": 1, "v": "a"}]
    assert documents_to_batch(docs, "c", []).to_pylist() == docs


def test_coalesce_merges_small_batches_and_types_all_null_chunks() -> None:
    typed = pa.RecordBatch.from_pydict({"a": pa.array([1, 2], pa.int64())})
    empty = pa.RecordBatch.from_pydict({"a": pa.nulls(1)})
    merged = list(coalesce([typed, empty, typed], rows=10))
    assert len(merged) == 1
    assert merged[0].schema.field("a").type == pa.int64()
    assert merged[0].column("a").to_pylist() == [1, 2, None, 1, 2]
    assert [b.num_rows for b in coalesce([typed] * 5, rows=4)] == [4, 4, 2]


def test_coalesce_keeps_batches_whose_types_really_differ_apart() -> None:
    ints = pa.RecordBatch.from_pydict({"a": pa.array([1], pa.int64())})
    texts = pa.RecordBatch.from_pydict({"a": pa.array(["x"], pa.string())})
    out = list(coalesce([ints, texts], rows=10))
    assert [b.schema.field("a").type for b in out] == [pa.int64(), pa.string()]
    assert sum(b.num_rows for b in out) == 2
