"""The PostgreSQL source against the real servers: types to raw, late commits, full mode, errors.

Pipeline tests declare their own tables in a temporary luigi.cfg. Luigi reads LUIGI_CONFIG_PATH
only when `luigi.configuration` is first imported, and `reload()` merges files into the one
parser without forgetting sections, so the fixture swaps the parser singleton instead (and
monkeypatch puts the original back).
"""

from __future__ import annotations

import base64
import math
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import luigi
import psycopg2
import pytest
from luigi.configuration import LuigiConfigParser
from luigi.execution_summary import LuigiStatusCode
from psycopg2 import sql

from pipeline import runtime
from pipeline.core.batch import new_batch_id
from pipeline.extract import postgres
from pipeline.extract.pg_copy import PostgresSourceError
from pipeline.graph import LoadRaw
from pipeline.state import load_watermark
from tests.support.load_hashes import hash_mismatches

CONFIG = """
[core]
parallel_scheduling = false
autoload_range = false

[worker]
keep_alive = false

[cdc]
lookback_minutes = {lookback}
batch_rows = 2

[entity.typed]
source = postgres
table = public.typed
unique_key = region, seq
strategy = timestamp
updated_at = updated_at

[entity.plain]
source = postgres
table = public.plain
unique_key = code
mode = full

[entity.accounts]
source = postgres
table = public.accounts
unique_key = tenant, id
strategy = timestamp
updated_at = updated_at
"""

DDL = """
CREATE TABLE public.typed (
    region text, seq int8, i2 int2, i4 int4, f4 float4, f8 float8, ok bool,
    price numeric(12, 2), wide numeric(38, 10), free numeric, huge numeric(50, 5),
    ts timestamptz, naive timestamp, day date, doc jsonb, raw json,
    tags text[], nums numeric[], grid int4[], id uuid, blob bytea, note text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, seq));
CREATE TABLE public.plain (code text PRIMARY KEY, label text, qty int4);
CREATE TABLE public.accounts (
    tenant text, id int4, balance numeric(12, 2),
    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant, id));
"""

TEXT = 'line1\nline2,"q" \\ é 中文 😀 \u202eRTL\r\n\t'
TYPED_ROWS: list[dict[str, Any]] = [
    {
        "region": "a",
        "seq": 9223372036854775807,
        "i2": -32768,
        "i4": 2147483647,
        "f4": 0.1,
        "f8": 0.1 + 0.2,
        "ok": True,
        "price": Decimal("-9999999999.99"),
        "wide": Decimal("1234567890123456789012345678.0123456789"),
        "free": Decimal("3.14159265358979323846264338327950288419716939937510"),
        "huge": Decimal("100000000000000000000000000000000000000000000.12345"),
        "ts": datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        "naive": datetime(1999, 12, 31, 23, 59, 59, 1),
        "day": date(2024, 2, 29),
        "doc": '{"b": 1, "a": [1, 2.50, "x", null], "é": "naïve 😀"}',
        "raw": '{"z": 1, "a": {"y": 1.10, "x": "\\u00e9", "nul": "\\u0000"},'
        ' "e": 1e400, "z2": [ ]}',
        "tags": ["a,b", 'q"uote', None, "new\nline", "😀"],
        "nums": [Decimal("1.10"), Decimal("2"), None],
        "grid": [[1, 2], [3, 4]],
        "id": "0b7a5c9e-8d1f-4c2a-9e3b-5f6a7b8c9d0e",
        "blob": b"\x00\xff\x00binary\n",
        "note": TEXT,
    },
    {"region": "ab", "seq": 1},  # every other column NULL
    {
        "region": "a",
        "seq": 12,
        "f4": float("-inf"),
        "f8": float("nan"),
        "ok": False,
        "price": Decimal("0.00"),
        "free": Decimal("NaN"),
        "doc": "{}",
        "raw": "[]",
        "tags": [],
        "blob": b"",
        "note": "",
        "ts": datetime(1970, 1, 1, tzinfo=UTC),
    },
    {"region": "a1", "seq": 2, "note": "composite key: ('a', 12) vs ('a1', 2)"},
]
# canonical JSON, written out by hand: sorted keys, no spaces, numbers as PostgreSQL wrote them
EXPECTED_JSON = {
    ("a", 9223372036854775807): {
        "doc": '{"a":[1,2.50,"x",null],"b":1,"é":"naïve 😀"}',
        "raw": '{"a":{"nul":"\\u0000","x":"é","y":1.10},"e":1e400,"z":1,"z2":[]}',
        "tags": '["a,b","q\\"uote",null,"new\\nline","😀"]',
        "nums": "[1.10,2,null]",
        "grid": "[[1,2],[3,4]]",
    },
    ("a", 12): {"doc": "{}", "raw": "[]", "tags": "[]"},
}


