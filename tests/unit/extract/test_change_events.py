"""Change-stream events, pure: updateDescription applied to a state, the state at each event,
raw rows read back as documents, pre-images compared as stored, the replay collapse, tokens.

What the server sends is checked against real SecantusDB in
tests/integration/extract/test_mongo_changestream.py; here each rule on its own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import bson
import pyarrow as pa
import pytest
from bson import Int64, ObjectId, Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.extract.change_events import (
    ChangeCaptureError,
    ChangeEvent,
    MissingPreviousState,
    Normaliser,
    PreImageMismatch,
    UpdateConflict,
    apply_update,
    cluster_text,
    key_of,
    keys_needing_state,
    timestamp_key,
    token_cluster_time,
)
from pipeline.extract.change_rows import (
    Collector,
    Position,
    column_kinds,
    document_from_row,
    events_to_batch,
    stored_difference,
    with_scan_meta,
)
from pipeline.extract.documents import FieldMapping, documents_to_batch

# --- apply_update --------------------------------------------------------------------------

BASE = {"_id": 1, "a": {"b": {"c": 1}, "l": [1, 2, {"x": 1}]}, "arr": [1, 2, 3, 4], "s": "x"}


def upd(
    updated: Mapping[str, Any] | None = None,
    removed: list[str] | None = None,
    truncated: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    return {
        "updatedFields": dict(updated or {}),
        "removedFields": removed or [],
        "truncatedArrays": [{"field": f, "newSize": n} for f, n in truncated or []],
    }


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        (upd({"s": "y"}), {**BASE, "s": "y"}),
        (upd({"new": 1}), {**BASE, "new": 1}),
        (upd({"a.b.c": 2}), {**BASE, "a": {"b": {"c": 2}, "l": [1, 2, {"x": 1}]}}),
        (upd({"a.b.d": 2}), {**BASE, "a": {"b": {"c": 1, "d": 2}, "l": [1, 2, {"x": 1}]}}),
        (upd({"x.y.z": 1}), {**BASE, "x": {"y": {"z": 1}}}),
        (upd({"arr.1": 20}), {**BASE, "arr": [1, 20, 3, 4]}),
        (upd({"arr.4": 5}), {**BASE, "arr": [1, 2, 3, 4, 5]}),
        (upd({"arr.6": 7}), {**BASE, "arr": [1, 2, 3, 4, None, None, 7]}),
        (upd({"a.l.2.y": 2}), {**BASE, "a": {"b": {"c": 1}, "l": [1, 2, {"x": 1, "y": 2}]}}),
        (
            upd({"a.l.4.y": 2}),
            {**BASE, "a": {"b": {"c": 1}, "l": [1, 2, {"x": 1}, None, {"y": 2}]}},
        ),
        (upd({"a.b.2": 1}), {**BASE, "a": {"b": {"c": 1, "2": 1}, "l": [1, 2, {"x": 1}]}}),
        (upd({"n.0": 1}), {**BASE, "n": {"0": 1}}),
        (upd(removed=["s"]), {k: v for k, v in BASE.items() if k != "s"}),
        (upd(removed=["a.b.c"]), {**BASE, "a": {"b": {}, "l": [1, 2, {"x": 1}]}}),
        (upd(removed=["arr.1"]), {**BASE, "arr": [1, None, 3, 4]}),
        (upd(removed=["missing.path", "a.nothing", "arr.9"]), BASE),
        (upd(truncated=[("arr", 2)]), {**BASE, "arr": [1, 2]}),
        (upd(truncated=[("a.l", 1)]), {**BASE, "a": {"b": {"c": 1}, "l": [1]}}),
        (upd(truncated=[("arr", 9)]), BASE),
        (
            upd({"arr.0": 0, "a.b": 5}, ["s"], [("arr", 3)]),
            {"_id": 1, "a": {"b": 5, "l": [1, 2, {"x": 1}]}, "arr": [0, 2, 3]},
        ),
        (upd(), BASE),
    ],
)
def test_apply_update(description: dict[str, Any], expected: dict[str, Any]) -> None:
    before = copy.deepcopy(BASE)
    assert apply_update(BASE, description) == expected
    assert before == BASE  # the previous state is never modified


def test_apply_update_shares_untouched_subtrees() -> None:
    after = apply_update(BASE, upd({"a.b.c": 9}))
    assert after["arr"] is BASE["arr"] and after["a"]["l"] is BASE["a"]["l"]
    assert after["a"] is not BASE["a"] and after["a"]["b"] is not BASE["a"]["b"]


@pytest.mark.parametrize(
    "description",
    [
        upd({"s.t": 1}),  # through a string
        upd({"arr.x": 1}),  # a name on an array
        upd({"arr.0.y": 1}),  # through an array element that is a number
        upd(truncated=[("s", 0)]),
        upd(removed=["s.t"]),
    ],
)
def test_apply_update_conflicts(description: dict[str, Any]) -> None:
    with pytest.raises(UpdateConflict):
        apply_update(BASE, description)


def test_apply_update_overwrites_conflicts_when_told() -> None:
    after = apply_update(BASE, upd({"s.t": 1, "arr.0.y": 2}), overwrite_conflicts=True)
    assert after["s"] == {"t": 1} and after["arr"][0] == {"y": 2}
    assert apply_update(BASE, upd(truncated=[("s", 0)]), overwrite_conflicts=True) == BASE


def naive_set(doc: dict[str, Any], path: str, value: Any) -> None:
    """A reference walker: deep copies, no sharing."""
    *parents, last = path.split(".")
    node: Any = doc
    for seg in parents:
        if isinstance(node, list):
            i = int(seg)
            node.extend([None] * (i + 1 - len(node)))
            if not isinstance(node[i], dict | list):
                node[i] = {}
            node = node[i]
        else:
            if not isinstance(node.get(seg), dict | list):
                node[seg] = {}
            node = node[seg]
    if isinstance(node, list):
        node.extend([None] * (int(last) + 1 - len(node)))
        node[int(last)] = value
    else:
        node[last] = value


leaf = st.one_of(st.integers(-3, 3), st.text("ab", max_size=2), st.none(), st.booleans())
docs = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner),
    max_leaves=8,
)


def valid_paths(doc: Any, prefix: str = "") -> list[str]:
    paths = []
    if isinstance(doc, dict):
        for key in [*doc, "new"]:
            paths.append(f"{prefix}{key}")
            if key in doc:
                paths += valid_paths(doc[key], f"{prefix}{key}.")
    elif isinstance(doc, list):
        for index in range(len(doc) + 2):
            paths.append(f"{prefix}{index}")
            if index < len(doc):
                paths += valid_paths(doc[index], f"{prefix}{index}.")
    return paths


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abc"), docs, max_size=3), st.data())
def test_apply_update_matches_a_naive_reference(doc: dict[str, Any], draw: Any) -> None:
    paths = valid_paths(doc)
    chosen = draw.draw(st.lists(st.sampled_from(paths), max_size=3, unique=True)) if paths else []
    chosen = [p for p in chosen if not any(q != p and q.startswith(p + ".") for q in chosen)]
    chosen = [p for p in chosen if not any(p != q and p.startswith(q + ".") for q in chosen)]
    updates = {p: draw.draw(leaf) for p in chosen}
    expected = copy.deepcopy(doc)
    for path, value in updates.items():
        naive_set(expected, path, value)
    before = copy.deepcopy(doc)
    assert apply_update(doc, upd(updates)) == expected
    assert doc == before


# --- tokens and keys -----------------------------------------------------------------------


def test_token_cluster_time_reads_both_servers_formats() -> None:
    secantus = {
        "_data": bson.encode({"s": 7, "t": Timestamp(1700000000, 3), "n": "d.c", "k": {}}).hex()
    }
    assert token_cluster_time(secantus) == timestamp_key(Timestamp(1700000000, 3))
    mongod = {"_data": "82" + f"{1700000000:08X}{5:08X}" + "2B022C0100296E5A1004"}
    assert token_cluster_time(mongod) == (1700000000 << 32) | 5
    assert token_cluster_time({"_data": "zz"}) is None
    assert token_cluster_time({"_data": "00" * 20}) is None
    assert token_cluster_time(None) is None
    assert cluster_text(timestamp_key(Timestamp(12, 3))) == "Timestamp(12, 3)"


def test_key_of_keeps_types_apart_but_not_int_widths() -> None:
    assert key_of(1) == key_of(Int64(1))
    assert len({key_of(1), key_of(True), key_of(1.0), key_of("1")}) == 4
    assert key_of({"a": 1}) == key_of({"a": 1})


# --- the normaliser ------------------------------------------------------------------------


def raw(op: str, _id: Any, inc: int, **fields: Any) -> dict[str, Any]:
    return {
        "_id": {"_data": f"{inc:04x}"},
        "operationType": op,
        "clusterTime": Timestamp(100, inc),
        "wallTime": datetime(2026, 1, 1, 0, 0, inc, tzinfo=UTC),
        "ns": {"db": "d", "coll": "c"},
        "documentKey": {"_id": _id},
        **fields,
    }


def exact(known: Mapping[str, Any], pre_image: Mapping[str, Any]) -> str | None:
    return (
        None if dict(known) == dict(pre_image) else sorted(set(known) ^ set(pre_image) or known)[0]
    )


def test_states_follow_the_events_of_a_key() -> None:
    normaliser = Normaliser("d.c", exact)
    normaliser.remember([(1, {"_id": 1, "a": 1, "b": {"c": 1}})])
    events = [
        normaliser.apply(raw("update", 1, 1, updateDescription=upd({"b.c": 2}))),
        normaliser.apply(raw("update", 1, 2, updateDescription=upd(removed=["a"]))),
        normaliser.apply(raw("delete", 1, 3)),
        normaliser.apply(raw("insert", 1, 4, fullDocument={"_id": 1, "z": 0})),
        normaliser.apply(raw("replace", 1, 5, fullDocument={"_id": 1, "y": 1})),
    ]
    assert [e.document for e in events] == [
        {"_id": 1, "a": 1, "b": {"c": 2}},
        {"_id": 1, "b": {"c": 2}},
        None,
        {"_id": 1, "z": 0},
        {"_id": 1, "y": 1},
    ]
    assert [e.operation for e in events] == ["update", "update", "delete", "insert", "replace"]
    assert events[0].cluster_time == timestamp_key(Timestamp(100, 1))
    assert events[2].wall_time == datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)


def test_a_pre_image_that_differs_from_the_loaded_state_names_the_key() -> None:
    normaliser = Normaliser("d.c", exact)
    normaliser.remember([(7, {"_id": 7, "x": 1})])
    event = raw(
        "update", 7, 1, updateDescription=upd({"y": 1}), fullDocumentBeforeChange={"_id": 7, "z": 2}
    )
    with pytest.raises(PreImageMismatch, match=r"d\.c: _id=7 at Timestamp\(100, 1\).*'x'"):
        normaliser.apply(event)


def test_a_pre_image_of_a_key_the_warehouse_holds_as_absent_is_a_mismatch() -> None:
    normaliser = Normaliser("d.c", exact)
    normaliser.remember([(7, None)])
    event = raw("delete", 7, 1, fullDocumentBeforeChange={"_id": 7})
    with pytest.raises(PreImageMismatch, match="deleted or absent"):
        normaliser.apply(event)


def test_a_pre_image_confirms_and_then_is_the_base() -> None:
    normaliser = Normaliser("d.c", exact)
    normaliser.remember([(7, {"_id": 7, "x": 1})])
    event = normaliser.apply(
        raw(
            "update",
            7,
            1,
            updateDescription=upd({"y": 1}),
            fullDocumentBeforeChange={"_id": 7, "x": 1},
        )
    )
    assert event.document == {"_id": 7, "x": 1, "y": 1}


def test_an_update_without_any_previous_state_is_an_error() -> None:
    normaliser = Normaliser("d.c", exact)
    normaliser.remember([(3, None)])
    with pytest.raises(MissingPreviousState, match=r"d\.c: _id=3"):
        normaliser.apply(raw("update", 3, 1, updateDescription=upd({"y": 1})))


def test_replayed_events_are_lenient_and_later_ones_strict() -> None:
    replay_until = timestamp_key(Timestamp(100, 2))
    normaliser = Normaliser("d.c", exact, replay_until)
    normaliser.remember([(3, {"_id": 3, "a": 5})])  # the scan already saw a later state
    first = normaliser.apply(raw("update", 3, 1, updateDescription=upd({"a.b": 1})))
    second = normaliser.apply(raw("update", 3, 2, updateDescription=upd({"a": 5})))
    assert (first.document, first.replay) == ({"_id": 3, "a": {"b": 1}}, True)
    assert (second.document, second.replay) == ({"_id": 3, "a": 5}, True)
    # a key the scan did not see (deleted before it got there) replays from nothing
    gone = normaliser.apply(raw("update", 9, 2, updateDescription=upd({"q": 1})))
    assert gone.document == {"_id": 9, "q": 1}
    third = normaliser.apply(raw("update", 3, 3, updateDescription=upd({"r": 2})))
    assert (third.document, third.replay) == ({"_id": 3, "a": 5, "r": 2}, False)


def test_stream_interruptions_stop_the_entity_by_name() -> None:
    normaliser = Normaliser("d.c", exact)
    rename = {**raw("rename", None, 9), "to": {"db": "d", "coll": "c2"}}
    with pytest.raises(
        ChangeCaptureError, match=r"d\.c was renamed to d\.c2 at Timestamp\(100, 9\)"
    ):
        normaliser.apply(rename)
    with pytest.raises(ChangeCaptureError, match=r"d\.c was dropped"):
        normaliser.apply(raw("drop", None, 10))


def test_keys_needing_state() -> None:
    raws = [
        raw("insert", 1, 1, fullDocument={"_id": 1}),
        raw("update", 1, 2, updateDescription=upd()),
        raw("update", 2, 3, updateDescription=upd()),
        raw("delete", 3, 4),
        raw("update", 2, 5, updateDescription=upd()),
        raw("update", 4, 6, updateDescription=upd()),
    ]
    assert keys_needing_state(raws, {key_of(4)}) == [2, 3]


# --- rows ----------------------------------------------------------------------------------


def event(
    op: str, _id: Any, inc: int, document: dict[str, Any] | None, replay: bool = False
) -> ChangeEvent:
    wall = datetime(2026, 1, 1, 0, 0, inc, tzinfo=UTC)
    return ChangeEvent(op, timestamp_key(Timestamp(100, inc)), wall, _id, document, replay)


def test_events_become_rows_with_their_meta_columns() -> None:
    fields = ["_id"]
    events = [
        event("insert", 1, 1, {"_id": 1, "a": "x"}),
        event("update", 1, 2, {"_id": 1, "a": "y", "n": {"k": 1}}),
        event("delete", 1, 3, None),
    ]
    batch = events_to_batch(events, "c", fields, FieldMapping(), 5)
    rows = batch.to_pylist()
    assert [r["_op"] for r in rows] == ["insert", "update", "delete"]
    assert [r["_seq"] for r in rows] == [5, 6, 7]
    assert [r["_cluster_time"] for r in rows] == [(100 << 32) | i for i in (1, 2, 3)]
    assert rows[1]["n"] == '{"k":1}' and rows[2]["a"] is None and rows[2]["_id"] == 1
    assert batch.schema.field("_wall_time").type == pa.timestamp("us", "UTC")


def test_scanned_rows_carry_scan_and_no_change_time() -> None:
    scanned = with_scan_meta(pa.record_batch({"_id": [1, 2]}), 10).to_pylist()
    assert [(r["_op"], r["_seq"], r["_cluster_time"], r["_wall_time"]) for r in scanned] == [
        ("scan", 10, None, None),
        ("scan", 11, None, None),
    ]


def test_replayed_events_collapse_to_each_keys_last() -> None:
    collector = Collector()
    chunk = [
        event("update", 1, 1, {"_id": 1, "v": 1}, replay=True),
        event("update", 2, 2, {"_id": 2, "v": 1}, replay=True),
        event("update", 1, 3, {"_id": 1, "v": 2}, replay=True),
    ]
    assert list(collector.add(chunk)) == []  # held until the replay ends
    later = [event("update", 1, 4, {"_id": 1, "v": 3}), event("update", 2, 5, {"_id": 2, "v": 9})]
    (staged,) = collector.add(later)
    assert [(e.document_id, e.document) for e in staged] == [
        (2, {"_id": 2, "v": 1}),
        (1, {"_id": 1, "v": 2}),
        (1, {"_id": 1, "v": 3}),
        (2, {"_id": 2, "v": 9}),
    ]
    assert collector.flush() == []


NESTED = {
    "_id": ObjectId("65a1b2c3d4e5f60718293a4b"),
    "name": "Ann",
    "age": 41,
    "score": 2.5,
    "ok": True,
    "at": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
    "address": {"city": "Oslo", "zip": [1, 2], "since": datetime(2020, 1, 1, tzinfo=UTC)},
    "tags": ["a", {"b": ObjectId("65a1b2c3d4e5f60718293a4c")}],
    "note": '{"looks": "like json"}',
}


def typed_row(doc: dict[str, Any], mapping: FieldMapping) -> dict[str, Any]:
    return documents_to_batch([doc], "c", ["_id"], mapping).to_pylist()[0]


def kinds_of(row: dict[str, Any], mapping: FieldMapping) -> dict[str, str]:
    types = documents_to_batch([NESTED], "c", ["_id"], mapping).schema
    names = {"string": "String", "int64": "Int64", "double": "Float64", "bool": "Bool"}
    return column_kinds(
        {
            f.name: "DateTime64(6, 'UTC')" if "timestamp" in str(f.type) else names[str(f.type)]
            for f in types
        }
    )


@pytest.mark.parametrize(
    "mapping",
    [
        FieldMapping(),
        FieldMapping(fields=("name", "address")),
        FieldMapping(flatten=("address.city",)),
    ],
)
def test_a_raw_row_reads_back_as_a_document_that_types_to_the_same_row(
    mapping: FieldMapping,
) -> None:
    row = typed_row(NESTED, mapping)
    kinds = kinds_of(row, mapping)
    document = document_from_row(row, kinds, mapping)
    assert typed_row(document, mapping) == row
    # an update applies to it as to the original, and types to the same row
    change = upd({"address.city": "Rome", "tags.0": "z", "age": 42}, ["score"])
    assert typed_row(apply_update(document, change), mapping) == typed_row(
        apply_update(NESTED, change), mapping
    )
    assert document["note"] == NESTED["note"]  # a string that only looks like JSON stays one
    assert stored_difference(document, NESTED, kinds, mapping, whole_seconds=False) is None


def test_pre_images_compare_as_the_warehouse_stores_values() -> None:
    mapping = FieldMapping()
    row = typed_row(NESTED, mapping)
    kinds = kinds_of(row, mapping)
    stored = document_from_row(row, kinds, mapping)
    assert stored_difference(stored, {**NESTED, "age": 40}, kinds, mapping, False) == "age"
    assert stored_difference(stored, {**NESTED, "ok": 1}, kinds, mapping, False) == "ok"
    assert stored_difference(stored, {**NESTED, "new": None}, kinds, mapping, False) is None
    nested = {**NESTED, "address": {**NESTED["address"], "city": "Bergen"}}
    assert stored_difference(stored, nested, kinds, mapping, False) == "address"
    # whole seconds: a warehouse without DateTime64 cannot tell milliseconds apart
    seconds = {**row, "at": row["at"].replace(microsecond=0)}
    old = document_from_row(seconds, kinds, mapping)
    assert stored_difference(old, NESTED, kinds, mapping, whole_seconds=True) is None
    assert stored_difference(old, NESTED, kinds, mapping, whole_seconds=False) == "at"
    # a bool column on a server without Bool is UInt8
    assert document_from_row({"ok": 1}, column_kinds({"ok": "UInt8"}), mapping) == {"ok": True}


def test_position_round_trips_and_keeps_the_replay_point() -> None:
    first = Position(token={"_data": "ab"}, scan="20260101T000000Z", replay_until=5, pin=5)
    assert Position.parse(first.dump()) == first
    later = first.after({"_data": "cd"}, 9, "2026-01-01T00:00:01+00:00")
    assert (later.token, later.pin, later.replay_until, later.scan) == (
        {"_data": "cd"},
        9,
        5,
        first.scan,
    )
    assert later.after({"_data": "ef"}, 10, None).last_event == "2026-01-01T00:00:01+00:00"
    assert Position.parse(None) is None
    assert json.loads(first.dump())["token"] == {"_data": "ab"}
