"""MongoDB `mode = changestream` against real SecantusDB, on chDB and the ClickHouse server.

Each test declares a change-stream entity over a collection of its own, writes to it, runs
whole batches in-process (Extract -> LoadRaw -> Snapshot) and reads raw rows and history back
from the warehouse. The truth they are held to is independent of the pipeline: each write's
document is read back from the server right after the write, each event's wall time comes
from the test's own change stream, and history is what `tests/support/change_oracle.py`
makes of those events. The session's SecantusDB is a one-node replica set; a tiny-oplog one
(`--oplog-max-entries`) and a standalone one start here, once per module.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import pymongo
import pytest
from bson import json_util
from luigi.configuration import get_config

from pipeline import runtime
from pipeline.core.batch import batch_time, new_batch_id
from pipeline.core.errors import ConfigError
from pipeline.core.names import batch_prefix
from pipeline.extract import mongo_changestream
from pipeline.extract.change_events import ChangeCaptureError, PreImageMismatch
from pipeline.extract.documents import canonical_json
from pipeline.extract.tasks import open_source
from pipeline.graph import Snapshot
from pipeline.snapshot.storage import Names, effective_time
from pipeline.state import load_position
from setup import stack
from tests.conftest import Env
from tests.support.change_oracle import ChangeOracle

CHECKED = ("state", "occupation")
COLUMNS = ("state", "occupation", "n", "profile", "tags")


# --- servers and helpers -------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the test process dies, even by SIGKILL."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _secantus(home: Path, *flags: str) -> Iterator[str]:
    """A SecantusDB server with `flags` on a free port, stopped at the end."""
    home.mkdir(parents=True, exist_ok=True)
    port = stack.free_port()
    log = (home / "server.log").open("wb")
    command = [str(Path(sys.executable).with_name("secantusd-py")), "--host", stack.HOST]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--storage-path", str(home / "data"), *flags],
        stdout=log,
        stderr=log,
        preexec_fn=_die_with_parent,
    )
    uri = f"mongodb://{stack.HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                with pymongo.MongoClient(uri, serverSelectionTimeoutMS=300) as client:
                    client.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                assert time.monotonic() < deadline, "secantusd did not start"
                time.sleep(0.1)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def tiny_oplog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _secantus(tmp_path_factory.mktemp("tiny"), "--oplog-max-entries", "20")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _secantus(tmp_path_factory.mktemp("standalone"), "--standalone")


class Webhook:
    """CDC_ALERT_WEBHOOK: every POSTed alert, as JSON."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        alerts = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                alerts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = HTTPServer((stack.HOST, 0), Handler)
        self.url = f"http://{stack.HOST}:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()
    monkeypatch.setenv("CDC_ALERT_WEBHOOK", hook.url)
    monkeypatch.setattr(mongo_changestream, "_STANDALONE_SAID", set())
    yield hook
    hook.server.shutdown()