class Env:
    """An isolated deployment: own PostgreSQL database, staging prefix and warehouse database."""

    def __init__(self, values: dict[str, str], config: Path, mp: pytest.MonkeyPatch) -> None:
        self.values = values
        self.database = values["CDC_DATABASE"]
        self.config = config
        self.mp = mp

    @property
    def wh(self) -> Any:
        return runtime.warehouse()

    @property
    def server(self) -> bool:
        """True on a ClickHouse server without DateTime64 (18.16): instants are whole seconds."""
        return not self.wh.features.datetime64

    def use_config(self, lookback_minutes: float) -> None:
        self.config.write_text(CONFIG.format(lookback=lookback_minutes))
        self.mp.setattr(LuigiConfigParser, "_config_paths", [str(self.config)])
        self.mp.setattr(LuigiConfigParser, "_instance", None)
        runtime.reset()

    def pg(self) -> Any:
        conn = psycopg2.connect(self.values["CDC_POSTGRES_DSN"])
        conn.autocommit = True
        return conn

    def execute(self, statement: str | sql.Composable, params: Any = None) -> list[tuple]:
        with self.pg() as conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def load(self, *entities: str) -> str:
        batch = new_batch_id()
        tasks = [LoadRaw(entity=e, batch=batch) for e in entities]
        result = luigi.build(
            tasks, local_scheduler=True, detailed_summary=True, log_level="WARNING"
        )
        assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
        return batch

    def raw(self, entity: str, columns: str, where: str = "") -> list[dict[str, Any]]:
        table = self.wh.query_arrow(
            f"SELECT {columns} FROM `{self.database}`.`raw_{entity}` {where}"
        )
        return table.to_pylist()

    def rows_out(self, entity: str, batch: str) -> int:
        return int(
            self.wh.scalar(
                f"SELECT rows_out FROM `{self.database}`._cdc_batches"
                " WHERE entity = %(e)s AND stage = 'raw' AND batch_id = %(b)s",
                {"e": entity, "b": batch},
            )
        )


@pytest.fixture(params=["chdb", "clickhouse"])
def env(
    request: pytest.FixtureRequest,
    stack_env: dict[str, str],
    pg_dsn_factory: Callable[[], str],
    tmp_path: Path,
) -> Iterator[Env]:
    values = dict(stack_env)
    if request.param == "clickhouse":
        values["CDC_WAREHOUSE_URL"] = request.getfixturevalue("clickhouse").env["CDC_WAREHOUSE_URL"]
    tag = uuid.uuid4().hex[:10]
    values["CDC_DATABASE"] = f"pg_{tag}"
    values["CDC_POSTGRES_DSN"] = pg_dsn_factory()
    values["CDC_STAGING_URL"] = f"s3://cdc-staging/{tag}/"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        current = Env(values, tmp_path / "luigi.cfg", mp)
        current.use_config(lookback_minutes=10)
        current.execute(DDL)
        yield current
        current.wh.execute(f"DROP DATABASE IF EXISTS `{values['CDC_DATABASE']}`")
        runtime.reset()
    runtime.reset()


