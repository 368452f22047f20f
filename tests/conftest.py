"""Real servers for the test session: started once on free ports, stopped at the end.

MongoDB, PostgreSQL and S3 start together (in parallel) the first time a test asks for one of
them; the ClickHouse server only when a test asks for `clickhouse`. Tests isolate themselves
with a fresh MongoDB database (`mongo_db_name`) and a fresh PostgreSQL database
(`pg_dsn_factory`) rather than with fresh servers, which would cost seconds each.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import stack

# The data is thrown away, so do not wait for SeaweedFS's 15 s graceful shutdown.
TEARDOWN_TIMEOUT = 3.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds (deselect: -m 'not slow')"
    )


@pytest.fixture(scope="session")
def stack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's servers keep their data and logs (kept by pytest for post-mortems)."""
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def _sources(stack_root: Path) -> Iterator[dict[str, stack.Service]]:
    services = stack.start_services(stack_root, stack.CORE)
    yield services
    stack.stop_all(services.values(), timeout=TEARDOWN_TIMEOUT)


@pytest.fixture(scope="session")
def mongo(_sources: dict[str, stack.Service]) -> stack.Service:
    return _sources["mongodb"]


@pytest.fixture(scope="session")
def postgres(_sources: dict[str, stack.Service]) -> stack.Service:
    return _sources["postgres"]


@pytest.fixture(scope="session")
def s3(_sources: dict[str, stack.Service]) -> stack.Service:
    return _sources["s3"]


@pytest.fixture(scope="session")
def clickhouse(stack_root: Path) -> Iterator[stack.Service]:
    service = stack.start_clickhouse(stack_root)
    yield service
    stack.stop(service, timeout=TEARDOWN_TIMEOUT)


@pytest.fixture(scope="session")
def stack_env(
    mongo: stack.Service, postgres: stack.Service, s3: stack.Service, stack_root: Path
) -> dict[str, str]:
    """The CDC_* settings of the session's sources, with an embedded chDB warehouse."""
    env = {**mongo.env, **postgres.env, **s3.env}
    env["CDC_WAREHOUSE_URL"] = f"chdb://{stack_root.resolve() / 'warehouse'}"
    env["CDC_DATABASE"] = stack.DATABASE
    return env


@pytest.fixture
def mongo_db_name(mongo: stack.Service) -> Iterator[str]:
    """A MongoDB database name no other test uses; dropped afterwards."""
    import pymongo

    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    with pymongo.MongoClient(mongo.env["CDC_MONGO_URI"]) as client:
        client.drop_database(name)


@pytest.fixture
def pg_dsn_factory(postgres: stack.Service) -> Iterator[Callable[[], str]]:
    """Call it to get the DSN of a new, empty PostgreSQL database; all are dropped afterwards."""
    import psycopg2

    created: list[str] = []
    admin_dsn = f"postgresql://postgres@{stack.HOST}:{postgres.port}/postgres"

    def execute(sql: str) -> None:
        conn = psycopg2.connect(admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    def create() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql://postgres@{stack.HOST}:{postgres.port}/{name}"

    yield create
    for name in created:
        execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