def use_mongo(env: Env, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """Point the deployment at another MongoDB server."""
    env.values["CDC_MONGO_URI"] = uri
    monkeypatch.setenv("CDC_MONGO_URI", uri)
    runtime.reset()


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Capture:
    """One change-stream entity over its own collection, and the truth about its events."""

    def __init__(
        self,
        env: Env,
        name: str = "people",
        *,
        pre_images: bool = False,
        hard_deletes: str = "invalidate",
        collapse: bool = False,
        **options: str,
    ) -> None:
        self.env, self.name = env, name
        client = pymongo.MongoClient(env.values["CDC_MONGO_URI"], tz_aware=True)
        database = client[env.values["CDC_MONGO_DB"]]
        if pre_images:
            database.create_collection(name, changeStreamPreAndPostImages={"enabled": True})
        else:
            database.create_collection(name)
        self.coll = database[name]
        self.truth = self.coll.watch(max_await_time_ms=50)  # every event from now on
        self.pending: list[tuple[str, Any, dict[str, Any] | None]] = []
        self.oracle = ChangeOracle(CHECKED, hard_deletes, collapse)
        self.whole_seconds = not env.wh.features.datetime64
        env.add_entity(
            name,
            source="mongo",
            collection=name,
            unique_key="_id",
            strategy="check",
            check_cols=", ".join(CHECKED),
            mode="changestream",
            hard_deletes=hard_deletes,
            collapse=str(collapse).lower(),
            **options,
        )

    # -- writes, each recorded with the document it left -------------------------------------

    def _record(self, op: str, _id: Any) -> None:
        self.pending.append((op, _id, self.coll.find_one({"_id": _id})))

    def insert(self, doc: dict[str, Any]) -> None:
        self.coll.insert_one(doc)
        self._record("insert", doc["_id"])

    def update(self, _id: Any, change: dict[str, Any] | list[dict[str, Any]]) -> None:
        assert self.coll.update_one({"_id": _id}, change).modified_count == 1
        self._record("update", _id)

    def replace(self, _id: Any, doc: dict[str, Any]) -> None:
        self.coll.replace_one({"_id": _id}, doc)
        self._record("replace", _id)

    def delete(self, _id: Any) -> None:
        self.coll.delete_one({"_id": _id})
        self._record("delete", _id)

    def _events(self) -> list[dict[str, Any]]:
        """The test's own stream's events for the pending writes (wall times, order)."""
        events = []
        while len(events) < len(self.pending):
            event = self.truth.try_next()
            if event is not None:
                events.append(event)
        got = [(e["operationType"], e["documentKey"]["_id"]) for e in events]
        assert got == [(op, _id) for op, _id, _ in self.pending]
        return events

    def _time(self, value: datetime) -> datetime:
        value = utc(value)
        return value.replace(microsecond=0) if self.whole_seconds else value

    # -- batches -----------------------------------------------------------------------------

    def run(self, batch: str | None = None, ok: bool = True) -> str:
        batch = batch or new_batch_id()
        status = self.env.build([Snapshot(entity=self.name, batch=batch)])
        assert (status.name == "SUCCESS") == ok, status
        if self.whole_seconds:  # the next writes in a later second than this batch's versions
            time.sleep(1 - time.time() % 1 + 0.01)
        return batch

    def scan_batch(self) -> str:
        """A batch that reads the collection whole (bootstrap, fallback, standalone)."""
        events = self._events()
        del events
        self.pending.clear()
        names = Names.of(self.env.database, runtime.settings().entity(self.name))
        batch = new_batch_id()
        at = effective_time(self.env.wh, names, batch) if self._has_history() else None
        scanned = {d["_id"]: d for d in self.coll.find()}
        self.run(batch)
        at = at or self._time(batch_time(batch))
        changes = [{"id": k, "op": "read", "time": None, **v} for k, v in sorted(scanned.items())]
        gone = [k for k in self.oracle.versions if k not in scanned]
        changes += [{"id": k, "op": "delete", "time": None} for k in gone]
        self.oracle.apply(changes, at)
        assert set(self.ops(batch)) == {"scan"} or not scanned
        return batch

    def change_batch(self) -> str:
        """A batch of the pending writes' events; its raw rows must be their true states."""
        events = self._events()
        batch = self.run()
        truth = [(op, _id, doc) for op, _id, doc in self.pending]
        self.pending.clear()
        rows = self.raw(batch)
        assert [(r["_op"], r["_id"]) for r in rows] == [(op, _id) for op, _id, _ in truth]
        for row, (_, _, doc), event in zip(rows, truth, events, strict=True):
            assert row["_wall_time"] == self._time(event["wallTime"])
            assert {c: row[c] for c in COLUMNS} == stored(doc), row
        self.oracle.apply(
            [
                {"id": _id, "op": op, "time": self._time(e["wallTime"]), **(doc or {})}
                for (op, _id, doc), e in zip(truth, events, strict=True)
            ],
            batch_time(batch),
        )
        return batch

    # -- what the warehouse holds ------------------------------------------------------------

    def _has_history(self) -> bool:
        return bool(self.env.wh.table_exists(self.env.database, f"{self.name}_snapshot__versions"))

    def raw(self, batch: str) -> list[dict[str, Any]]:
        columns = ", ".join(("_id", "_op", "_seq", "_wall_time", *COLUMNS))
        rows = self.env.rows(
            f"SELECT {columns} FROM {{db}}.raw_{self.name} WHERE _batch_id = %(b)s ORDER BY _seq",
            {"b": batch},
        )
        names = ("_id", "_op", "_seq", "_wall_time", *COLUMNS)
        out = [dict(zip(names, r, strict=True)) for r in rows]
        for row in out:
            row["_wall_time"] = row["_wall_time"] and utc(row["_wall_time"])
        return out

    def ops(self, batch: str) -> list[str]:
        return [r["_op"] for r in self.raw(batch)]

    def history(self) -> list[tuple[Any, ...]]:
        deleted = "dbt_is_deleted = 'True'" if self.oracle.hard_deletes == "new_record" else "0"
        rows = self.env.rows(
            f"SELECT _id, state, occupation, dbt_valid_from, dbt_valid_to, {deleted}"
            f" FROM {{db}}.{self.name}_snapshot ORDER BY _id, dbt_valid_from"
        )
        return [(i, s, o, utc(f), t and utc(t), bool(d)) for i, s, o, f, t, d in rows]

    def check(self) -> None:
        """History equals the oracle's, and current versions equal the collection."""
        assert self.history() == self.oracle.history()
        current = {r[0]: r[1:3] for r in self.history() if r[4] is None and not r[5]}
        if self.oracle.hard_deletes != "ignore":
            assert current == {
                d["_id"]: (d.get("state"), d.get("occupation")) for d in self.coll.find()
            }


def stored(doc: dict[str, Any] | None) -> dict[str, Any]:
    """The raw columns a document (None: deleted) types to, as the warehouse returns them."""
    doc = doc or {}
    out = {}
    for column in COLUMNS:
        value = doc.get(column)
        out[column] = canonical_json(value) if isinstance(value, dict | list) else value
    return out


def person(i: int, **fields: Any) -> dict[str, Any]:
    return {
        "_id": i,
        "state": "CA",
        "occupation": "Engineer",
        "n": i,
        "profile": {"city": "Oslo", "langs": ["no", "en"]},
        "tags": ["a", "b"],
        **fields,
    }


# --- history --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pre_images", "hard_deletes"),
    [(False, "invalidate"), (True, "invalidate"), (True, "new_record"), (False, "ignore")],
)
def test_changes_become_history_event_by_event(
    pipeline_env: Env, pre_images: bool, hard_deletes: str
) -> None:
    cap = Capture(pipeline_env, pre_images=pre_images, hard_deletes=hard_deletes)
    for i in range(1, 7):
        cap.insert(person(i))
    cap.scan_batch()
    cap.check()

    cap.update(1, {"$set": {"occupation": "Senior Engineer"}})  # the seed's CDC check
    cap.update(2, {"$set": {"n": 20, "profile.city": "Rome"}})  # unchecked columns only
    cap.update(2, {"$push": {"tags": "c"}, "$unset": {"profile.langs": ""}})
    cap.replace(3, {"state": "NY", "occupation": "Chef", "n": 3})
    cap.delete(4)
    cap.insert(person(7, state="WA"))
    for state in ("TX", "OR", "TX"):  # several changes of one key in one batch
        cap.update(5, {"$set": {"state": state}})
    cap.delete(6)  # a revival of the same _id, in one batch
    cap.insert(person(6, occupation="Pilot"))
    cap.update(7, [{"$set": {"tags": {"$slice": ["$tags", 1]}}}])  # truncatedArrays
    assert cap.ops(cap.change_batch()).count("update") == 7
    cap.check()
    rows = pipeline_env.rows(
        "SELECT occupation, dbt_valid_to FROM {db}.people_snapshot WHERE _id = 1"
        " ORDER BY dbt_valid_from"
    )
    assert [r[0] for r in rows] == ["Engineer", "Senior Engineer"] and rows[1][1] is None

    cap.insert(person(4, state="NV"))  # a revival across batches
    cap.update(6, {"$rename": {"n": "m"}, "$set": {"occupation": "Captain"}})
    cap.update(5, {"$inc": {"n": 1}})
    cap.change_batch()
    cap.check()

    quiet = cap.run()  # nothing changed: no rows, no versions, the position moves on
    assert cap.raw(quiet) == []
    assert json.loads(load_position(pipeline_env.wh, pipeline_env.database, "people") or "")[
        "token"
    ]
    cap.check()