def _insert_typed(env: Env, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        values = {k: psycopg2.Binary(v) if isinstance(v, bytes) else v for k, v in row.items()}
        statement = sql.SQL("INSERT INTO public.typed ({}) VALUES ({})").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in values),
            sql.SQL(", ").join(sql.Placeholder(k) for k in values),
        )
        env.execute(statement, values)


def _expected(env: Env, row: dict[str, Any]) -> dict[str, Any]:
    """What raw must hold for a source row, by the documented mapping."""
    import numpy as np

    key = (row["region"], row["seq"])
    out: dict[str, Any] = {c: None for c in TYPED_COLUMNS}
    for name, value in row.items():
        if value is None:
            continue
        if name == "f4":
            value = float(np.float32(value))
        elif name in ("ts", "naive"):
            value = value.replace(tzinfo=value.tzinfo or UTC)
            if env.server:
                value = value.replace(microsecond=0)
        elif name in ("free", "huge"):
            value = str(value)
        elif name == "blob":
            value = base64.b64encode(value).decode()
        elif name in EXPECTED_JSON.get(key, {}):
            value = EXPECTED_JSON[key][name]
        out[name] = value
    return out


TYPED_COLUMNS = [c for c in TYPED_ROWS[0] if c != "updated_at"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _normal(row: dict[str, Any]) -> dict[str, Any]:
    """The server (18.16) has no Bool: ok comes back as UInt8."""
    if row.get("ok") is not None:
        row["ok"] = bool(row["ok"])
    return row


def test_every_type_round_trips_to_raw_and_full_tables_are_whole_copies(env: Env) -> None:
    _insert_typed(env, TYPED_ROWS)
    env.execute("INSERT INTO public.plain VALUES ('x', 'first', 1), ('y', NULL, 2), ('z', '', 3)")
    first = env.load("typed", "plain")

    columns = ", ".join(f"`{c}`" for c in TYPED_COLUMNS)
    got = [_normal(r) for r in env.raw("typed", columns, "ORDER BY region, seq")]
    want = [_expected(env, r) for r in sorted(TYPED_ROWS, key=lambda r: (r["region"], r["seq"]))]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        diff = {c: (g[c], w[c]) for c in TYPED_COLUMNS if not _same(g[c], w[c])}
        assert not diff, (w["region"], w["seq"], diff)
    assert hash_mismatches(env.wh, env.database, runtime.settings().entity("typed")) == []

    env.execute("UPDATE public.typed SET note = 'changed', updated_at = now() WHERE seq = 12")
    env.execute("DELETE FROM public.plain WHERE code = 'y'")
    env.execute("INSERT INTO public.plain VALUES ('w', 'new', 4)")
    second = env.load("typed", "plain")

    assert env.rows_out("typed", second) == 1  # the lookback re-read the rest; not loaded again
    assert env.raw("typed", "note", f"WHERE _batch_id = '{second}'") == [{"note": "changed"}]
    copies = {
        batch: env.raw("plain", "code, label, qty", f"WHERE _batch_id = '{batch}' ORDER BY code")
        for batch in (first, second)
    }
    assert [tuple(r.values()) for r in copies[first]] == [
        ("x", "first", 1),
        ("y", None, 2),
        ("z", "", 3),
    ]
    assert [tuple(r.values()) for r in copies[second]] == [
        ("w", "new", 4),
        ("x", "first", 1),
        ("z", "", 3),
    ]


def _xact_start(conn: Any) -> datetime:
    with conn.cursor() as cur:
        cur.execute("SELECT now()")
        return cur.fetchone()[0]


def test_late_commits_are_captured_and_boundary_rows_load_once(env: Env) -> None:
    """The guard alone (lookback 0) catches a long transaction; the lookback catches the rest."""
    env.use_config(lookback_minutes=0)
    env.execute(
        "INSERT INTO accounts (tenant, id, balance) SELECT 't', g, 1 FROM generate_series(1, 3) g"
    )
    late = psycopg2.connect(env.values["CDC_POSTGRES_DSN"])
    try:
        started = _xact_start(late)
        with late.cursor() as cur:
            cur.execute("UPDATE accounts SET balance = 100, updated_at = now() WHERE id = 1")
        boundary = started - timedelta(microseconds=1)
        env.execute(
            "INSERT INTO accounts VALUES ('t', 4, 4, %(b)s), ('t', 5, 5, %(b)s),"
            " ('t', 6, 6, clock_timestamp())",
            {"b": boundary},
        )
        first = env.load("accounts")
        assert load_watermark(env.wh, env.database, "accounts") == boundary
        late.commit()
    finally:
        late.close()
    assert env.rows_out("accounts", first) == 5  # 1-3 and both rows on the boundary, not 6

    second = env.load("accounts")
    assert env.raw(
        "accounts", "id, toFloat64(balance) AS b", f"WHERE _batch_id = '{second}' ORDER BY id"
    ) == [
        {"id": 1, "b": 100.0},
        {"id": 6, "b": 6.0},
    ]

    env.use_config(lookback_minutes=10)
    behind = load_watermark(env.wh, env.database, "accounts") - timedelta(seconds=30)
    env.execute("INSERT INTO accounts VALUES ('u', 1, 7, %(t)s)", {"t": behind})  # a skewed clock
    third = env.load("accounts")
    assert env.rows_out("accounts", third) == 1
    counts = env.raw(
        "accounts", "tenant, id, count() AS n", "GROUP BY tenant, id ORDER BY tenant, id"
    )
    assert [(r["tenant"], r["id"], r["n"]) for r in counts] == [
        ("t", 1, 2),
        ("t", 2, 1),
        ("t", 3, 1),
        ("t", 4, 1),
        ("t", 5, 1),
        ("t", 6, 1),
        ("u", 1, 1),
    ]


# --- the reader alone (no warehouse) ---------------------------------------------------------


@pytest.fixture
def pg(pg_dsn_factory: Callable[[], str]) -> str:
    return pg_dsn_factory()


def _execute(dsn: str, statement: str | sql.Composable, params: Any = None) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
    finally:
        conn.close()


def _read_all(dsn: str, table: str, updated_at: str | None = "updated_at") -> list[dict]:
    _, batches = postgres.read(dsn, table, updated_at, None, timedelta(0))
    return [row for batch in batches for row in batch.to_pylist()]


def test_upper_is_held_below_an_open_transaction(pg: str) -> None:
    _execute(pg, "CREATE TABLE t (id int PRIMARY KEY, updated_at timestamptz DEFAULT now())")
    other = psycopg2.connect(pg)
    try:
        started = _xact_start(other)
        window, batches = postgres.read(pg, "t", "updated_at", None, timedelta(0))
        list(batches)
        assert window is not None and window.upper == started - timedelta(microseconds=1)
        # rollback() returns once the server has ended the transaction; close() does not wait
        # for the backend to leave pg_stat_activity, so reading right after it is a race.
        other.rollback()
        window, _ = postgres.read(pg, "t", "updated_at", None, timedelta(0))
        assert window is not None and window.upper > started
    finally:
        other.close()


def test_batches_are_bounded_and_closing_early_cancels_the_copy(pg: str) -> None:
    _execute(
        pg,
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) g",
    )
    _, batches = postgres.read(pg, "big", None, None, timedelta(0), batch_rows=7000)
    sizes = [b.num_rows for b in batches]
    assert sum(sizes) == 200_000 and max(sizes) == 7000 and len(sizes) == 29
    _, batches = postgres.read(pg, "big", None, None, timedelta(0), batch_rows=1000)
    assert next(batches).num_rows == 1000
    assert isinstance(batches, Generator)
    started = time.monotonic()
    batches.close()
    assert time.monotonic() - started < 2
    assert _sessions_gone(pg, deadline=time.monotonic() + 5)


