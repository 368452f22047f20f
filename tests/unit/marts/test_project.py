"""The mart project without a warehouse: parsing, the DAG sqlglot infers, the settings header,
templating, and every error naming its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import MartError
from pipeline.marts.build import create_statement
from pipeline.marts.header import DataTest
from pipeline.marts.project import build_order, compile_mart, load_project
from tests.support import SQL_DIR
from tests.support.marts import SOURCES, write


def test_dependency_order_is_inferred_from_sql(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a_top": "SELECT x FROM {{ database }}.m_middle JOIN {{ database }}.z_base USING x",
            "m_middle": "WITH z_base AS (SELECT 1 AS x) SELECT x FROM {{ database }}.z_base",
            "z_base": "SELECT toInt32(1) AS x FROM {{ database }}.users_snapshot",
            "b_lone": "SELECT 1 AS one FROM system.one",
        },
    )
    marts = load_project(tmp_path, "dp", SOURCES)
    assert marts["a_top"].depends_on == {"m_middle", "z_base"}
    assert marts["m_middle"].depends_on == {"z_base"}
    assert marts["z_base"].depends_on == {"users_snapshot"}
    assert marts["b_lone"].depends_on == frozenset()
    assert build_order(marts) == ["b_lone", "z_base", "m_middle", "a_top"]


def test_relationships_target_is_a_dependency(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a_child": (
                "-- tests:\n--   parent_id: [{relationships: {to: z_parent, field: id}}]\n"
                "SELECT 1 AS parent_id"
            ),
            "z_parent": (
                "-- tests:\n--   manager_id: [{relationships: {to: z_parent, field: id}}]\n"
                "SELECT 1 AS id, 1 AS manager_id"
            ),
        },
    )
    marts = load_project(tmp_path, "dp", SOURCES)
    assert marts["a_child"].depends_on == {"z_parent"}
    assert marts["z_parent"].depends_on == frozenset()
    assert build_order(marts) == ["z_parent", "a_child"]


def test_shipped_marts_load_in_dependency_order() -> None:
    marts = load_project(SQL_DIR, "data_pipeline", SOURCES)
    assert set(marts) == {"dim_users", "fct_orders", "mart_daily_revenue_by_state"}
    assert marts["fct_orders"].depends_on == {"orders_snapshot", "users_snapshot"}
    assert marts["mart_daily_revenue_by_state"].depends_on == {"fct_orders"}
    order = build_order(marts)
    assert order.index("fct_orders") < order.index("mart_daily_revenue_by_state")
    assert all(m.tests for m in marts.values())
    assert "data_pipeline.users_snapshot" in compile_mart(marts, "fct_orders")
    assert "{{" not in compile_mart(marts)


def test_unknown_table_names_file_line_and_table(tmp_path: Path) -> None:
    write(tmp_path, {"orders_view": "SELECT *\nFROM\n  {{ database }}.nowhere\n"})
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert f"{tmp_path / 'orders_view.sql'}:3: unknown table dp.nowhere" in str(err.value)


def test_unqualified_and_foreign_tables_are_rejected(tmp_path: Path) -> None:
    write(tmp_path, {"a": "SELECT * FROM users_snapshot", "b": "SELECT * FROM other.t"})
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert "a.sql:1: unqualified table users_snapshot: write {{ database }}.users_snapshot" in str(
        err.value
    )
    assert "b.sql:1: unknown table other.t (outside dp)" in str(err.value)
    write(tmp_path, {"a": "SELECT * FROM {{ database }}.users_snapshot"})
    marts = load_project(tmp_path, "dp", SOURCES | {"other.t"})
    assert marts["b"].depends_on == frozenset()


def test_cycle_names_the_path(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a": "SELECT * FROM {{ database }}.b",
            "b": "SELECT * FROM {{ database }}.c",
            "c": "SELECT * FROM {{ database }}.a",
            "d": "SELECT * FROM {{ database }}.d",
        },
    )
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    message = str(err.value)
    assert message.startswith("dependency cycle: a (")
    assert f"a ({tmp_path / 'a.sql'}) -> b ({tmp_path / 'b.sql'}) -> c (" in message
    assert message.endswith(f"-> a ({tmp_path / 'a.sql'})")
    (tmp_path / "a.sql").write_text("SELECT 1 AS x")
    (tmp_path / "b.sql").write_text("SELECT 1 AS x")
    with pytest.raises(MartError, match=r"dependency cycle: d \(.*d\.sql\) -> d \("):
        load_project(tmp_path, "dp", SOURCES)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"broken": "-- materialized: table\nSELECT a,\n  b\nFROM {{ database }}.t WHERE (\n"},
    )
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert str(err.value).startswith(f"{tmp_path / 'broken.sql'}:4: syntax error:")


def test_one_select_per_file(tmp_path: Path) -> None:
    write(tmp_path, {"two": "SELECT 1;\nSELECT 2", "ins": "INSERT INTO t VALUES (1)"})
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert "ins.sql: expected a SELECT, found INSERT" in str(err.value)
    assert "two.sql: expected one SELECT statement, found 2" in str(err.value)


def test_templating(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "recent": (
                "SELECT * FROM {{database}}.orders_snapshot\n"
                "WHERE created_at >= '{{ since }}' AND region = '{{ region }}'"
            )
        },
    )
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "prod_db", SOURCES, {"since": "2024-01-01"})
    assert str(err.value) == (
        f"{tmp_path / 'recent.sql'}:2: unknown template variable 'region' (known: database, since)"
    )
    marts = load_project(tmp_path, "prod_db", SOURCES, {"since": "2024-01-01", "region": "eu"})
    assert marts["recent"].sql == (
        "SELECT * FROM prod_db.orders_snapshot\nWHERE created_at >= '2024-01-01' AND region = 'eu'"
    )
    write(tmp_path, {"recent": "SELECT * FROM {{ ref('orders') }}"})
    with pytest.raises(MartError, match=r"recent\.sql:1: only \{\{ variable \}\} substitutions"):
        load_project(tmp_path, "prod_db", SOURCES)


def test_settings_block(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "fct": """-- Orders, one row each.
-- materialized: table
-- engine: ReplacingMergeTree(updated_at)
-- order_by: (order_id, user_id)
-- partition_by: toYYYYMM(order_date)
-- tests:
--   order_id: [unique, not_null]
--   status: [{accepted_values: {values: [paid, 'can''t', "x y", 3], severity: warn}}]
--   user_id: [{relationships: {to: users_snapshot}}]
--   user_id: [{not_null: {severity: warn}}]

