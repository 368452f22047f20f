"""Log-based capture (`mode = log`) against the real PostgreSQL 15, on chDB and ClickHouse.

Each test declares a log entity over a table in its own source database, changes the table,
runs whole batches in-process (`Env.run`) and reads history back from the warehouse. The
publication and slot of an entity live in the source database; the fixture drops the slots
before the database goes (PostgreSQL refuses to drop a database that has a slot).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg2
import pytest
from luigi.configuration import get_config

from pipeline import runtime
from pipeline.extract.pg_capture import LogCaptureError, capture_name
from pipeline.state import load_position
from setup import stack
from tests.conftest import Env

ENTITY = "items"
TABLE = """
CREATE TABLE public.items (
    id integer PRIMARY KEY,
    name text,
    score integer,
    note text,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class Source:
    """The entity's source database, one autocommitted statement at a time."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True

    def run(self, *statements: str, params: Any = None) -> None:
        with self.conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement, params)

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall())

    def close(self) -> None:
        self.conn.close()


class LogEnv:
    """A deployment with one log entity over `public.items`."""

    def __init__(self, env: Env, source: Source) -> None:
        self.env, self.source = env, source
        self._settings: list[tuple[str, str | None]] = []

    def entity(self, name: str = ENTITY, **options: str) -> None:
        defaults = {
            "source": "postgres",
            "table": "public.items",
            "unique_key": "id",
            "strategy": "check",
            "mode": "log",
            "hard_deletes": "invalidate",
        }
        self.env.add_entity(name, **{**defaults, **options})

    def setting(self, key: str, value: str) -> None:
        """A [cdc] setting without an environment variable, put back at teardown."""
        config = get_config()
        old = config.get("cdc", key, fallback=None) if config.has_section("cdc") else None
        if not config.has_section("cdc"):
            config.add_section("cdc")
        config.set("cdc", key, value)
        self._settings.append((key, old))
        runtime.reset()

    def restore(self) -> None:
        config = get_config()
        for key, old in reversed(self._settings):
            if old is None:
                config.remove_option("cdc", key)
            else:
                config.set("cdc", key, old)
        runtime.reset()

    def run(self, batch: str | None = None, entity: str = ENTITY, ok: bool = True) -> str:
        """One batch of the entity, Extract -> LoadRaw -> Snapshot (the demo's entities and
        marts stay out: their sources are empty here)."""
        from pipeline.core.batch import new_batch_id
        from pipeline.graph import Snapshot

        batch = batch or new_batch_id()
        status = self.env.build([Snapshot(entity=entity, batch=batch)])
        assert (status.name == "SUCCESS") == ok, status
        self.tick()
        return batch

    def tick(self) -> None:
        """Let a second pass on a warehouse that keeps whole seconds (ClickHouse 18.16), where
        changes of a key within one second are one version."""
        if not self.env.wh.features.datetime64:
            time.sleep(1.05)

    def history(self, columns: str = "id, name", entity: str = ENTITY) -> list[tuple[Any, ...]]:
        return self.env.rows(
            f"SELECT {columns}, dbt_valid_from, dbt_valid_to FROM {{db}}.{entity}_snapshot"
            " ORDER BY id, dbt_valid_from"
        )

    def current(self, columns: str = "id, name", entity: str = ENTITY) -> list[tuple[Any, ...]]:
        return self.env.rows(
            f"SELECT {columns} FROM {{db}}.{entity}_snapshot WHERE dbt_valid_to IS NULL ORDER BY id"
        )

    def raw(self, columns: str, entity: str = ENTITY, where: str = "") -> list[tuple[Any, ...]]:
        return self.env.rows(
            f"SELECT {columns} FROM {{db}}.raw_{entity} {where} ORDER BY _batch_id, _seq"
        )

    def slot(self, entity: str = ENTITY) -> str:
        return capture_name(self.env.database, entity)


@pytest.fixture
def log_env(pipeline_env: Env) -> Iterator[LogEnv]:
    source = Source(pipeline_env.values["CDC_POSTGRES_DSN"])
    source.run(TABLE)
    env = LogEnv(pipeline_env, source)
    yield env
    env.restore()
    source.run(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        " WHERE database = current_database()"
    )
    source.close()


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_inserts_updates_deletes_become_history(log_env: LogEnv, identity: str) -> None:
    src = log_env.source
    src.run(f"ALTER TABLE items REPLICA IDENTITY {identity}")
    src.run("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    log_env.entity()
    log_env.run()
    assert log_env.current() == [(1, "a"), (2, "b"), (3, "c")]
    assert log_env.raw("id, _op, _commit_ts") == [(i, "read", None) for i in (1, 2, 3)]
    src.run("UPDATE items SET name = 'a2' WHERE id = 1")
    src.run("DELETE FROM items WHERE id = 2")
    src.run("INSERT INTO items (id, name) VALUES (4, 'd')")
    log_env.run()
    assert log_env.current() == [(1, "a2"), (3, "c"), (4, "d")]
    changes = log_env.raw("id, _op, _lsn > 0, _xid > 0", where="WHERE _op != 'read'")
    assert changes == [(1, "update", 1, 1), (2, "delete", 1, 1), (4, "insert", 1, 1)]
    history = log_env.history()
    starts = dict(log_env.raw("id, _commit_ts", where="WHERE _op != 'read'"))
    closed = {row[0]: row for row in history if row[3] is not None}
    assert {k: (v[1], v[3]) for k, v in closed.items()} == {
        1: ("a", starts[1]),
        2: ("b", starts[2]),
    }
    assert [row[2] for row in history if row[0] in (1, 4) and row[3] is None] == [
        starts[1],
        starts[4],
    ]
    flushed = src.rows(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (log_env.slot(),),
    )
    position = load_position(log_env.env.wh, log_env.env.database, ENTITY)
    assert flushed == [(position,)]  # acknowledged exactly at the loaded position
    log_env.run()  # nothing changed: nothing new
    assert log_env.history() == history


@pytest.mark.parametrize("collapse", [False, True])
def test_several_changes_of_a_key_in_one_batch(log_env: LogEnv, collapse: bool) -> None:
    src = log_env.source
    src.run("INSERT INTO items (id, name) VALUES (1, 'a')")
    log_env.entity(collapse=str(collapse).lower())
    log_env.run()
    for name in ("b", "c", "d"):
        src.run("UPDATE items SET name = %s WHERE id = 1", params=(name,))
        log_env.tick()
    src.run("BEGIN; INSERT INTO items (id, name) VALUES (2, 'x'); UPDATE items SET name = 'y'"
            " WHERE id = 2; COMMIT")  # fmt: skip
    log_env.run()
    times = log_env.raw("_commit_ts", where="WHERE _op = 'update' AND id = 1")
    names = [row[1] for row in log_env.history() if row[0] == 1]
    if collapse:
        assert names == ["a", "d"]
        assert log_env.history()[1][2] == times[-1][0]
    else:
        assert names == ["a", "b", "c", "d"]
        assert [row[2] for row in log_env.history()[1:4]] == [t for (t,) in times]
    # one transaction's changes share an instant: the last one wins
    assert [row[1] for row in log_env.history() if row[0] == 2] == ["y"]


def test_timestamp_strategy_a_change_without_updated_at_is_history(log_env: LogEnv) -> None:
    src = log_env.source
    src.run("INSERT INTO items (id, name, updated_at) VALUES (1, 'a', '2026-01-01 00:00:00+00')")
    log_env.entity(strategy="timestamp", updated_at="updated_at")
    log_env.run()
    src.run("UPDATE items SET name = 'b' WHERE id = 1")  # updated_at not bumped
    log_env.tick()
    src.run("UPDATE items SET name = name WHERE id = 1")  # changes nothing
    src.run("UPDATE items SET name = 'c', updated_at = '2030-06-01 00:00:00+00' WHERE id = 1")
    log_env.run()
    commit = log_env.raw("_commit_ts", where="WHERE _op = 'update'")[0][0]
    history = log_env.history()
    assert [(n, f) for _, n, f, _ in history] == [
        ("a", datetime(2026, 1, 1, tzinfo=UTC)),
        ("b", commit),
        ("c", datetime(2030, 6, 1, tzinfo=UTC)),
    ]


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_unchanged_toast_values_take_the_previous_version(log_env: LogEnv, identity: str) -> None:
    src = log_env.source
    big = "n" * 5000
    src.run(f"ALTER TABLE items REPLICA IDENTITY {identity}")
    src.run("ALTER TABLE items ALTER COLUMN note SET STORAGE EXTERNAL")  # TOASTed, uncompressed
    src.run("INSERT INTO items (id, name, note) VALUES (1, 'a', %s), (2, 'b', %s)",
            params=(big, big + "2"))  # fmt: skip
    log_env.entity()
    log_env.run()
    src.run("UPDATE items SET name = 'a2' WHERE id = 1")  # note unchanged: not sent
    log_env.run()
    src.run("UPDATE items SET name = 'a3' WHERE id = 1")  # its previous version is in raw
    src.run("UPDATE items SET id = 20, name = 'b2' WHERE id = 2")  # a key change
    log_env.tick()
    src.run("UPDATE items SET name = 'b3' WHERE id = 20")
    log_env.run()
    unsent = "note" if identity == "DEFAULT" else ""
    marks = log_env.raw("id, _op, _unchanged", where="WHERE _op != 'read'")
    assert marks == [
        (1, "update", unsent),
        (1, "update", unsent),
        (2, "delete", ""),
        (20, "insert", unsent),
        (20, "update", unsent),
    ]
    assert log_env.env.count("raw_items", "WHERE _op != 'delete' AND note IS NULL") == 0
    notes = {(k, n): note for k, n, note, _, _ in log_env.history("id, name, note")}
    assert notes == {
        (1, "a"): big, (1, "a2"): big, (1, "a3"): big,
        (2, "b"): big + "2", (20, "b2"): big + "2", (20, "b3"): big + "2",
    }  # fmt: skip


def test_new_column_reaches_raw_and_history(log_env: LogEnv) -> None:
    src = log_env.source
    src.run("INSERT INTO items (id, name) VALUES (1, 'a')")
    log_env.entity()
    log_env.run()
    src.run("UPDATE items SET name = 'b' WHERE id = 1")
    log_env.tick()
    src.run("ALTER TABLE items ADD COLUMN colour text")
    src.run("INSERT INTO items (id, name, colour) VALUES (2, 'c', 'red')")
    src.run("UPDATE items SET colour = 'blue' WHERE id = 1")
    log_env.run()
    assert "colour" in log_env.env.wh.columns(log_env.env.database, "raw_items")
    assert log_env.current("id, name, colour") == [(1, "b", "blue"), (2, "c", "red")]
    assert [r[:3] for r in log_env.history("id, name, colour")] == [
        (1, "a", None), (1, "b", None), (1, "b", "blue"), (2, "c", "red"),
    ]  # fmt: skip


def test_truncate_ends_the_batch_and_the_next_rereads_the_table(log_env: LogEnv) -> None:
    src = log_env.source
    at = "'2026-01-01 00:00:00+00'"
    src.run(f"INSERT INTO items (id, name, updated_at) VALUES (1, 'a', {at}), (2, 'b', {at}),"
            f" (3, 'c', {at})")  # fmt: skip
    log_env.entity(delete_guard="1")
    log_env.run()
    src.run("UPDATE items SET name = 'a2' WHERE id = 1")
    src.run("TRUNCATE items")
    src.run(f"INSERT INTO items (id, name, updated_at) VALUES (2, 'b', {at}), (4, 'd', {at})")
    log_env.run()
    position = load_position(log_env.env.wh, log_env.env.database, ENTITY)
    assert position is not None and json.loads(position.split(" ", 1)[1]) == {"resync": "truncate"}
    assert log_env.current() == [(1, "a2"), (2, "b"), (3, "c")]  # the batch ends at the TRUNCATE
    log_env.run()  # the whole table again: what the TRUNCATE removed is retired
    last = "WHERE _batch_id = (SELECT max(_batch_id) FROM {db}.raw_items)"
    assert log_env.env.rows(f"SELECT DISTINCT _op FROM {{db}}.raw_items {last}") == [("scan",)]
    assert log_env.current() == [(2, "b"), (4, "d")]
    assert [r[:2] for r in log_env.history()].count((2, "b")) == 1  # no false version
    src.run("UPDATE items SET name = 'd2' WHERE id = 4")
    log_env.run()
    assert log_env.current() == [(2, "b"), (4, "d2")]
    assert log_env.env.count("raw_items", "WHERE _op = 'update' AND id = 4") == 1


def test_crash_before_the_acknowledgement_loads_each_change_once(log_env: LogEnv) -> None:
    src = log_env.source
    src.run("INSERT INTO items (id, name) VALUES (1, 'a')")
    log_env.entity()
    log_env.run()
    src.run("UPDATE items SET name = 'b' WHERE id = 1")
    with mock.patch.dict(os.environ, {"CDC_FAILPOINT": "log-before-ack"}):
        batch = log_env.run(ok=False)  # loaded (marker written), then the process "died"
    flushed = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s"
    position = load_position(log_env.env.wh, log_env.env.database, ENTITY)
    assert src.rows(flushed, (log_env.slot(),)) != [(position,)]  # not acknowledged
    src.run("UPDATE items SET name = 'c' WHERE id = 1")
    log_env.run(batch)  # the same batch finishes (its snapshot); nothing is read again
    with mock.patch.dict(os.environ, {"CDC_FAILPOINT": "raw-after-part"}):
        crashed = log_env.run(ok=False)  # staged, crashed in the middle of the raw load
    log_env.run(crashed)
    log_env.run()
    assert log_env.raw("name, _op", where="WHERE _op = 'update'") == [
        ("b", "update"),
        ("c", "update"),
    ]
    assert [r[1] for r in log_env.history()] == ["a", "b", "c"]
    position = load_position(log_env.env.wh, log_env.env.database, ENTITY)
    assert src.rows(flushed, (log_env.slot(),)) == [(position,)]


def test_chunked_first_load_resumes_after_a_crash(log_env: LogEnv) -> None:
    src = log_env.source
    src.run("INSERT INTO items (id, name) SELECT g, 'v' || g FROM generate_series(1, 10) g")
    log_env.setting("snapshot_chunk_rows", "3")
    log_env.entity()
    with mock.patch.dict(os.environ, {"CDC_FAILPOINT": "log-first-load-chunk"}):
        batch = log_env.run(ok=False)  # chunk 0 (ids 1-3) staged, then the crash
    store = runtime.store()
    prefix = f"postgres/{ENTITY}/batch={batch}/"
    first = store.get(prefix + "chunk=00000/_manifest.json")
    src.run("UPDATE items SET name = 'late1' WHERE id = 1")  # in chunk 0: a change after it
    src.run("UPDATE items SET name = 'late9' WHERE id = 9")  # in chunk 3, not yet read
    src.run("DELETE FROM items WHERE id = 5")
    log_env.run(batch)
    assert store.get(prefix + "chunk=00000/_manifest.json") == first  # resumed, not redone
    chunks = sorted({k.split("/")[3] for k in store.list(prefix) if "chunk=" in k})
    assert chunks == ["chunk=00000", "chunk=00001", "chunk=00002", "chunk=00003"]
    reads = dict(log_env.raw("id, name", where="WHERE _op = 'read'"))
    assert reads[1] == "v1" and reads[9] == "late9" and 5 not in reads
    changes = log_env.raw("id, _op", where="WHERE _op != 'read'")
    assert changes == [(1, "update")]  # what chunks 1-3 saw is not applied again
    expected = src.rows("SELECT id, name FROM items ORDER BY id")
    assert log_env.current() == expected
    assert [r[1] for r in log_env.history() if r[0] == 1] == ["v1", "late1"]


def test_first_load_under_concurrent_writes_loses_and_repeats_nothing(log_env: LogEnv) -> None:
    """Updates only raise a key's score, so history out of order or applied twice would show
    as a score that goes down or stays; the end state must equal the table."""
    src = log_env.source
    src.run("INSERT INTO items (id, name, score) SELECT g, 'v', 0 FROM generate_series(1, 400) g")
    log_env.setting("snapshot_chunk_rows", "25")
    log_env.entity(hard_deletes="invalidate")
    stop = threading.Event()
    done: list[int] = []

    def write() -> None:
        conn = psycopg2.connect(log_env.env.values["CDC_POSTGRES_DSN"])
        conn.autocommit = True
        rng, new_id = random.Random(7), 1000
        with conn.cursor() as cur:
            while not stop.is_set():
                key = rng.randint(1, 400)
                op = rng.random()
                if op < 0.6:
                    cur.execute("UPDATE items SET score = score + 1 WHERE id = %s", (key,))
                elif op < 0.7:
                    cur.execute(
                        "BEGIN; UPDATE items SET score = score + 1 WHERE id = %s;"
                        " UPDATE items SET score = score + 1 WHERE id = %s; COMMIT",
                        (key, 401 - key),
                    )
                elif op < 0.8:
                    new_id += 1
                    cur.execute(
                        "INSERT INTO items (id, name, score) VALUES (%s, 'n', 0)", (new_id,)
                    )
                elif op < 0.9:
                    cur.execute("DELETE FROM items WHERE id = %s", (key,))
                else:
                    new_id += 1
                    cur.execute("UPDATE items SET id = %s WHERE id = %s", (new_id, key))
                done.append(1)
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        log_env.run()
    finally:
        stop.set()
        writer.join()
    log_env.run()
    assert len(done) > 50  # the writer really wrote during the first load
    table = src.rows("SELECT id, name, score FROM items ORDER BY id")
    assert log_env.current("id, name, score") == table
    reads = log_env.raw("id", where="WHERE _op = 'read'")
    assert len(reads) == len(set(reads))
    scores: dict[int, list[int]] = {}
    for key, score, _, _ in log_env.history("id, score"):
        scores.setdefault(key, []).append(score)
    assert all(a < b for s in scores.values() for a, b in itertools.pairwise(s))


class Webhook:
    """A loopback HTTP server keeping every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def lose_slot(src: Source, slot: str) -> None:
    """Make the server invalidate the slot: keep 1 MB of WAL for slots, write more, checkpoint."""
    src.run("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", "SELECT pg_reload_conf()")
    try:
        src.run("CREATE TABLE filler (n integer, pad text)")
        for _ in range(20):
            src.run(
                "INSERT INTO filler SELECT g, repeat('p', 200) FROM generate_series(1, 20000) g",
                "SELECT pg_switch_wal()",
                "CHECKPOINT",
            )
            status = src.rows("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                              (slot,))  # fmt: skip
            if status == [("lost",)]:
                return
        raise AssertionError(f"slot {slot} not lost: {status}")
    finally:
        src.run("ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")


def test_lost_slot_rereads_the_table_on_a_new_slot_and_alerts(
    log_env: LogEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = log_env.source
    at = "'2026-01-01 00:00:00+00'"
    src.run(f"INSERT INTO items (id, name, updated_at) VALUES (1, 'a', {at}), (2, 'b', {at}),"
            f" (3, 'c', {at})")  # fmt: skip
    log_env.entity(delete_guard="1")
    log_env.run()
    src.run("UPDATE items SET name = 'a2' WHERE id = 1", "DELETE FROM items WHERE id = 2")
    lose_slot(src, log_env.slot())
    hook = Webhook()
    monkeypatch.setenv("CDC_ALERT_WEBHOOK", hook.url)
    try:
        log_env.run()
    finally:
        hook.close()
    assert len(hook.received) == 1 and log_env.slot() in hook.received[0]["error"]
    assert "invalidated" in hook.received[0]["error"]
    assert log_env.raw("DISTINCT _op", where="WHERE _batch_id = (SELECT max(_batch_id) FROM"
                       " {db}.raw_items)") == [("scan",)]  # fmt: skip
    assert log_env.current() == [(1, "a2"), (3, "c")]
    assert [r[:2] for r in log_env.history()] == [(1, "a"), (1, "a2"), (2, "b"), (3, "c")]
    assert src.rows("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                    (log_env.slot(),)) == [("reserved",)]  # fmt: skip
    src.run("UPDATE items SET name = 'c2' WHERE id = 3")
    log_env.run()
    assert log_env.current() == [(1, "a2"), (3, "c2")]
    assert log_env.env.count("raw_items", "WHERE _op = 'update'") == 1


def test_two_entities_read_the_same_table(log_env: LogEnv) -> None:
    src = log_env.source
    src.run("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b')")
    log_env.entity()
    log_env.entity("items_b")
    log_env.run()
    log_env.run(entity="items_b")
    src.run("UPDATE items SET name = 'a2' WHERE id = 1", "DELETE FROM items WHERE id = 2")
    log_env.run()
    log_env.run(entity="items_b")
    slots = src.rows("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
    assert (log_env.slot(),) in slots and (log_env.slot("items_b"),) in slots
    publications = src.rows("SELECT pubname FROM pg_publication ORDER BY 1")
    assert publications == sorted([(log_env.slot(),), (log_env.slot("items_b"),)])
    assert log_env.current() == log_env.current(entity="items_b") == [(1, "a2")]


def test_status_shows_each_slot_its_lag_and_retained_wal(log_env: LogEnv) -> None:
    from pipeline.ops.status import capture_status, render

    log_env.entity()
    (before,) = capture_status(runtime.settings())
    assert before["name"] == log_env.slot() and "no slot" in before["warning"]
    log_env.source.run("INSERT INTO items (id, name) VALUES (1, 'a')")
    log_env.run()
    (line,) = capture_status(runtime.settings())
    assert line["entity"] == ENTITY and line["name"] == log_env.slot()
    assert line["lag"].endswith(" bytes") and line["holds"].endswith(" of WAL (reserved)")
    assert line["warning"] == ""
    log_env.setting("slot_lag_warn_mb", "0.000001")
    (line,) = capture_status(runtime.settings())
    assert "slot_lag_warn_mb" in line["warning"]
    shown = render({**collect_empty(), "capture": [line]})
    assert "Log capture" in shown and log_env.slot() in shown


def collect_empty() -> dict[str, Any]:
    return {
        "database": "d", "warehouse": "w", "generated_at": None, "unfinished_batch": None,
        "runs": [], "lag": [], "snapshots": [], "failures": [],
    }  # fmt: skip


TYPED = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE typed (
    id int PRIMARY KEY, i2 int2, i8 int8, f4 float4, f8 float8, n numeric(12, 3), nu numeric,
    b bool, d date, ts timestamp, tz timestamptz, t text, u uuid, j json, jb jsonb, ai int[],
    at text[], by bytea, iv interval, m mood, vc varchar(10)
);
INSERT INTO typed VALUES
 (1, -32768, 9223372036854775807, 1.5, 'NaN', -12.345, 0.10, true, '2024-02-29',
  '2024-02-29 10:00:00.123456', '2024-02-29 10:00:00.5+05:30', 'é\tline' || chr(10) || 'two',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1.50, "a": [1, 2]}', '{"b": 1.50, "a": null}',
  '{1,NULL,3}', '{"x,y","q\\"uote"}', '\\x00ff', '1 day 02:03:04', 'happy', 'ten chars!'),
 (2, 0, 0, '-Infinity', 'Infinity', 0, 1e-20, false, '1970-01-01', '1970-01-01 00:00:00',
  '1970-01-01 00:00:00+00', '', NULL, '[]', '{}', '{}', '{}', '\\x', '-1 mon', 'sad', ''),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL);
"""


def nan_free(value: Any) -> Any:
    """NaN != NaN: compare it as a marker."""
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def test_log_rows_equal_polled_rows_type_for_type(log_env: LogEnv) -> None:
    """A log entity's raw columns and values equal a full-scan entity's of the same table."""
    src = log_env.source
    src.run(TYPED)
    log_env.entity("typed_log", table="public.typed", check_cols="all")
    log_env.env.add_entity(
        "typed_full", source="postgres", table="public.typed", unique_key="id", mode="full"
    )
    for entity in ("typed_log", "typed_full"):
        log_env.run(entity=entity)
    src.run("UPDATE typed SET id = id")  # every row through the log, values as they were
    for entity in ("typed_log", "typed_full"):
        log_env.run(entity=entity)
    wh, db = log_env.env.wh, log_env.env.database
    log_columns, full_columns = wh.columns(db, "raw_typed_log"), wh.columns(db, "raw_typed_full")
    names = [c for c in full_columns if not c.startswith("_")]
    assert {c: log_columns[c] for c in names} == {c: full_columns[c] for c in names}
    listed = ", ".join(f"`{c}`" for c in names)
    from_log = log_env.env.rows(
        f"SELECT {listed}, _check_hash FROM {{db}}.raw_typed_log WHERE _op = 'update' ORDER BY id"
    )
    last = "(SELECT max(_batch_id) FROM {db}.raw_typed_full)"
    from_full = log_env.env.rows(
        f"SELECT {listed}, _check_hash FROM {{db}}.raw_typed_full WHERE _batch_id = {last}"
        " ORDER BY id"
    )
    assert len(from_log) == 3
    assert [tuple(map(nan_free, r)) for r in from_log] == [
        tuple(map(nan_free, r)) for r in from_full
    ]
    reads = log_env.env.rows(
        f"SELECT {listed}, _check_hash FROM {{db}}.raw_typed_log WHERE _op = 'read' ORDER BY id"
    )
    assert [r[-1] for r in reads] == [r[-1] for r in from_full]  # first-load rows hash alike


# -- what capture refuses, before anything is created --------------------------------------------


class Checked:
    """A source database of its own, read by a log entity as a given role."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.admin = Source(dsn)
        self.roles: list[str] = []

    def role(self, *attributes: str) -> str:
        name = f"r_{uuid.uuid4().hex[:10]}"
        self.admin.run(f'CREATE ROLE "{name}" LOGIN {" ".join(attributes)}')
        self.roles.append(name)
        return name

    def as_role(self, role: str) -> str:
        return self.dsn.replace("postgresql://postgres@", f"postgresql://{role}@")

    def problems(self, table: str, role: str = "postgres", **options: str) -> str:
        """The error the entity's read raises (nothing may have been created)."""
        dsn = self.dsn if role == "postgres" else self.as_role(role)
        source = log_source(dsn, table, **options)
        with pytest.raises(LogCaptureError) as caught:
            source.read()
        assert self.admin.rows("SELECT count(*) FROM pg_publication") == [(0,)]
        assert self.admin.rows("SELECT count(*) FROM pg_replication_slots"
                               " WHERE database = current_database()") == [(0,)]  # fmt: skip
        return str(caught.value)

    def close(self) -> None:
        for role in self.roles:
            self.admin.run(f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')
        self.admin.close()


def log_source(dsn: str, table: str, **options: str) -> Any:
    from pipeline.config import load_settings
    from pipeline.config.entities import parse_entity
    from pipeline.extract import Context
    from pipeline.extract.postgres_log import PostgresLogSource

    entity = parse_entity(
        "checked",
        {"source": "postgres", "table": table, "unique_key": "id", "mode": "log", **options},
        {"delete_guard": 0.2, "raw_retention_days": 30.0},
    )
    settings = dataclasses.replace(load_settings(), postgres_dsn=dsn, database="t_checks")
    return PostgresLogSource(Context(settings, entity, "20260101T000000000000Z"))


@pytest.fixture
def checked(pg_dsn_factory: Callable[[], str]) -> Iterator[Checked]:
    found = Checked(pg_dsn_factory())
    yield found
    found.close()


def test_a_table_without_primary_key_or_replica_identity_is_refused(checked: Checked) -> None:
    checked.admin.run("CREATE TABLE nopk (id integer, name text)", "INSERT INTO nopk VALUES (1)")
    message = checked.problems("public.nopk")
    assert "[entity.checked]" in message and "table public.nopk has no primary key" in message
    assert (
        'ALTER TABLE "public"."nopk" ADD PRIMARY KEY ("id");  -- or: ALTER TABLE "public"."nopk"'
        " REPLICA IDENTITY FULL;" in message
    )
    checked.admin.run("UPDATE nopk SET name = 'still writable'")  # it never entered a publication
    checked.admin.run('ALTER TABLE "public"."nopk" ADD PRIMARY KEY ("id")')
    assert capture_problems(checked.dsn, "public.nopk") == []


def test_a_role_without_replication_is_refused(checked: Checked) -> None:
    role = checked.role()
    checked.admin.run(
        f'CREATE TABLE owned (id integer PRIMARY KEY); ALTER TABLE owned OWNER TO "{role}"'
    )
    checked.admin.run(f'GRANT CREATE ON DATABASE "{dbname(checked.dsn)}" TO "{role}"')
    message = checked.problems("public.owned", role)
    assert f"role {role} has no REPLICATION attribute" in message and "public.owned" in message
    assert f'ALTER ROLE "{role}" REPLICATION;' in message
    checked.admin.run(f'ALTER ROLE "{role}" REPLICATION')
    assert capture_problems(checked.as_role(role), "public.owned") == []


def test_a_publication_the_role_may_not_create_is_refused(checked: Checked) -> None:
    owner, reader = checked.role(), checked.role("REPLICATION")
    checked.admin.run(
        f'CREATE TABLE shop (id integer PRIMARY KEY); ALTER TABLE shop OWNER TO "{owner}"'
    )
    checked.admin.run(f'GRANT SELECT ON shop TO "{reader}"')
    message = checked.problems("public.shop", reader)
    database = dbname(checked.dsn)
    assert f"role {reader} may not create publication" in message and "public.shop" in message
    assert f'GRANT CREATE ON DATABASE "{database}" TO "{reader}";' in message
    assert f'GRANT "{owner}" TO "{reader}";' in message
    checked.admin.run(
        f'GRANT CREATE ON DATABASE "{database}" TO "{reader}"', f'GRANT "{owner}" TO "{reader}"'
    )
    assert capture_problems(checked.as_role(reader), "public.shop") == []


def test_wal_level_not_logical_is_refused(tmp_path: Path) -> None:
    server = stack.start_postgres(tmp_path, wal_level="replica")
    try:
        dsn = server.env["CDC_POSTGRES_DSN"]
        Source(dsn).run("CREATE TABLE items (id integer PRIMARY KEY)")
        with pytest.raises(LogCaptureError) as caught:
            log_source(dsn, "public.items").read()
        message = str(caught.value)
        assert "setting wal_level is 'replica'" in message and "public.items" in message
        assert "ALTER SYSTEM SET wal_level = logical;" in message
    finally:
        stack.stop(server, timeout=10)


def dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def capture_problems(dsn: str, table: str) -> list[Any]:
    from pipeline.extract.pg_capture import Capture
    from pipeline.extract.pg_capture_checks import check_capture

    conn = psycopg2.connect(dsn)
    try:
        return check_capture(conn, Capture.of("checked", "t_checks", table, ("id",), dsn))
    finally:
        conn.close()
