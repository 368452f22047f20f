"""`pipeline.config`: luigi.cfg + CDC_* variables + `<VAR>_FILE` secrets -> validated Settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ENTITY_OPTIONS,
    FIELD,
    FIELDS,
    OPTION,
    Entity,
    Settings,
    load_settings,
    mask_url,
    secret_values,
    timestamp_setting,
)
from pipeline.core.errors import ConfigError

USERS = "[entity.users]\nsource = mongo\nunique_key = _id\n"


@pytest.fixture
def cfg(tmp_path: Path):
    """Write a luigi.cfg from sections of text and return its path."""

    def write(*sections: str) -> Path:
        path = tmp_path / "luigi.cfg"
        path.write_text("\n".join(sections))
        return path

    return write


def load(cfg, *sections: str) -> Settings:
    return load_settings(cfg(*sections))


def entity(cfg, options: str, name: str = "e") -> Entity:
    return load(cfg, f"[entity.{name}]\n{options}").entity(name)


def refused(cfg, *sections: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(cfg(*sections))
    return str(err.value)


# --- [cdc] settings ---------------------------------------------------------------------------


def test_defaults_are_the_fields_defaults_parsed(cfg) -> None:
    settings = load(cfg, USERS)
    for f in FIELDS:
        assert getattr(settings, f.key) == f.parse(f.default), f.key
    assert settings.mongo_uri == "mongodb://127.0.0.1:27017"
    assert settings.database == "data_pipeline"
    assert settings.s3_secure is False
    assert settings.batch_rows == 50_000 and isinstance(settings.batch_rows, int)
    assert settings.lookback_minutes == 10.0 and isinstance(settings.lookback_minutes, float)
    assert settings.delete_guard == 0.2
    assert settings.task_retries == 0


def test_settings_have_exactly_one_attribute_per_field() -> None:
    names = [f for f in Settings.__dataclass_fields__ if f != "entities"]
    assert names == [f.key for f in FIELDS]
    assert set(FIELD) == {f.key for f in FIELDS} and len(FIELD) == len(FIELDS)


def test_cfg_values_then_environment_override_defaults(
    cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = cfg("[cdc]\nmongo_db = from_cfg\ndatabase = cfg_db\nbatch_rows = 7\n", USERS)
    settings = load_settings(path)
    assert (settings.mongo_db, settings.database, settings.batch_rows) == ("from_cfg", "cfg_db", 7)
    monkeypatch.setenv("CDC_MONGO_DB", "from_env")
    monkeypatch.setenv("CDC_DATABASE", "env_db")
    monkeypatch.setenv("CDC_S3_SECURE", "yes")
    settings = load_settings(path)
    assert (settings.mongo_db, settings.database, settings.s3_secure) == (
        "from_env",
        "env_db",
        True,
    )
    assert settings.batch_rows == 7  # no variable for it: the cfg value stays


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("no", False)],
)
def test_bool_settings(cfg, monkeypatch: pytest.MonkeyPatch, text: str, value: bool) -> None:
    monkeypatch.setenv("CDC_S3_SECURE", text)
    assert load(cfg, USERS).s3_secure is value


def test_every_env_variable_overrides_its_field(cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    for f in FIELDS:
        if f.env:
            monkeypatch.setenv(f.env, "1" if f.kind in ("int", "float", "bool") else "envvalue")
    settings = load(cfg, USERS)
    for f in FIELDS:
        if f.env:
            assert getattr(settings, f.key) == f.parse(
                "1" if f.kind in ("int", "float", "bool") else "envvalue"
            ), f.env


def test_secret_from_a_file(cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "s3"
    secret.write_text("  from-the-file\n")
    monkeypatch.setenv("CDC_S3_SECRET_KEY_FILE", str(secret))
    assert load(cfg, USERS).s3_secret_key == "from-the-file"
    monkeypatch.setenv("CDC_S3_SECRET_KEY", "from-the-variable")  # the variable wins
    assert load(cfg, USERS).s3_secret_key == "from-the-variable"
    monkeypatch.delenv("CDC_S3_SECRET_KEY")
    dsn = tmp_path / "dsn"
    dsn.write_text("host=db password=pw-in-file\n")
    monkeypatch.setenv("CDC_POSTGRES_DSN_FILE", str(dsn))  # any variable + _FILE
    assert load(cfg, USERS).postgres_dsn == "host=db password=pw-in-file"


def test_unknown_cdc_setting_is_refused(cfg) -> None:
    message = refused(cfg, "[cdc]\nbatch_row = 5\nzzz = 1\n", USERS)
    assert message.startswith("[cdc]: unknown setting(s) ['batch_row', 'zzz']; known: [")
    assert "'batch_rows'" in message


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("batch_rows = many", "[cdc] batch_rows must be a number, got 'many'"),
        ("part_rows = 1.5", "[cdc] part_rows must be a number, got '1.5'"),
        ("delete_guard = lots", "[cdc] delete_guard must be a number, got 'lots'"),
        ("lookback_minutes = ", "[cdc] lookback_minutes must be a number, got ''"),
        ("database = data-pipeline", "invalid CDC_DATABASE 'data-pipeline'"),
    ],
)
def test_bad_cdc_values_are_refused(cfg, line: str, message: str) -> None:
    assert message in refused(cfg, f"[cdc]\n{line}\n", USERS)


def test_bad_database_from_the_environment(cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_DATABASE", "x`; DROP")
    assert refused(cfg, USERS) == (
        "invalid CDC_DATABASE 'x`; DROP': use letters, digits and _ only"
    )


def test_no_entity_is_refused(cfg) -> None:
    assert "no [entity.NAME] sections found" in refused(cfg, "[cdc]\nmongo_db = x\n")


# --- [entity.NAME] sections -------------------------------------------------------------------


def test_entity_defaults(cfg) -> None:
    users = entity(cfg, "source = mongo\nunique_key = _id", "users")
    assert users == Entity(
        name="users",
        source="mongo",
        object_name="users",
        unique_key=("_id",),
        strategy="check",
        check_cols=None,
        updated_at=None,
        hard_deletes="ignore",
        mode="full",
        delete_guard=0.2,
        fields=None,
        flatten=(),
        partitions=1,
        meta_names=(),
        valid_to_current=None,
        reconcile=False,
        raw_retention_days=30.0,
    )
    assert (users.raw_table, users.snapshot_table, users.storage_table) == (
        "raw_users",
        "users_snapshot",
        "users_snapshot__versions",
    )
    assert users.meta_name("dbt_valid_to") == "dbt_valid_to" and not users.incremental


def test_entity_options_parsed(cfg) -> None:
    orders = entity(
        cfg,
        "source = postgres\ntable = public.orders\nunique_key = tenant, id\n"
        "strategy = timestamp\nupdated_at = changed\nhard_deletes = invalidate\n"
        "reconcile = true\ndelete_guard = 0.5\nraw_retention_days = 3\n"
        "snapshot_meta_column_names = dbt_valid_from: valid_from, dbt_valid_to: valid_to\n"
        "dbt_valid_to_current = 9999-12-31",
        "orders",
    )
    assert orders.object_name == "public.orders"
    assert orders.unique_key == ("tenant", "id")
    assert (orders.strategy, orders.updated_at, orders.hard_deletes) == (
        "timestamp",
        "changed",
        "invalidate",
    )
    assert orders.mode == "incremental" and orders.incremental  # the default with updated_at
    assert orders.reconcile is True
    assert (orders.delete_guard, orders.raw_retention_days) == (0.5, 3.0)
    assert orders.meta_names == (("dbt_valid_from", "valid_from"), ("dbt_valid_to", "valid_to"))
    assert orders.meta_name("dbt_valid_to") == "valid_to"
    assert orders.meta_name("dbt_scd_id") == "dbt_scd_id"
    assert orders.valid_to_current == "9999-12-31 00:00:00.000000"
    people = entity(
        cfg,
        "source = mongo\ncollection = persons\nunique_key = _id\ncheck_cols = b a,c\n"
        "fields = name, age\nflatten = address.city address.zip\npartitions = 4",
        "people",
    )
    assert people.object_name == "persons"
    assert people.check_cols == ("b", "a", "c")
    assert people.fields == ("name", "age")
    assert people.flatten == ("address.city", "address.zip")
    assert people.partitions == 4
    full = entity(cfg, "source = postgres\nunique_key = id\nupdated_at = u\nmode = full")
    assert full.mode == "full" and full.object_name == "e"


def test_entity_numbers_default_to_the_cdc_values(cfg) -> None:
    settings = load(cfg, "[cdc]\ndelete_guard = 0.7\nraw_retention_days = 2\n", USERS)
    assert (settings.entity("users").delete_guard, settings.entity("users").raw_retention_days) == (
        0.7,
        2.0,
    )


def test_unknown_entity_name_lists_the_known(cfg) -> None:
    settings = load(cfg, USERS, "[entity.orders]\nsource = postgres\nunique_key = id\n")
    with pytest.raises(ConfigError, match=r"unknown entity 'x'; luigi.cfg declares: users, orders"):
        settings.entity("x")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("unique_key = id", "[entity.e]: 'source' is required"),
        ("source = mongo", "[entity.e]: 'unique_key' is required"),
        ("source = mysql\nunique_key = id", "[entity.e]: source must be one of"),
        (
            "source = mongo\nunique_key = id\ncheck_col = a",
            "[entity.e]: unknown option(s) ['check_col']; known: [",
        ),
        (
            "source = mongo\nunique_key = id\ntable = t\nmode = full",
            "[entity.e]: ['table'] do not apply to mongo sources",
        ),
        (
            "source = postgres\nunique_key = id\ncollection = c",
            "[entity.e]: ['collection'] do not apply to postgres sources",
        ),
        (
            "source = postgres\nunique_key = id\npartitions = 2\nfields = a\nflatten = b.c",
            "[entity.e]: ['fields', 'flatten', 'partitions'] do not apply to postgres sources",
        ),
        (
            "source = mongo\nunique_key = id\nreconcile = true",
            "[entity.e]: ['reconcile'] do not apply to mongo sources",
        ),
        (
            "source = mongo\nunique_key = id\nstrategy = timestamps",
            "[entity.e]: strategy must be one of ('check', 'timestamp'), got 'timestamps'",
        ),
        (
            "source = mongo\nunique_key = id\nstrategy = timestamp",
            "[entity.e]: strategy = timestamp needs 'updated_at'",
        ),
        (
            "source = mongo\nunique_key = id\nhard_deletes = delete",
            "[entity.e]: hard_deletes must be one of ('ignore', 'invalidate', 'new_record')",
        ),
        (
            "source = postgres\nunique_key = id\nmode = incremental_",
            "[entity.e]: mode must be one of ('full', 'incremental', 'log', 'changestream'),"
            " got 'incremental_'",
        ),
        (
            "source = postgres\nunique_key = id\nmode = incremental",
            "[entity.e]: mode = incremental needs a postgres table and 'updated_at'",
        ),
        (
            "source = postgres\nunique_key = id\nupdated_at = u\nmode = full\nreconcile = yes\n"
            "hard_deletes = invalidate",
            "[entity.e]: reconcile applies to incremental postgres tables only",
        ),
        (
            "source = postgres\nunique_key = id\nupdated_at = u\nreconcile = 1",
            "[entity.e]: reconcile needs hard_deletes = invalidate or new_record",
        ),
        (
            "source = mongo\nunique_key = id\ndelete_guard = some",
            "[entity.e]: expected a number, got 'some'",
        ),
        (
            "source = mongo\nunique_key = id\nraw_retention_days = 1w",
            "[entity.e]: expected a number, got '1w'",
        ),
        (
            "source = mongo\nunique_key = id\npartitions = 0",
            "[entity.e] partitions must be a positive integer, got '0'",
        ),
        (
            "source = mongo\nunique_key = id\npartitions = two",
            "[entity.e] partitions must be a positive integer, got 'two'",
        ),
        (
            "source = mongo\nunique_key = id\ndbt_valid_to_current = tomorrow",
            "[entity.e] dbt_valid_to_current must be a timestamp like 2100-01-01 00:00:00,"
            " got 'tomorrow'",
        ),
        (
            "source = mongo\nunique_key = id\ndbt_valid_to_current = 2100-13-01",
            "[entity.e] dbt_valid_to_current must be a timestamp like",
        ),
        (
            "source = mongo\nunique_key = id\nsnapshot_meta_column_names = valid_from: v",
            "[entity.e]: snapshot_meta_column_names: unknown column 'valid_from'",
        ),
        (
            "source = mongo\nunique_key = id\nsnapshot_meta_column_names = dbt_valid_to: v-to",
            "invalid [entity.e] snapshot_meta_column_names value 'v-to'",
        ),
    ],
)
def test_bad_entity_options_are_refused(cfg, options: str, message: str) -> None:
    assert message in refused(cfg, f"[entity.e]\n{options}\n")


def test_bad_entity_name_is_refused(cfg) -> None:
    message = refused(cfg, "[entity.my-users]\nsource = mongo\nunique_key = _id\n")
    assert message == (
        "invalid entity name in [entity.my-users] 'my-users': use letters, digits and _ only"
    )


def test_every_entity_option_is_accepted_by_each_source_it_names(cfg) -> None:
    """Each option of ENTITY_OPTIONS parses for every source it names (none is dead)."""
    values = {
        "collection": "c",
        "table": "public.t",
        "unique_key": "id",
        "strategy": "timestamp\nupdated_at = u",
        "check_cols": "a, b",
        "updated_at": "u",
        "hard_deletes": "invalidate",
        "delete_guard": "0.3",
        "reconcile": "true\nupdated_at = u\nhard_deletes = invalidate",
        "partitions": "2",
        "fields": "a",
        "flatten": "x.y",
        "snapshot_meta_column_names": "dbt_valid_to: valid_to",
        "dbt_valid_to_current": "2100-01-01 00:00:00",
        "raw_retention_days": "5",
    }
    modes = {"mongo": "changestream", "postgres": "log"}
    assert set(values) | {"source", "mode", "collapse"} == set(OPTION)
    for option in ENTITY_OPTIONS:
        for source in option.sources:
            lines = [f"source = {source}", "unique_key = id"]
            if option.key == "mode":
                lines.append(f"mode = {modes[source]}")
            elif option.key == "collapse":
                lines += [f"mode = {modes[source]}", "collapse = true"]
            elif option.key not in ("source", "unique_key"):
                lines.append(f"{option.key} = {values[option.key]}")
            e = entity(cfg, "\n".join(lines))
            assert e.source == source, option.key


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("9999-12-31", "9999-12-31 00:00:00.000000"),
        ("2100-01-01 00:00:00", "2100-01-01 00:00:00.000000"),
        ("2100-01-01T02:30:00.5+02:00", "2100-01-01 00:30:00.500000"),
        (" 2100-01-01 ", "2100-01-01 00:00:00.000000"),
    ],
)
def test_dbt_valid_to_current_is_stored_as_utc_text(cfg, text: str, stored: str) -> None:
    e = entity(cfg, f"source = mongo\nunique_key = id\ndbt_valid_to_current = {text}")
    assert e.valid_to_current == stored
    assert timestamp_setting(text, "x").utcoffset().total_seconds() == 0


# --- secrets ----------------------------------------------------------------------------------


def test_settings_secrets_are_secret_fields_and_dsn_passwords(cfg) -> None:
    settings = load(
        cfg,
        "[cdc]\nmongo_uri = mongodb://app:mongo%40pw@db:27017\n"
        "postgres_dsn = host=pg user=u password='pg pw' sslpassword=sslpw\n"
        "warehouse_url = clickhouse://u:chpw1@ch:9000\ns3_access_key = AKIAVISIBLE\n"
        "s3_secret_key = s3-secret\n",
        USERS,
    )
    assert settings.secrets() == {
        "mongo%40pw",
        "mongo@pw",
        "pg pw",
        "sslpw",
        "chpw1",
        "s3-secret",
    }
    text = repr(settings)
    assert "s3-secret" not in text and "pg pw" not in text and "chpw1" not in text
    assert "mongo%40pw" not in text and "AKIAVISIBLE" in text  # an access key is no secret
    assert mask_url(settings.warehouse_url) == "clickhouse://u:***@ch:9000"


def test_no_secret_without_passwords(cfg) -> None:
    settings = load(cfg, "[cdc]\ns3_secret_key =\nwarehouse_url = chdb:///var/lib/wh\n", USERS)
    assert settings.secrets() == set()


def test_secret_values_of_the_environment_and_the_settings(
    cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("file-token-value\n")
    monkeypatch.setenv("CDC_API_TOKEN_FILE", str(token))
    monkeypatch.setenv("CDC_EXTRA_PASSWORD", "pw-in-env")
    monkeypatch.setenv("CDC_SHORT_SECRET", "abc")  # too short to mask by value
    monkeypatch.setenv("CDC_ALERT_WEBHOOK", "https://hooks.example/T0/B0/XYZ")
    monkeypatch.setenv("CDC_WAREHOUSE_URL", "clickhouse://u:wh-password@ch:9000")
    monkeypatch.setenv("CDC_MONGO_DB", "not-a-secret")
    monkeypatch.setenv("OTHER_PASSWORD", "not-ours")  # only CDC_* variables
    path = cfg("[cdc]\ns3_secret_key = cfg-secret\n", USERS)
    expected = {
        "file-token-value",
        "pw-in-env",
        "https://hooks.example/T0/B0/XYZ",
        "wh-password",
        "cfg-secret",
    }
    assert secret_values(lambda: load_settings(path)) == expected
    assert secret_values() == expected - {"cfg-secret"}


def test_secret_values_survive_broken_settings_and_missing_files(
    cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CDC_S3_SECRET_KEY_FILE", str(tmp_path / "missing"))
    monkeypatch.setenv("CDC_DB_PASSWORD", "still-found")
    broken = cfg("[cdc]\nnot_a_setting = 1\n", USERS)
    assert secret_values(lambda: load_settings(broken)) == {"still-found"}
    with pytest.raises(FileNotFoundError):  # loading itself does fail on the missing file
        load_settings(cfg(USERS))
