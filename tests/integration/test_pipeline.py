"""The whole graph against the real servers: MongoDB, PostgreSQL, S3 and both warehouses."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import runtime
from setup.generate_data import generate
from tests.conftest import Env
from tests.support import ROOT, private_luigi_locks

USERS, PRODUCTS, ORDERS = 60, 8, 150


@pytest.fixture
def env(pipeline_env: Env) -> Env:
    """A pipeline deployment with the demo data, small."""
    pipeline_env.generate(users=USERS, products=PRODUCTS, orders=ORDERS, seed=7)
    return pipeline_env


def test_full_graph_lands_sources_in_raw_snapshots_and_marts(env: Env) -> None:
    batch, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    assert env.count("raw_users") == USERS
    assert env.count("raw_products") == PRODUCTS
    assert env.count("raw_orders") == ORDERS
    assert env.count("users_snapshot", "WHERE dbt_valid_to IS NULL") == USERS
    assert env.count("orders_snapshot") == ORDERS
    assert env.count("products_snapshot") == PRODUCTS
    assert env.count("dim_users") == USERS
    assert env.count("fct_orders") == ORDERS
    (revenue,) = env.rows("SELECT toFloat64(sum(revenue)) FROM {db}.mart_daily_revenue_by_state")[0]
    with env.pg() as conn, conn.cursor() as cur:
        cur.execute("SELECT sum(amount)::float8 FROM orders WHERE status <> 'cancelled'")
        (expected,) = cur.fetchone()
    assert revenue == pytest.approx(expected)
    ids = env.rows("SELECT _id FROM {db}.raw_users ORDER BY _id")
    source_ids = sorted(str(d["_id"]) for d in env.mongo().find({}, {"_id": 1}))
    assert [r[0] for r in ids] == source_ids
    assert {r[0] for r in env.rows("SELECT DISTINCT _batch_id FROM {db}.raw_users")} == {batch}


def test_seed_cdc_check_shows_old_version_closed(env: Env) -> None:
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    user = env.mongo().find_one({}, sort=[("user_id", 1)])
    env.mongo().update_one({"_id": user["_id"]}, {"$set": {"occupation": "Senior Engineer"}})
    _, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    rows = env.rows(
        "SELECT occupation, dbt_valid_from, dbt_valid_to FROM {db}.users_snapshot"
        " WHERE user_id = %(u)s ORDER BY dbt_valid_from",
        {"u": user["user_id"]},
    )
    assert [r[0] for r in rows] == [user["occupation"], "Senior Engineer"]
    assert rows[0][2] == rows[1][1]  # the old version closes when the new one opens
    assert rows[1][2] is None
    assert env.count("dim_users", "WHERE occupation = 'Senior Engineer'") >= 1


def test_unchanged_rerun_writes_no_versions(env: Env) -> None:
    env.run()
    before = env.count("users_snapshot__versions")
    orders_before = env.count("orders_snapshot__versions")
    batch, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    assert env.count("users_snapshot__versions") == before
    assert env.count("orders_snapshot__versions") == orders_before
    opened = env.rows(
        "SELECT sum(versions_opened), sum(versions_closed) FROM {db}._cdc_batches"
        " WHERE batch_id = %(b)s AND stage = 'snapshot'",
        {"b": batch},
    )
    assert opened == [(0, 0)]


def test_postgres_changes_are_incremental(env: Env) -> None:
    env.run()
    with env.pg() as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE orders SET status = 'refunded', updated_at = now()"
            " WHERE order_id = (SELECT min(order_id) FROM orders) RETURNING order_id"
        )
        (order_id,) = cur.fetchone()
    batch, status = env.run()
    assert status == LuigiStatusCode.SUCCESS
    history = env.rows(
        "SELECT status, dbt_valid_to IS NULL FROM {db}.orders_snapshot"
        " WHERE order_id = %(o)s ORDER BY dbt_valid_from",
        {"o": order_id},
    )
    assert history[-1] == ("refunded", 1) and len(history) == 2, history
    loaded = env.rows(
        "SELECT rows_out FROM {db}._cdc_batches WHERE batch_id = %(b)s AND entity = 'orders'"
        " AND stage = 'raw'",
        {"b": batch},
    )
    assert loaded == [(1,)]  # the lookback re-read the others, and they were not loaded again


def test_failed_batch_resumes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.run()
    env.mongo().update_many({}, {"$set": {"state": "Lagos"}}, upsert=False)
    env.mongo().update_one({}, {"$set": {"state": "Kano"}})
    monkeypatch.setenv("CDC_FAILPOINT", "snapshot-after-open")
    batch, status = env.run()
    assert status != LuigiStatusCode.SUCCESS
    extracted = env.rows(
        "SELECT count() FROM {db}._cdc_batches WHERE batch_id = %(b)s AND stage = 'raw'",
        {"b": batch},
    )
    assert extracted == [(3,)]
    monkeypatch.delenv("CDC_FAILPOINT")
    _, status = env.run(batch)
    assert status == LuigiStatusCode.SUCCESS
    assert env.count("raw_users", f"WHERE _batch_id = '{batch}'") == USERS
    current = env.rows(
        "SELECT uniqExact(_id), count() FROM {db}.users_snapshot WHERE dbt_valid_to IS NULL"
    )
    assert current == [(USERS, USERS)]
    _, status = env.run(batch)
    assert status == LuigiStatusCode.SUCCESS  # a finished batch: nothing to do


def _failure_messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        f"{r.getMessage()}\n{r.exc_text or ''}"
        for r in caplog.records
        if r.levelno >= logging.WARNING
    )


def test_unreachable_mongodb_is_named(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from setup.stack import free_port

    monkeypatch.setenv("CDC_MONGO_URI", f"mongodb://127.0.0.1:{free_port()}")
    runtime.reset()
    with caplog.at_level(logging.WARNING):
        _, status = env.run()
    assert status != LuigiStatusCode.SUCCESS
    assert "MongoDB at mongodb://127.0.0.1" in _failure_messages(caplog)
    assert "CDC_MONGO_URI" in _failure_messages(caplog)


def test_wrong_bucket_is_named(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CDC_STAGING_URL", "s3://no-such-bucket/x/")
    runtime.reset()
    with caplog.at_level(logging.WARNING):
        _, status = env.run()
    assert status != LuigiStatusCode.SUCCESS
    assert "staging bucket 'no-such-bucket'" in _failure_messages(caplog)


def test_luigi_command_line_exit_codes(
    stack_env: dict[str, str], pg_dsn_factory: Callable[[], str], tmp_path: Path
) -> None:
    """`luigi --module pipeline RunAll` as cron runs it: 0 on success, non-zero on failure."""
    tag = uuid.uuid4().hex[:10]
    values = {
        **os.environ,
        **stack_env,
        "CDC_WAREHOUSE_URL": f"chdb://{tmp_path / 'warehouse'}",
        "CDC_DATABASE": f"cli_{tag}",
        "CDC_MONGO_DB": f"cli_{tag}",
        "CDC_POSTGRES_DSN": pg_dsn_factory(),
        "CDC_STAGING_URL": f"s3://cdc-staging/{tag}/",
        **private_luigi_locks(tmp_path),
    }
    generate(
        values["CDC_MONGO_URI"], values["CDC_MONGO_DB"], values["CDC_POSTGRES_DSN"], 20, 3, 30, 1
    )
    luigi_bin = str(Path(sys.executable).parent / "luigi")
    cmd = [luigi_bin, "--module", "pipeline", "RunAll", "--local-scheduler"]
    ok = subprocess.run(cmd, cwd=ROOT, env=values, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = subprocess.run(
        [sys.executable, "-m", "pipeline", "summary"],
        cwd=ROOT,
        env=values,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "users_snapshot" in summary.stdout and " 20" in summary.stdout
    values["CDC_STAGING_URL"] = "s3://no-such-bucket/"
    bad = subprocess.run(cmd, cwd=ROOT, env=values, capture_output=True, text=True, timeout=300)
    assert bad.returncode not in (0, None)
    assert "no-such-bucket" in bad.stderr