def test_collapse_keeps_each_batchs_last_state(pipeline_env: Env) -> None:
    cap = Capture(pipeline_env, collapse=True)
    cap.insert(person(1))
    cap.scan_batch()
    for state in ("TX", "OR", "WA"):
        cap.update(1, {"$set": {"state": state}})
    cap.insert(person(2))
    cap.delete(2)
    cap.change_batch()
    cap.check()
    assert [r[1] for r in cap.history()] == ["CA", "WA"]


def test_a_crash_after_staging_loads_each_event_once_on_rerun(pipeline_env: Env) -> None:
    cap = Capture(pipeline_env)
    cap.insert(person(1))
    cap.scan_batch()
    before = load_position(pipeline_env.wh, pipeline_env.database, "people")
    cap.update(1, {"$set": {"state": "NY"}})
    cap.insert(person(2))
    events = cap._events()
    batch = new_batch_id()
    with mock.patch.dict(os.environ, {"CDC_FAILPOINT": "raw-after-part"}):
        cap.run(batch, ok=False)
    assert load_position(pipeline_env.wh, pipeline_env.database, "people") == before
    cap.update(1, {"$set": {"state": "OR"}})  # after the crash: the next batch's
    cap.run(batch)  # the rerun loads the staged events, once
    assert [(r["_op"], r["_id"], r["state"]) for r in cap.raw(batch)] == [
        ("update", 1, "NY"),
        ("insert", 2, "CA"),
    ]
    truth, cap.pending = cap.pending[:2], cap.pending[2:]
    cap.oracle.apply(
        [
            {"id": i, "op": op, "time": cap._time(e["wallTime"]), **(doc or {})}
            for (op, i, doc), e in zip(truth, events, strict=True)
        ],
        batch_time(batch),
    )
    cap.change_batch()
    cap.check()