def _sessions_gone(dsn: str, deadline: float) -> bool:
    """True once no reader session is left on the database (backends exit asynchronously)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'cdc-pipeline' AND datname = current_database()"
                )
                if cur.fetchone()[0] == 0:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("ddl", "updated_at", "message"),
    [
        ("CREATE TABLE other (id int)", "updated_at", "table public.t not found"),
        ("CREATE TABLE t (id int, changed timestamptz)", "updated_at", "'updated_at' not found"),
        ("CREATE TABLE t (id int, updated_at text)", "updated_at", "is text, not timestamptz"),
        (
            "CREATE TABLE t (id int, ts timestamptz); INSERT INTO t VALUES (1, 'infinity')",
            None,
            "table t: column 'ts' (timestamptz)",
        ),
        (
            "CREATE TABLE t (id int, price numeric(6, 2)); INSERT INTO t VALUES (1, 'NaN')",
            None,
            "table t: column 'price' (numeric)",
        ),
    ],
)
def test_errors_name_table_and_column(
    pg: str, ddl: str, updated_at: str | None, message: str
) -> None:
    _execute(pg, ddl)
    with pytest.raises(PostgresSourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _read_all(pg, "t", updated_at)


def test_a_role_that_cannot_see_other_transactions_is_refused(pg: str) -> None:
    role = f"r_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role)
    _execute(pg, sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    try:
        _execute(pg, "CREATE TABLE t (id int, updated_at timestamptz)")
        _execute(pg, sql.SQL("GRANT SELECT ON t TO {}").format(ident))
        dsn = pg.replace("postgres@", f"{role}@")
        with pytest.raises(PostgresSourceError, match=f"GRANT pg_read_all_stats TO {role}"):
            _read_all(dsn, "t")
        assert _read_all(dsn, "t", None) == []  # a full scan needs no guard
    finally:
        _execute(pg, sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(ident))


def test_text_cannot_hold_nul_but_bytea_and_json_escapes_can(pg: str) -> None:
    _execute(pg, "CREATE TABLE t (b bytea, j json)")
    with pytest.raises(psycopg2.Error, match="null character not permitted"):
        _execute(pg, "SELECT chr(0)")
    _execute(pg, "INSERT INTO t VALUES ('\\x00'::bytea, '\"a\\u0000b\"')")
    assert _read_all(pg, "t", None) == [{"b": "AA==", "j": '"a\\u0000b"'}]


def test_selected_columns_are_typed_as_in_a_full_read(pg: str) -> None:
    _execute(
        pg,
        "CREATE TABLE t (a int, k bytea, n numeric(4, 1)); INSERT INTO t VALUES (1, '\\x01', 2.5)",
    )
    _, batches = postgres.read(pg, "t", None, None, timedelta(0), columns=["n", "k"])
    assert [r for b in batches for r in b.to_pylist()] == [{"n": Decimal("2.5"), "k": "AQ=="}]
    with pytest.raises(PostgresSourceError, match=r"table t: column\(s\) \['x'\] not found"):
        postgres.read(pg, "t", None, None, timedelta(0), columns=["a", "x"])


def test_nulls_empty_strings_and_wide_rows_in_one_column(pg: str) -> None:
    """A lone NULL is an empty CSV line; a 3 MB value is wider than Arrow's default block."""
    wide = "x\n" * 1_500_000
    _execute(pg, "CREATE TABLE t (v text)")
    _execute(pg, "INSERT INTO t VALUES (NULL), (''), ('x'), (%s), (NULL)", (wide,))
    assert [r["v"] for r in _read_all(pg, "t", None)] == [None, "", "x", wide, None]