SELECT 1 AS order_id, 'paid' AS status, 'u' AS user_id, today() AS order_date, now() AS updated_at;
""",
            "v": "-- materialized: view\nSELECT 1 AS x",
        },
    )
    marts = load_project(tmp_path, "dp", SOURCES)
    fct = marts["fct"]
    assert (fct.materialized, fct.engine, fct.order_by, fct.partition_by) == (
        "table",
        "ReplacingMergeTree(updated_at)",
        "(order_id, user_id)",
        "toYYYYMM(order_date)",
    )
    assert fct.tests == (
        DataTest("unique", "order_id"),
        DataTest("not_null", "order_id"),
        DataTest("accepted_values", "status", "warn", ("paid", "can't", "x y", 3)),
        DataTest("relationships", "user_id", to="users_snapshot", field="user_id"),
        DataTest("not_null", "user_id", "warn"),
    )
    assert fct.sql.startswith("SELECT 1 AS order_id") and not fct.sql.endswith(";")
    assert create_statement("dp", fct, "fct__new") == (
        "CREATE TABLE `dp`.`fct__new` ENGINE = ReplacingMergeTree(updated_at)\n"
        "PARTITION BY toYYYYMM(order_date)\nORDER BY (order_id, user_id) AS\n" + fct.sql
    )
    assert marts["v"].materialized == "view"
    assert (
        create_statement("dp", marts["v"], "v__new")
        == "CREATE VIEW `dp`.`v__new` AS\nSELECT 1 AS x"
    )


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("-- materialised: view", "x.sql:1: unknown setting 'materialised'"),
        ("-- materialized: ephemeral", "x.sql: materialized must be table or view"),
        ("-- materialized: view\n-- order_by: x", "x.sql: a view takes no engine"),
        ("-- engine: Memory\n-- order_by: x", "order_by and partition_by need a MergeTree"),
        ("-- order_by: toYYYYMM(x", "x.sql: order_by is not a valid expression"),
        ("-- tests:\n--   x: [uniq]", "x.sql:2: unknown test 'uniq'"),
        (
            "-- tests:\n--   x: [{accepted_values: {severity: warn}}]",
            "accepted_values needs values",
        ),
        ("-- tests:\n--   x: [{unique: {severity: fatal}}]", "severity must be error or warn"),
        ("-- tests:\n--   x: [{relationships: {field: y}}]", "relationships needs to:"),
        ("-- tests:\n--   x: [unique", "x.sql:2: missing ']'"),
        (
            "-- tests:\n--   x: [{relationships: {to: nowhere}}]",
            "relationships(x -> nowhere.x): unknown table dp.nowhere",
        ),
    ],
)
def test_bad_settings_are_reported(tmp_path: Path, header: str, message: str) -> None:
    write(tmp_path, {"x": f"{header}\nSELECT 1 AS x"})
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"my-mart": "SELECT 1 AS x"}, "my-mart.sql: invalid mart name 'my-mart'"),
        ({"dim__new": "SELECT 1 AS x"}, "dim__new.sql: mart names may not end with __new or __old"),
        ({"users_snapshot": "SELECT 1 AS x"}, "mart users_snapshot has the name of a source"),
        ({"x": "SELECT 1 AS x -- {# a comment #}"}, "x.sql:1: only {{ variable }} substitutions"),
        ({"x": "{% if a %}SELECT 1{% endif %}"}, "x.sql:1: only {{ variable }} substitutions"),
        ({"x": "-- tests: [unique]\nSELECT 1 AS x"}, "x.sql:1: list tests on indented lines"),
        ({"x": "-- order_by: a\n-- order_by: b\nSELECT 1 AS a"}, "setting 'order_by' given twice"),
    ],
)
def test_bad_files_are_reported_by_name(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    write(tmp_path, files)
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert message in str(err.value)


def test_every_problem_of_a_project_is_reported_at_once(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a": "SELECT * FROM {{ database }}.nowhere",
            "b": "SELECT * FROM {{ nope }}.users_snapshot",
            "c": "-- materialised: view\nSELECT 1 AS x",
        },
    )
    with pytest.raises(MartError) as err:
        load_project(tmp_path, "dp", SOURCES)
    assert len(err.value.problems) == 3
    assert [p.split(":")[0] for p in err.value.problems] == [
        str(tmp_path / n) + ".sql" for n in ("b", "c", "a")
    ]


def test_missing_directory_and_bad_database_name(tmp_path: Path) -> None:
    with pytest.raises(MartError, match="mart directory not found"):
        load_project(tmp_path / "missing", "dp", SOURCES)
    with pytest.raises(ValueError, match="invalid database 'd-p'"):
        load_project(tmp_path, "d-p", SOURCES)


def test_variables_are_inserted_verbatim_and_compile_names_unknown_marts(tmp_path: Path) -> None:
    write(tmp_path, {"m": "SELECT {{ n }} AS n, '{{ s }}' AS s FROM {{ database }}.raw_users"})
    marts = load_project(tmp_path, "dp", SOURCES, {"n": "41 + 1", "s": "it"})
    assert compile_mart(marts, "m") == "SELECT 41 + 1 AS n, 'it' AS s FROM dp.raw_users\n"
    assert compile_mart(marts) == (
        f"-- m ({tmp_path / 'm.sql'}): table\nSELECT 41 + 1 AS n, 'it' AS s FROM dp.raw_users\n"
    )
    with pytest.raises(MartError, match=r"no mart named 'x' \(marts: m\)"):
        compile_mart(marts, "x")


def test_system_tables_and_ctes_are_not_dependencies(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "m": (
                "WITH raw_users AS (SELECT 1 AS x)\n"
                "SELECT x FROM raw_users, system.one, {{ database }}.users_snapshot"
            )
        },
    )
    assert load_project(tmp_path, "dp", SOURCES)["m"].depends_on == {"users_snapshot"}
