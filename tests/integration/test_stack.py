"""The local stack's servers answer, and the demo data tools write what they say they write."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import pymongo
import pytest

from setup import stack
from setup.generate_data import STATUSES, generate
from setup.simulate_cdc import simulate

USER_FIELDS = {"_id", "user_id", "firstName", "lastName", "occupation", "state"}


def pg_rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        conn.close()


def users_of(mongo: stack.Service, db: str) -> dict[str, dict[str, Any]]:
    with pymongo.MongoClient(mongo.env["CDC_MONGO_URI"]) as client:
        return {doc["user_id"]: doc for doc in client[db]["users"].find()}


def test_mongo_answers_and_stores(mongo: stack.Service, mongo_db_name: str) -> None:
    with pymongo.MongoClient(mongo.env["CDC_MONGO_URI"]) as client:
        assert client.admin.command("ping")["ok"] == 1
        client[mongo_db_name]["things"].insert_one({"k": 1, "v": "one"})
        assert client[mongo_db_name]["things"].find_one({"k": 1}, {"_id": 0}) == {
            "k": 1,
            "v": "one",
        }


def test_postgres_answers(postgres: stack.Service) -> None:
    assert pg_rows(postgres.env["CDC_POSTGRES_DSN"], "SELECT 1") == [(1,)]


def test_s3_put_and_get(s3: stack.Service) -> None:
    from minio import Minio

    client = Minio(
        s3.env["CDC_S3_ENDPOINT"],
        access_key=s3.env["CDC_S3_ACCESS_KEY"],
        secret_key=s3.env["CDC_S3_SECRET_KEY"],
        secure=False,
    )
    bucket = s3.env["CDC_STAGING_URL"].removeprefix("s3://").strip("/")
    client.put_object(bucket, "tests/hello.txt", io.BytesIO(b"hello"), 5)
    reply = client.get_object(bucket, "tests/hello.txt")
    try:
        assert reply.read() == b"hello"
    finally:
        reply.close()
        reply.release_conn()
    client.remove_object(bucket, "tests/hello.txt")


def test_clickhouse_answers(clickhouse: stack.Service) -> None:
    from clickhouse_driver import Client

    assert (
        clickhouse.env["CDC_WAREHOUSE_URL"] == f"clickhouse://default:@127.0.0.1:{clickhouse.port}"
    )
    client = Client(host="127.0.0.1", port=clickhouse.port)
    try:
        [(version,)] = client.execute("SELECT version()")
    finally:
        client.disconnect()
    assert version.split(".")[0].isdigit()


def test_stack_env_names_every_setting(stack_env: dict[str, str]) -> None:
    assert set(stack_env) == {
        "CDC_MONGO_URI",
        "CDC_MONGO_DB",
        "CDC_POSTGRES_DSN",
        "CDC_STAGING_URL",
        "CDC_S3_ENDPOINT",
        "CDC_S3_ACCESS_KEY",
        "CDC_S3_SECRET_KEY",
        "CDC_S3_SECURE",
        "CDC_WAREHOUSE_URL",
        "CDC_DATABASE",
    }
    assert stack_env["CDC_WAREHOUSE_URL"].startswith("chdb:///")
    assert stack_env["CDC_STAGING_URL"] == "s3://cdc-staging/"


def test_generate_writes_the_requested_data(
    mongo: stack.Service, mongo_db_name: str, pg_dsn_factory: Callable[[], str]
) -> None:
    dsn = pg_dsn_factory()
    uri = mongo.env["CDC_MONGO_URI"]
    counts = generate(uri, mongo_db_name, dsn, users=50, products=5, orders=100)

    assert counts == {"users": 50, "products": 5, "orders": 100}
    users = users_of(mongo, mongo_db_name)
    assert sorted(users) == [f"USER{n:08d}" for n in range(1, 51)]
    assert all(set(doc) == USER_FIELDS for doc in users.values())
    assert all(doc["firstName"] and doc["occupation"] and doc["state"] for doc in users.values())
    [(products, prices_ok)] = pg_rows(dsn, "SELECT count(*), bool_and(price > 0) FROM products")
    assert (products, prices_ok) == (5, True)
    orders = pg_rows(
        dsn,
        "SELECT user_id, product_id, quantity, amount, status, created_at, updated_at FROM orders",
    )
    assert len(orders) == 100
    prices = dict(pg_rows(dsn, "SELECT product_id, price FROM products"))
    now = datetime.now(UTC)
    for user_id, product_id, quantity, amount, status, created_at, updated_at in orders:
        assert user_id in users and product_id in prices
        assert amount == prices[product_id] * quantity and isinstance(amount, Decimal)
        assert status in STATUSES
        assert (now - created_at).days <= 90 and created_at <= updated_at <= now
    indexes = pg_rows(dsn, "SELECT indexdef FROM pg_indexes WHERE indexdef LIKE '%(updated_at)'")
    assert len(indexes) == 2


def test_generate_again_gives_the_same_data(
    mongo: stack.Service, mongo_db_name: str, pg_dsn_factory: Callable[[], str]
) -> None:
    dsn = pg_dsn_factory()
    uri = mongo.env["CDC_MONGO_URI"]
    generate(uri, mongo_db_name, dsn, users=30, products=3, orders=20, seed=5)
    first_users = users_of(mongo, mongo_db_name)
    first_orders = pg_rows(
        dsn, "SELECT order_id, user_id, product_id, status FROM orders ORDER BY 1"
    )
    generate(uri, mongo_db_name, dsn, users=30, products=3, orders=20, seed=5)

    assert users_of(mongo, mongo_db_name) == first_users
    assert pg_rows(dsn, "SELECT order_id, user_id, product_id, status FROM orders ORDER BY 1") == (
        first_orders
    )


def test_simulate_changes_what_it_reports(
    mongo: stack.Service, mongo_db_name: str, pg_dsn_factory: Callable[[], str]
) -> None:
    dsn = pg_dsn_factory()
    uri = mongo.env["CDC_MONGO_URI"]
    generate(uri, mongo_db_name, dsn, users=200, products=10, orders=300)
    users_before = users_of(mongo, mongo_db_name)
    orders_before = dict(pg_rows(dsn, "SELECT order_id, status FROM orders"))
    prices_before = dict(pg_rows(dsn, "SELECT product_id, price FROM products"))

    done = simulate(uri, mongo_db_name, dsn, changes=100, seed=3)

    assert sum(done.values()) == 100 and all(done.values())
    users_after = users_of(mongo, mongo_db_name)
    kept = users_before.keys() & users_after.keys()
    changed = [
        u
        for u in kept
        if (users_before[u]["occupation"], users_before[u]["state"])
        != (users_after[u]["occupation"], users_after[u]["state"])
    ]
    assert len(users_before.keys() - users_after.keys()) == done["users_deleted"]
    assert len(users_after.keys() - users_before.keys()) == done["users_inserted"]
    assert len(changed) == done["users_updated"]
    assert all(set(doc) == USER_FIELDS for doc in users_after.values())

    orders_after = dict(pg_rows(dsn, "SELECT order_id, status FROM orders"))
    kept_orders = orders_before.keys() & orders_after.keys()
    moved = [o for o in kept_orders if orders_before[o] != orders_after[o]]
    assert len(orders_before.keys() - orders_after.keys()) == done["orders_deleted"]
    assert len(orders_after.keys() - orders_before.keys()) == done["orders_inserted"]
    assert len(moved) == done["orders_updated"]
    prices_after = dict(pg_rows(dsn, "SELECT product_id, price FROM products"))
    repriced = [p for p in prices_before if prices_before[p] != prices_after[p]]
    assert len(repriced) == done["products_updated"]

    [(touched,)] = pg_rows(
        dsn,
        "SELECT count(*) FROM orders WHERE updated_at = (SELECT max(updated_at) FROM orders)",
    )
    assert touched == done["orders_updated"] + done["orders_inserted"]
    new_orders = orders_after.keys() - orders_before.keys()
    customers = dict(pg_rows(dsn, "SELECT order_id, user_id FROM orders"))
    assert {customers[o] for o in new_orders} <= users_after.keys()


def test_simulate_is_deterministic_given_seed_and_data(
    mongo: stack.Service, mongo_db_name: str, pg_dsn_factory: Callable[[], str]
) -> None:
    uri = mongo.env["CDC_MONGO_URI"]
    results = []
    for _ in range(2):
        dsn = pg_dsn_factory()
        generate(uri, mongo_db_name, dsn, users=60, products=4, orders=80)
        simulate(uri, mongo_db_name, dsn, changes=40, seed=11)
        orders = pg_rows(dsn, "SELECT order_id, user_id, product_id, status FROM orders ORDER BY 1")
        prices = pg_rows(dsn, "SELECT product_id, price FROM products ORDER BY 1")
        results.append((users_of(mongo, mongo_db_name), orders, prices))
    assert results[0] == results[1]


def test_mongo_on_a_taken_port_fails_naming_mongodb(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(stack.StackError, match="mongodb"):
            stack.start_mongo(tmp_path, port)


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "mongo").mkdir()
    (tmp_path / "mongo" / "data").write_text("a file where the storage directory should be")
    with pytest.raises(stack.StackError, match=r"mongodb exited during start-up[\s\S]*mongodb.log"):
        stack.start_mongo(tmp_path)


@pytest.mark.slow
def test_stack_cli_up_status_down(tmp_path: Path) -> None:
    root = tmp_path / "stack"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "setup.stack", *args, "--root", str(root)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    assert cli("up").returncode == 0
    try:
        env = stack.read_env(root / "env")
        assert env["CDC_WAREHOUSE_URL"] == f"chdb://{root.resolve() / 'warehouse'}"
        assert env["LUIGID_URL"].startswith("http://127.0.0.1:")
        first = stack.status(root)
        assert [name for name, _, _ in first] == ["mongodb", "postgres", "s3", "luigid"]
        assert all(running for _, _, running in first)

        again = cli("up")
        assert again.returncode == 0 and "already running" in again.stderr
        assert stack.read_env(root / "env") == env and stack.status(root) == first
        assert cli("status").returncode == 0
    finally:
        assert cli("down").returncode == 0
    assert stack.status(root) == []
    assert cli("down").returncode == 0
    assert cli("status").returncode == 1
