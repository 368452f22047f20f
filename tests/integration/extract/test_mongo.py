"""MongoDB extraction against the real server: BSON types, `_extra` and flatten, `_id` ranges.

The BSON -> Arrow typing without a server: tests/unit/extract/test_documents.py."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from bson import Binary, Decimal128, ObjectId
from bson.binary import UuidRepresentation
from luigi.execution_summary import LuigiStatusCode

from pipeline import runtime
from pipeline.core.batch import new_batch_id
from pipeline.graph import LoadRaw
from tests.conftest import Env
from tests.support.load_hashes import hash_mismatches


def _load(env: Env, entity: str) -> str:
    batch = new_batch_id()
    assert env.build([LoadRaw(entity=entity, batch=batch)]) == LuigiStatusCode.SUCCESS
    return batch


def _raw(env: Env, entity: str, columns: str) -> list[tuple]:
    return env.rows(f"SELECT {columns} FROM {{db}}.raw_{entity} ORDER BY _id")


def test_every_bson_type_maps_to_its_documented_type(pipeline_env: Env) -> None:
    env = pipeline_env
    oid = ObjectId("64b7f0000000000000000001")
    when = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    doc = {
        "_id": oid,
        "ref": ObjectId("64b7f0000000000000000002"),
        "at": when,
        "price": Decimal128("12.345"),
        "small": 7,
        "big": 2**40,
        "ratio": 0.25,
        "flag": True,
        "blob": Binary(b"\x00\x01\xff"),
        "ident": Binary.from_uuid(ident, UuidRepresentation.STANDARD),
        "nothing": None,
        "nested": {"b": 1, "a": [1, "x", {"d": None, "c": 2}]},
        "tags": ["b", "a"],
    }
    env.mongo("types").insert_one(doc)
    env.add_entity("types", source="mongo", collection="types", unique_key="_id")
    _load(env, "types")
    cols = "_id, ref, at, price, small, big, ratio, flag, blob, ident, nested, tags"
    (row,) = _raw(env, "types", cols)
    at = when if env.wh.features.datetime64 else when.replace(microsecond=0)
    assert row == (
        str(oid),
        "64b7f0000000000000000002",
        at,
        "12.345",
        7,
        2**40,
        0.25,
        True,
        base64.b64encode(b"\x00\x01\xff").decode(),
        str(ident),
        '{"a":[1,"x",{"c":2,"d":null}],"b":1}',
        '["b","a"]',
    )
    types = env.wh.columns(env.database, "raw_types")
    assert types["small"] == "Nullable(Int64)" and types["ratio"] == "Nullable(Float64)"
    assert types["price"] == "Nullable(String)"
    assert hash_mismatches(env.wh, env.database, runtime.settings().entity("types")) == []


def test_unmapped_fields_land_in_extra_and_paths_flatten(pipeline_env: Env) -> None:
    env = pipeline_env
    env.mongo("people").insert_many(
        [
            {"_id": 1, "name": "Ada", "address": {"city": "Lagos", "zip": "1"}, "x": 1},
            {"_id": 2, "name": "Obi", "address": {"city": "Kano"}},
        ]
    )
    env.add_entity(
        "people",
        source="mongo",
        collection="people",
        unique_key="_id",
        fields="name",
        flatten="address.city",
    )
    _load(env, "people")
    assert _raw(env, "people", "_id, name, address__city, _extra") == [
        (1, "Ada", "Lagos", '{"address":{"city":"Lagos","zip":"1"},"x":1}'),
        (2, "Obi", "Kano", '{"address":{"city":"Kano"}}'),
    ]


@pytest.mark.parametrize("partitions", ["4"])
def test_id_range_extraction_equals_a_single_scan(pipeline_env: Env, partitions: str) -> None:
    env = pipeline_env
    docs = [
        {"_id": ObjectId(), "i": i, "v": f"value {i}", "d": Decimal128(Decimal(i))}
        for i in range(1003)
    ]
    env.mongo("items").insert_many(docs)
    env.add_entity("items_single", source="mongo", collection="items", unique_key="_id")
    env.add_entity(
        "items_ranged",
        source="mongo",
        collection="items",
        unique_key="_id",
        partitions=partitions,
    )
    single = _load(env, "items_single")
    ranged = _load(env, "items_ranged")
    cols = "_id, i, v, d, _row_hash"
    assert _raw(env, "items_ranged", cols) == _raw(env, "items_single", cols)
    assert env.count("raw_items_ranged") == 1003
    parts = env.rows(
        "SELECT rows_out FROM {db}._cdc_batches WHERE entity = 'items_ranged' AND batch_id = %(b)s",
        {"b": ranged},
    )
    assert parts == [(1003,)] and single != ranged
    keys = env.rows("SELECT count(DISTINCT _id) FROM {db}.raw_items_ranged")
    assert keys == [(1003,)]
