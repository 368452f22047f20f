"""Staging on local files (`pipeline.staging.LocalStore`) and the manifest, the Extract -> Load
contract: parts and manifest written, read back and verified, merged from ranges, pruned."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import load_settings
from pipeline.core.errors import StagingError
from pipeline.core.manifest import Manifest
from pipeline.core.names import MANIFEST, batch_prefix, range_subdir
from pipeline.staging import (
    LocalStore,
    manifest_exists,
    merge_manifests,
    open_store,
    prune,
    read_manifest,
    read_parts,
    staged_batches,
    write_batch,
)

BATCH = "20240101T000000000000Z"
PREFIX = batch_prefix("mongo", "users", BATCH)


class RecordingStore(LocalStore):
    """A LocalStore that remembers the order of its deletes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.deleted: list[str] = []

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.deleted += keys
        super().delete(keys)


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "staging")


def manifest(batch: str = BATCH) -> Manifest:
    return Manifest("users", "mongo", "users", batch, "2024-01-01T00:00:00+00:00")


def batches(rows: int, size: int, offset: int = 0) -> list[pa.RecordBatch]:
    ids = list(range(offset, offset + rows))
    table = pa.table({"id": pa.array(ids, pa.int64()), "v": [f"v{i}" for i in ids]})
    return table.to_batches(max_chunksize=size)


def read_back(store: LocalStore, m: Manifest) -> pa.Table:
    return pa.concat_tables(list(read_parts(store, m)))


# --- the store --------------------------------------------------------------------------------


def test_local_store_put_get_list_delete(store: LocalStore) -> None:
    assert store.url == store.root.as_uri()
    assert store.list("a/") == [] and not store.exists("a/x")
    store.put("a/x", b"1")
    store.put("a/b/y", b"22")
    store.put("a/x", b"333")  # replaced whole: temp file + rename
    assert store.get("a/x") == b"333" and store.exists("a/b/y")
    assert store.list("a/") == ["a/b/y", "a/x"]
    assert not list(store.root.rglob("*.tmp"))
    store.delete(["a/x", "a/missing"])
    assert store.list("") == ["a/b/y"]


def test_a_missing_object_is_a_staging_error_naming_it(store: LocalStore) -> None:
    with pytest.raises(StagingError, match=r"staging: nowhere/x not found"):
        store.get("nowhere/x")


def test_open_store_by_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "luigi.cfg"
    cfg.write_text("[entity.users]\nsource = mongo\nunique_key = _id\n")
    monkeypatch.setenv("CDC_STAGING_URL", (tmp_path / "st").as_uri())
    opened = open_store(load_settings(cfg))
    assert isinstance(opened, LocalStore) and opened.root == tmp_path / "st"
    monkeypatch.setenv("CDC_STAGING_URL", "ftp://host/x")
    with pytest.raises(StagingError, match="CDC_STAGING_URL must start with s3:// or file://"):
        open_store(load_settings(cfg))


# --- batches ----------------------------------------------------------------------------------


def test_write_then_read_a_batch(store: LocalStore) -> None:
    written = write_batch(store, manifest(), batches(25, 4), part_rows=10)
    assert [p["rows"] for p in written.parts] == [12, 12, 1]  # a part closes once it has 10+
    assert written.rows == 25
    assert [p["key"] for p in written.parts] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert all(p["columns"] == ["id", "v"] for p in written.parts)
    assert store.list(PREFIX) == sorted(
        [PREFIX + MANIFEST] + [PREFIX + p["key"] for p in written.parts]
    )
    assert manifest_exists(store, PREFIX)
    again = read_manifest(store, PREFIX)
    assert again == written
    assert read_back(store, again).to_pydict() == pa.Table.from_batches(batches(25, 25)).to_pydict()
    assert [t.num_rows for t in read_parts(store, again)] == [4, 4, 4, 4, 4, 4, 1]  # row groups


def test_a_schema_change_starts_a_new_part(store: LocalStore) -> None:
    wider = pa.RecordBatch.from_pydict({"id": pa.array([9], pa.int64()), "v": ["x"], "n": [1.5]})
    written = write_batch(store, manifest(), [*batches(3, 3), wider, *batches(2, 2)])
    assert [(p["rows"], p["columns"]) for p in written.parts] == [
        (3, ["id", "v"]),
        (1, ["id", "v", "n"]),
        (2, ["id", "v"]),
    ]
    assert written.columns() == {"id", "v", "n"}
    assert "n: double" in written.parts[1]["schema"]


