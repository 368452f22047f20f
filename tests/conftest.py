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
from typing import Any

import pytest

from setup import stack

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
def chdb_url(stack_root: Path) -> str:
    """The session's embedded warehouse. chDB serves one data directory per process, so every
    test of the session that uses chDB uses this one (no other server needs to run for it)."""
    return f"chdb://{stack_root.resolve() / 'warehouse'}"


@pytest.fixture(scope="session")
def stack_env(
    mongo: stack.Service, postgres: stack.Service, s3: stack.Service, chdb_url: str
) -> dict[str, str]:
    """The CDC_* settings of the session's sources, with an embedded chDB warehouse."""
    env = {**mongo.env, **postgres.env, **s3.env}
    env["CDC_WAREHOUSE_URL"] = chdb_url
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


class Env:
    """One isolated pipeline deployment: its own source databases, staging prefix and warehouse
    database, on the session's servers. Settings reach the pipeline as CDC_* variables."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.database = values["CDC_DATABASE"]
        self._sections: list[str] = []

    @property
    def wh(self) -> Any:
        from pipeline import runtime

        return runtime.warehouse()

    def generate(self, users: int, products: int, orders: int, seed: int = 7) -> None:
        from setup.generate_data import generate

        v = self.values
        generate(
            v["CDC_MONGO_URI"],
            v["CDC_MONGO_DB"],
            v["CDC_POSTGRES_DSN"],
            users=users,
            products=products,
            orders=orders,
            seed=seed,
        )

    def build(self, tasks: list[Any]) -> Any:
        import luigi

        result = luigi.build(tasks, local_scheduler=True, detailed_summary=True, log_level="INFO")
        return result.status

    def run(self, batch: str | None = None) -> tuple[str, Any]:
        from pipeline import RunAll
        from pipeline.core.batch import new_batch_id

        batch = batch or new_batch_id()
        return batch, self.build([RunAll(batch=batch)])

    def add_entity(self, name: str, **options: str) -> None:
        """Declare one more [entity.NAME] for this test (removed again at teardown)."""
        from luigi.configuration import get_config

        from pipeline import runtime

        section = f"entity.{name}"
        config = get_config()
        config.add_section(section)
        for key, value in options.items():
            config.set(section, key, value)
        self._sections.append(section)
        runtime.reset()

    def remove_entities(self) -> None:
        from luigi.configuration import get_config

        for section in self._sections:
            get_config().remove_section(section)
        self._sections.clear()

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        return self.wh.query_rows(sql.replace("{db}", f"`{self.database}`"), params)

    def count(self, table: str, where: str = "") -> int:
        return int(self.rows(f"SELECT count() FROM {{db}}.`{table}` {where}")[0][0])

    def mongo(self, collection: str = "users") -> Any:
        import pymongo

        client = pymongo.MongoClient(self.values["CDC_MONGO_URI"])
        return client[self.values["CDC_MONGO_DB"]][collection]

    def pg(self) -> Any:
        import psycopg2

        return psycopg2.connect(self.values["CDC_POSTGRES_DSN"])


@pytest.fixture(params=["chdb", "clickhouse"])
def pipeline_env(
    request: pytest.FixtureRequest,
    stack_env: dict[str, str],
    pg_dsn_factory: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    """An empty, isolated deployment on chDB and on the ClickHouse server."""
    from pipeline import runtime

    values = dict(stack_env)
    if request.param == "clickhouse":
        values["CDC_WAREHOUSE_URL"] = request.getfixturevalue("clickhouse").env["CDC_WAREHOUSE_URL"]
    tag = uuid.uuid4().hex[:10]
    values["CDC_DATABASE"] = f"t_{tag}"
    values["CDC_MONGO_DB"] = f"src_{tag}"
    values["CDC_POSTGRES_DSN"] = pg_dsn_factory()
    values["CDC_STAGING_URL"] = f"s3://cdc-staging/{tag}/"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    runtime.reset()
    env = Env(values)
    yield env
    env.remove_entities()
    runtime.warehouse().execute(f"DROP DATABASE IF EXISTS `{values['CDC_DATABASE']}`")
    runtime.reset()