@pytest.mark.parametrize("pre_images", [False, True])
def test_changes_during_the_bootstrap_scan_are_neither_lost_nor_out_of_order(
    pipeline_env: Env, pre_images: bool
) -> None:
    """Writes land after the first batch's start token: before the scan reads the keys (it
    reads the new state), after (it holds the old one) and on keys it never sees. The batch
    after replays them from the start token; each key's replayed changes collapse to its
    last, at its own time: nothing is lost, no state comes after a later one."""
    cap = Capture(pipeline_env, pre_images=pre_images)
    cap.coll.insert_many([person(i) for i in range(1, 1001)])
    config = get_config()
    batch_rows = config.get("cdc", "batch_rows")
    config.set("cdc", "batch_rows", "50")
    runtime.reset()
    scan = mongo_changestream.MongoChangeStreamSource._scan

    def scan_with_writes(self: Any, *args: Any) -> Iterator[Any]:
        if cap.whole_seconds:  # the writes come after the batch's second
            time.sleep(1.1)
        # after the start token, before the scan reads anything: it reads the new states
        for i, state in ((900, "NY"), (900, "TX"), (901, "NY")):
            cap.coll.update_one({"_id": i}, {"$set": {"state": state}})
        cap.coll.delete_one({"_id": 902})
        cap.coll.insert_one(person(5000, state="WA"))
        batches = scan(self, *args)
        yield next(batches)  # ids 1..50 are read: the scan holds their old states
        for i, state in ((1, "NY"), (2, "NY"), (1, "TX")):
            cap.coll.update_one({"_id": i}, {"$set": {"state": state}})
        cap.coll.delete_one({"_id": 3})
        cap.coll.insert_one(person(0, state="WA"))  # below where the scan has got to
        yield from batches

    try:
        with mock.patch.object(
            mongo_changestream.MongoChangeStreamSource, "_scan", scan_with_writes
        ):
            first = cap.run()
    finally:
        config.set("cdc", "batch_rows", batch_rows)
        runtime.reset()
    replay = cap.run()
    start = batch_time(first)
    if cap.whole_seconds:
        start = start.replace(microsecond=0)
    history = {}
    for _id, state, _, since, until, _ in cap.history():
        history.setdefault(_id, []).append((state, since == start, until is None))
    # read before the writes: the scanned state, then the last replayed one at its time
    assert history[1] == [("CA", True, False), ("TX", False, True)]
    assert history[2] == [("CA", True, False), ("NY", False, True)]
    assert history[3] == [("CA", True, False)]  # deleted after it was scanned: closed
    assert history[0] == [("WA", False, True)]  # inserted where the scan had passed
    # written before the scan read them: it holds the final state; the replay opens nothing
    assert history[900] == [("TX", True, True)] and history[901] == [("NY", True, True)]
    assert 902 not in history and history[5000] == [("WA", True, True)]
    replayed = [r["_id"] for r in cap.raw(replay)]
    assert sorted(replayed) == [0, 1, 2, 3, 900, 901, 902, 5000]  # one row per key
    current = {i: h[-1][0] for i, h in history.items() if h[-1][2]}
    assert current == {d["_id"]: d["state"] for d in cap.coll.find()}
    assert cap.raw(cap.run()) == []  # streaming from there on


