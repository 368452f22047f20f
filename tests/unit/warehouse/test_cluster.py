"""What a cluster deployment renders, without a server: engines, paths, sharding, refusals."""

from __future__ import annotations

import pytest

from pipeline.config import load_settings
from pipeline.core.errors import ConfigError, WarehouseError
from pipeline.ops import cron
from pipeline.warehouse import Cluster, connect
from pipeline.warehouse.cluster import local_name, scratch_in, sharding_key, sharding_of
from pipeline.warehouse.ddl import TableSpec
from tests.support import ROOT

SHARDED = Cluster("cdc_sharded", "/clickhouse/tables/{shard}/", 30)


def test_a_merge_tree_engine_becomes_its_replicated_twin_with_a_literal_path() -> None:
    assert SHARDED.replicated("MergeTree", "db", "raw_users__local") == (
        "ReplicatedMergeTree('/clickhouse/tables/{shard}/db/raw_users__local', '{replica}')"
    )
    assert SHARDED.replicated("ReplacingMergeTree(_version)", "db", "s__local") == (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/s__local', '{replica}',"
        " _version)"
    )
    summing = SHARDED.replicated("SummingMergeTree((a, b))", "db", "m__local")
    assert summing.endswith("'{replica}', (a, b))") and summing.startswith("ReplicatedSumming")


def test_a_table_swapped_in_later_gets_a_path_of_its_own() -> None:
    first = SHARDED.zk_path("db", "m__new__local", fresh=True)
    second = SHARDED.zk_path("db", "m__new__local", fresh=True)
    assert first != second and first.startswith("/clickhouse/tables/{shard}/db/m__new__local__")
    assert SHARDED.zk_path("db", "raw__local") == "/clickhouse/tables/{shard}/db/raw__local"


def test_engines_the_cluster_cannot_replicate_are_refused_by_name() -> None:
    with pytest.raises(WarehouseError, match=r"write the plain engine \(MergeTree\)"):
        SHARDED.replicated("ReplicatedMergeTree('/x', 'y')", "db", "t")
    with pytest.raises(WarehouseError, match="not of the MergeTree family"):
        SHARDED.replicated("Log", "db", "t")


def test_rows_are_placed_by_the_text_of_their_unique_key() -> None:
    assert sharding_key(("_id",)) == "cityHash64(toString(assumeNotNull(`_id`)))"
    assert sharding_key(("tenant", "id")) == (
        "cityHash64(toString(assumeNotNull(`tenant`)), toString(assumeNotNull(`id`)))"
    )
    assert sharding_key(()) == "rand()"
    assert SHARDED.distributed("db", local_name("raw_users"), "rand()") == (
        "Distributed('cdc_sharded', 'db', 'raw_users__local', rand())"
    )


def test_the_sharding_expression_is_read_back_from_a_distributed_engine() -> None:
    engine = "Distributed('c', 'db', 't__local', cityHash64(toString(assumeNotNull(`a,b`)), x))"
    assert sharding_of(engine) == "cityHash64(toString(assumeNotNull(`a,b`)), x)"
    with pytest.raises(WarehouseError, match="not a sharded Distributed engine"):
        sharding_of("Distributed('c', 'db', 't')")


def test_table_clauses_keep_the_order_clickhouse_wants() -> None:
    spec = TableSpec("a UInt8", partition_by="toYYYYMM(t)", order_by="(a)", ttl=" TTL t + 1")
    assert spec.clauses == " PARTITION BY toYYYYMM(t) ORDER BY (a) TTL t + 1"
    assert TableSpec("a UInt8").clauses == " ORDER BY tuple()"


def test_chdb_cannot_be_a_cluster() -> None:
    with pytest.raises(ConfigError, match=r"CDC_CLUSTER = c needs ClickHouse servers.*chDB"):
        connect("chdb:///tmp/never-opened", Cluster("c", "/p", 1))


def test_scratch_subqueries_stay_plain_in_on_one_server() -> None:
    class OneServer:
        cluster = None

    assert scratch_in(OneServer()) == "IN"  # type: ignore[arg-type]


def test_cluster_settings_default_to_one_server(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(ROOT / "luigi.cfg")
    assert (
        settings.cluster == "" and settings.replicated_path_prefix == "/clickhouse/tables/{shard}"
    )
    monkeypatch.setenv("CDC_CLUSTER", "cdc_sharded")
    monkeypatch.setenv("CDC_DDL_TIMEOUT_SECONDS", "20")
    settings = load_settings(ROOT / "luigi.cfg")
    assert (settings.cluster, settings.ddl_timeout_seconds) == ("cdc_sharded", 20)


def test_an_assistant_refuses_chdb(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline import runtime

    monkeypatch.setenv("CDC_WAREHOUSE_URL", "chdb:///tmp/never-opened")
    runtime.reset()
    try:
        code = cron.main(["--assistant", "--scheduler-url", "http://127.0.0.1:1"])
    finally:
        runtime.reset()
    assert code == cron.EXIT_CONFIG
    assert "CDC_WAREHOUSE_URL is chDB" in capsys.readouterr().err