def test_empty_batches_write_only_the_manifest(store: LocalStore) -> None:
    empty = pa.RecordBatch.from_pydict({"id": pa.array([], pa.int64())})
    written = write_batch(store, manifest(), [empty])
    assert (written.rows, written.parts) == (0, [])
    assert store.list(PREFIX) == [PREFIX + MANIFEST]
    assert list(read_parts(store, written)) == []


def test_a_rewrite_replaces_the_parts_of_a_crashed_attempt(store: LocalStore) -> None:
    store.put(PREFIX + "part-00007.parquet", b"left by a crash")
    store.put(PREFIX + "keys/part-00000.parquet", b"a key list: not this batch's parts")
    write_batch(store, manifest(), batches(2, 2))
    assert store.list(PREFIX) == [
        PREFIX + MANIFEST,
        PREFIX + "keys/part-00000.parquet",
        PREFIX + "part-00000.parquet",
    ]


def test_a_damaged_part_fails_its_checksum(store: LocalStore) -> None:
    written = write_batch(store, manifest(), batches(10, 10))
    key = PREFIX + written.parts[0]["key"]
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0xFF
    store.put(key, bytes(data))
    with pytest.raises(StagingError) as err:
        list(read_parts(store, written))
    assert str(err.value) == (f"{store.url}: {key} checksum mismatch: the staged file is damaged")


def test_a_part_with_other_rows_than_its_manifest_says_is_refused(store: LocalStore) -> None:
    written = write_batch(store, manifest(), batches(10, 10))
    written.parts[0]["rows"] = 11
    with pytest.raises(StagingError, match=r"part-00000.parquet has 10 rows, manifest says 11"):
        list(read_parts(store, written))


def test_range_manifests_merge_into_the_batch_manifest(store: LocalStore) -> None:
    ranges = [
        write_batch(store, manifest(), batches(3, 3, offset=10 * i), subdir=range_subdir(i))
        for i in range(3)
    ]
    assert [r.parts[0]["key"] for r in ranges] == [
        "range=000/part-00000.parquet",
        "range=001/part-00000.parquet",
        "range=002/part-00000.parquet",
    ]
    assert all(manifest_exists(store, PREFIX + range_subdir(i)) for i in range(3))
    assert not manifest_exists(store, PREFIX)
    merged = merge_manifests(
        store, manifest(), [read_manifest(store, PREFIX + range_subdir(i)) for i in range(3)]
    )
    assert merged.rows == 9 and read_manifest(store, PREFIX) == merged
    assert read_back(store, merged).column("id").to_pylist() == [0, 1, 2, 10, 11, 12, 20, 21, 22]


def test_prune_deletes_expired_batches_manifest_first_but_never_the_kept_one(
    store: RecordingStore,
) -> None:
    ids = ["20240101T000000Z", "20240102T000000Z", "20240103T000000Z"]
    for batch in ids:
        write_batch(store, manifest(batch), batches(2, 2))
    store.put("mongo/users_other/batch=20240101T000000Z/_manifest.json", b"{}")
    assert sorted(staged_batches(store, "mongo", "users")) == ids
    pruned = prune(store, "mongo", "users", expired=lambda b: b < "20240103", keep=ids[0])
    assert pruned == [ids[1]]
    old = batch_prefix("mongo", "users", ids[1])
    assert store.deleted == [old + MANIFEST, old + "part-00000.parquet"]  # the batch goes first
    assert sorted(staged_batches(store, "mongo", "users")) == [ids[0], ids[2]]
    assert store.exists("mongo/users_other/batch=20240101T000000Z/_manifest.json")


# --- the manifest -----------------------------------------------------------------------------


def test_manifest_round_trip() -> None:
    m = Manifest(
        entity="orders",
        source="postgres",
        table="public.orders",
        batch_id=BATCH,
        extracted_at="2024-01-01T00:00:00+00:00",
        rows=3,
        parts=[{"key": "part-00000.parquet", "rows": 3, "columns": ["a", "b"]}, {"key": "old"}],
        window={"lower": "2023-12-31 23:50:00", "upper": None},
        full_scan=False,
        keys_rows=7,
    )
    text = m.to_json()
    assert Manifest.from_json(text) == m
    assert text.decode().startswith('{\n "batch_id": "20240101T000000000000Z",')  # sorted keys
    assert m.columns() == {"a", "b"}  # parts staged before columns were listed add none
    assert Manifest("e", "mongo", "e", BATCH, "t").columns() == set()