# --- whole re-reads --------------------------------------------------------------------------


def test_lost_history_takes_one_full_scan_batch_then_streams_again(
    pipeline_env: Env, monkeypatch: pytest.MonkeyPatch, tiny_oplog: str, webhook: Webhook
) -> None:
    use_mongo(pipeline_env, monkeypatch, tiny_oplog)
    cap = Capture(pipeline_env)
    for i in range(1, 11):
        cap.insert(person(i))
    cap.scan_batch()
    cap.update(1, {"$set": {"state": "NY"}})
    cap.change_batch()
    cap.check()
    cap.update(2, {"$set": {"occupation": "Chef"}})  # lost with the history
    cap.delete(3)
    cap._events()  # the test's own stream saw them; the pipeline will not
    cap.pending.clear()
    cap.coll.database["noise"].insert_many([{"i": i} for i in range(50)])
    cap.coll.database.client.admin.command("secantusAdmin.pruneOplog")
    cap.truth = cap.coll.watch(max_await_time_ms=50)
    fallback = cap.scan_batch()
    cap.check()
    assert len(webhook.alerts) == 1 and "286" in webhook.alerts[0]["text"]
    assert "people takes one full-scan batch" in webhook.alerts[0]["text"]
    position = json.loads(load_position(pipeline_env.wh, pipeline_env.database, "people") or "{}")
    assert position["scan"] == fallback and position["token"]
    unchanged = [r for r in cap.history() if r[0] == 4]
    assert len(unchanged) == 1  # no false version for a key that did not change
    cap.update(4, {"$set": {"state": "OR"}})
    cap.change_batch()  # streaming again, from the fallback's start token
    cap.check()


def test_a_standalone_server_keeps_full_scans_and_says_so_once(
    pipeline_env: Env, monkeypatch: pytest.MonkeyPatch, standalone: str, webhook: Webhook
) -> None:
    use_mongo(pipeline_env, monkeypatch, standalone)
    client = pymongo.MongoClient(standalone)
    coll = client[pipeline_env.values["CDC_MONGO_DB"]]["people"]
    coll.insert_many([person(i) for i in range(1, 11)])
    pipeline_env.add_entity(
        "people",
        source="mongo",
        collection="people",
        unique_key="_id",
        check_cols="state, occupation",
        mode="changestream",
        hard_deletes="invalidate",
    )
    env = pipeline_env
    first = new_batch_id()
    assert env.build([Snapshot(entity="people", batch=first)]).name == "SUCCESS"
    coll.update_one({"_id": 1}, {"$set": {"state": "NY"}})
    coll.delete_one({"_id": 2})
    second = new_batch_id()
    assert env.build([Snapshot(entity="people", batch=second)]).name == "SUCCESS"
    for batch in (first, second):
        ops = env.rows(
            "SELECT DISTINCT _op FROM {db}.raw_people WHERE _batch_id = %(b)s", {"b": batch}
        )
        assert ops == [("scan",)]
    assert len(webhook.alerts) == 1 and "40573" in webhook.alerts[0]["text"]
    rows = env.rows(
        "SELECT _id, state, dbt_valid_to IS NULL FROM {db}.people_snapshot"
        " ORDER BY _id, dbt_valid_from"
    )
    assert rows[:4] == [(1, "CA", False), (1, "NY", True), (2, "CA", False), (3, "CA", True)]
    assert len(rows) == 11
    position = json.loads(load_position(env.wh, env.database, "people") or "{}")
    assert position["standalone"] is True and position["token"] is None
    client.close()


def test_a_partitioned_bootstrap_then_the_stream(pipeline_env: Env) -> None:
    cap = Capture(pipeline_env, partitions="3")
    for i in range(1, 31):
        cap.insert(person(i))
    batch = cap.scan_batch()
    staged = runtime.store().list(batch_prefix("mongo", "people", batch))
    assert {k.split("/")[-2] for k in staged if "/range=" in k} == {
        f"range={i:03d}" for i in range(3)
    }
    cap.update(7, {"$set": {"state": "NY"}})
    cap.delete(30)
    cap.change_batch()
    cap.check()


# --- the state of each event, typed as a full scan types it ----------------------------------


def test_change_rows_are_typed_exactly_as_a_full_scan_types_them(pipeline_env: Env) -> None:
    """Drift, `_extra`, `flatten` and the BSON mapping: the newest raw row of each key of a
    change-stream entity equals the row a full scan of the same collection loads."""
    env = pipeline_env
    cap = Capture(env, flatten="profile.city")
    env.add_entity(
        "scanned", source="mongo", collection="people", unique_key="_id", flatten="profile.city"
    )
    for i in range(1, 5):  # `_batch_id` cannot be a column: it lands in `_extra`
        at = datetime(2026, 1, i, 12, 0, 0, 250000, tzinfo=UTC)
        cap.insert(person(i, at=at, _batch_id=f"theirs-{i}"))
    cap.scan_batch()
    cap.update(1, {"$set": {"profile.city": "Rome", "extra_field": {"x": [1, 2]}}})
    cap.update(2, {"$set": {"n": 2.5, "new_column": True}})  # int -> float widening; drift
    cap.update(3, {"$unset": {"profile": ""}, "$set": {"at": datetime(2027, 1, 1, tzinfo=UTC)}})
    cap.replace(4, {"state": "NY", "occupation": "Chef", "tags": {"deep": {"er": 1}}})
    cap.update(4, {"$set": {"tags.deep.est": "x"}})
    cap.change_batch()
    assert env.build([Snapshot(entity="scanned", batch=new_batch_id())]).name == "SUCCESS"
    columns = [
        c
        for c in env.wh.columns(env.database, "raw_scanned")
        if not c.startswith("_") or c in ("_id", "_extra")
    ]
    assert {"profile__city", "_extra", "new_column"} <= set(columns)
    quoted = ", ".join(f"`{c}`" for c in columns)
    newest = env.rows(
        f"SELECT {quoted} FROM {{db}}.raw_people"
        " ORDER BY _id, _batch_id DESC, _seq DESC LIMIT 1 BY _id"
    )
    assert newest == env.rows(f"SELECT {quoted} FROM {{db}}.raw_scanned ORDER BY _id")


# --- failures that stop the entity -------------------------------------------------------------


def _read_all(env: Env, entity: str) -> None:
    position = load_position(env.wh, env.database, entity)
    source = open_source(runtime.settings().entity(entity), new_batch_id(), position)
    for _ in source.read().batches:
        pass


def test_a_pre_image_that_contradicts_the_raw_table_fails_by_name(pipeline_env: Env) -> None:
    cap = Capture(pipeline_env, pre_images=True)
    cap.insert(person(1))
    cap.scan_batch()
    table = f"`{pipeline_env.database}`.raw_people"
    pipeline_env.wh.execute(  # a raw row that does not match the collection any more
        f"INSERT INTO {table} (_id, state, occupation, n, profile, tags, _op, _seq, _batch_id,"
        " _loaded_at, _row_hash, _check_hash, _check_cols)"
        " SELECT _id, 'XX', occupation, n, profile, tags, 'update', 1, '99990101T000000Z',"
        f" _loaded_at, 0, 0, '' FROM {table}"
    )
    cap.update(1, {"$set": {"occupation": "Chef"}})
    namespace = f"{cap.coll.database.name}.people"
    with pytest.raises(PreImageMismatch, match=rf"{namespace}: _id=1 at Timestamp.*'state'"):
        _read_all(pipeline_env, "people")


@pytest.mark.parametrize("how", ["drop", "rename"])
def test_a_dropped_or_renamed_collection_stops_the_entity(pipeline_env: Env, how: str) -> None:
    cap = Capture(pipeline_env)
    cap.insert(person(1))
    cap.scan_batch()
    if how == "drop":
        cap.coll.drop()
        what = "was dropped"
    else:
        cap.coll.rename("people_old")
        what = "was renamed to .*people_old"
    cap.coll.database.create_collection("people")  # a new collection by the old name
    with pytest.raises(ChangeCaptureError, match=rf"people {what} at Timestamp"):
        _read_all(pipeline_env, "people")


def test_status_shows_the_lag_and_the_oplog_window(
    pipeline_env: Env, monkeypatch: pytest.MonkeyPatch, tiny_oplog: str
) -> None:
    from pipeline.ops.status import capture_status

    use_mongo(pipeline_env, monkeypatch, tiny_oplog)  # reading the oplog decodes all of it
    cap = Capture(pipeline_env)
    cap.insert(person(1))
    cap.scan_batch()
    cap.update(1, {"$set": {"state": "NY"}})
    cap.change_batch()
    (line,) = [r for r in capture_status(runtime.settings()) if r["entity"] == "people"]
    assert line["name"].endswith(".people (change stream)")
    assert "read to Timestamp(" in line["lag"] and "last event" in line["lag"]
    assert line["holds"].startswith("oplog Timestamp(") and line["warning"] == ""


def test_unique_key_other_than_id_is_refused(pipeline_env: Env) -> None:
    pipeline_env.add_entity(
        "people", source="mongo", collection="people", unique_key="user_id", mode="changestream"
    )
    pipeline_env.mongo("people").insert_one({"_id": 1, "user_id": "u1"})
    with pytest.raises(ConfigError, match="set unique_key = _id"):
        _read_all(pipeline_env, "people")


def test_ids_of_every_kind_find_their_previous_state(pipeline_env: Env) -> None:
    """ObjectId, string and int `_id`s: an update finds its base by the stored `_id`."""
    cap = Capture(pipeline_env)
    oid = json_util.loads('{"$oid": "65a1b2c3d4e5f60718293a4b"}')
    for _id in (oid, "k1"):
        cap.coll.insert_one({"_id": _id, "state": "CA", "occupation": "x"})
    env = pipeline_env
    first = new_batch_id()
    assert env.build([Snapshot(entity="people", batch=first)]).name == "SUCCESS"
    cap.truth.close()
    cap.coll.update_one({"_id": oid}, {"$set": {"state": "NY"}})
    cap.coll.update_one({"_id": "k1"}, {"$set": {"occupation": "y"}})
    assert env.build([Snapshot(entity="people", batch=new_batch_id())]).name == "SUCCESS"
    rows = env.rows(
        "SELECT _id, state, occupation FROM {db}.people_snapshot WHERE dbt_valid_to IS NULL"
        " ORDER BY _id"
    )
    assert rows == [(str(oid), "NY", "x"), ("k1", "CA", "y")]
