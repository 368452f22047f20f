"""The warehouse layer without a warehouse: quoting (`sql.py`), the type map in both directions
(`types.py`) and what each server version can do (`Features`)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pyarrow as pa
import pytest

from pipeline.core.errors import WarehouseError
from pipeline.warehouse import Features, connect
from pipeline.warehouse.sql import (
    column_list,
    ints,
    key_fingerprint,
    literal,
    qualified,
    quote_ident,
    render,
    timestamp_sql,
)
from pipeline.warehouse.types import arrow_to_clickhouse, clickhouse_to_arrow, column_defs

NEW = Features((24, 8, 1))  # chDB and current servers
OLD = Features((18, 16, 1))  # Debian's ClickHouse


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("users", "`users`"),
        ("we`ird", "`we\\`ird`"),
        ("back\\slash", "`back\\\\slash`"),
        ("\\`", "`\\\\\\``"),
        ('it\'s "q"', '`it\'s "q"`'),
        ("ünï код 😀", "`ünï код 😀`"),
        ("a; DROP TABLE t; --", "`a; DROP TABLE t; --`"),
        ("x" * 300, "`" + "x" * 300 + "`"),
    ],
)
def test_quote_ident(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


@pytest.mark.parametrize("name", ["", "a\x00b"])
def test_quote_ident_refuses_what_no_identifier_can_hold(name: str) -> None:
    with pytest.raises(ValueError, match="invalid identifier"):
        quote_ident(name)


def test_qualified_names_and_column_lists() -> None:
    assert qualified("db", "t`x") == "`db`.`t\\`x`"
    assert column_list(["a", "b`"]) == "`a`, `b\\``"
    assert key_fingerprint(("id",)) == "cityHash64(toString(`id`))"
    assert key_fingerprint(("a", "b")) == "cityHash64(toString(`a`), toString(`b`))"
    assert ints([3, 1, 2]) == "3, 1, 2"
    assert timestamp_sql(True, "'2100-01-01'") == "toDateTime64('2100-01-01', 6, 'UTC')"
    assert timestamp_sql(False, "'2100-01-01'") == "toDateTime('2100-01-01', 'UTC')"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "NULL"),
        (True, "1"),
        (False, "0"),
        (42, "42"),
        (-1.5, "-1.5"),
        (Decimal("1.10"), "1.10"),
        ("plain", "'plain'"),
        ("it's \\ here", "'it\\'s \\\\ here'"),
        (datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))), "'2024-01-01 00:00:00'"),
        (datetime(2024, 1, 1, 0, 0, 0, 5), "'2024-01-01 00:00:00.000005'"),
        (date(2024, 2, 29), "'2024-02-29'"),
        ([1, "a"], "(1, 'a')"),
        ((), "(NULL)"),
        (frozenset({7}), "(7)"),
    ],
)
def test_literal(value: object, text: str) -> None:
    assert literal(value) == text


def test_literal_refuses_what_it_cannot_render() -> None:
    with pytest.raises(TypeError, match="cannot render bytes"):
        literal(b"x")


def test_render_substitutes_parameters_as_the_servers_driver_does() -> None:
    sql = "SELECT %(a)s, %(b)s, '100%%', '%%(c)s' FROM t WHERE x = %(a)s"
    assert render(sql, {"a": "x'y", "b": None}) == (
        "SELECT 'x\\'y', NULL, '100%', '%(c)s' FROM t WHERE x = 'x\\'y'"
    )
    assert render(sql, {"a": "x'y", "b": None}) == sql % {"a": "'x\\'y'", "b": "NULL"}
    assert render("SELECT %(a)s", None) == "SELECT %(a)s"
    with pytest.raises(KeyError):
        render("SELECT %(missing)s", {"a": 1})


# --- the type map -----------------------------------------------------------------------------

# Arrow type -> (column type on new servers and chDB, on 18.16, the Arrow type read back)
TYPE_MAP = [
    (pa.string(), "String", "String", pa.string()),
    (pa.large_string(), "String", "String", pa.string()),
    (pa.binary(), "String", "String", pa.string()),
    (pa.large_binary(), "String", "String", pa.string()),
    (pa.binary(4), "String", "String", pa.string()),
    (pa.bool_(), "Bool", "UInt8", pa.bool_()),
    (pa.int8(), "Int8", "Int8", pa.int8()),
    (pa.int16(), "Int16", "Int16", pa.int16()),
    (pa.int32(), "Int32", "Int32", pa.int32()),
    (pa.int64(), "Int64", "Int64", pa.int64()),
    (pa.uint8(), "UInt8", "UInt8", pa.uint8()),
    (pa.uint16(), "UInt16", "UInt16", pa.uint16()),
    (pa.uint32(), "UInt32", "UInt32", pa.uint32()),
    (pa.uint64(), "UInt64", "UInt64", pa.uint64()),
    (pa.float32(), "Float32", "Float32", pa.float32()),
    (pa.float64(), "Float64", "Float64", pa.float64()),
    (pa.decimal128(12, 2), "Decimal(12, 2)", "Decimal(12, 2)", pa.decimal128(12, 2)),
    (pa.decimal128(38, 10), "Decimal(38, 10)", "Decimal(38, 10)", pa.decimal128(38, 10)),
    (
        pa.timestamp("us", "UTC"),
        "DateTime64(6, 'UTC')",
        "DateTime('UTC')",
        pa.timestamp("us", "UTC"),
    ),
    (pa.timestamp("s"), "DateTime64(6, 'UTC')", "DateTime('UTC')", pa.timestamp("us", "UTC")),
    (pa.date32(), "Date32", "Date", pa.date32()),
    (pa.date64(), "Date32", "Date", pa.date32()),
    (pa.null(), "String", "String", pa.string()),
]


@pytest.mark.parametrize(("arrow", "new", "old", "back"), TYPE_MAP, ids=lambda v: str(v))
def test_arrow_to_clickhouse_and_back(
    arrow: pa.DataType, new: str, old: str, back: pa.DataType
) -> None:
    assert arrow_to_clickhouse(arrow, NEW, nullable=False) == new
    assert arrow_to_clickhouse(arrow, OLD, nullable=False) == old
    assert arrow_to_clickhouse(arrow, NEW) == f"Nullable({new})"
    assert clickhouse_to_arrow(new) == back
    assert clickhouse_to_arrow(f"Nullable({new})") == back
    if old != "UInt8" or new == "UInt8":  # 18.16 has no Bool: it comes back as UInt8
        assert clickhouse_to_arrow(old) == back


@pytest.mark.parametrize(
    ("ch_type", "arrow"),
    [
        ("LowCardinality(Nullable(String))", pa.string()),
        ("Nullable(DateTime('UTC'))", pa.timestamp("us", "UTC")),
        ("DateTime", pa.timestamp("us", "UTC")),
        ("DateTime64(3)", pa.timestamp("us", "UTC")),
        ("Decimal(18, 4)", pa.decimal128(18, 4)),
        ("Decimal128(38,10)", pa.decimal128(38, 10)),
        ("FixedString(16)", pa.string()),
        ("Date", pa.date32()),
        ("UInt8", pa.uint8()),
    ],
)
def test_clickhouse_types_the_servers_report(ch_type: str, arrow: pa.DataType) -> None:
    assert clickhouse_to_arrow(ch_type) == arrow


@pytest.mark.parametrize("ch_type", ["Array(String)", "Map(String, String)", "UUID", "IPv4"])
def test_unmapped_clickhouse_types_are_named(ch_type: str) -> None:
    with pytest.raises(WarehouseError, match=re.escape(f"ClickHouse type {ch_type}")):
        clickhouse_to_arrow(ch_type)


def test_unmapped_arrow_types_are_named() -> None:
    with pytest.raises(TypeError, match="no ClickHouse type for Arrow type list<item: int64>"):
        arrow_to_clickhouse(pa.list_(pa.int64()), NEW)


def test_column_defs_quote_names_and_keep_keys_not_null() -> None:
    schema = pa.schema([("id", pa.int64()), ("na`me", pa.string()), ("at", pa.timestamp("us"))])
    assert column_defs(schema, OLD, not_null=["id"]) == (
        "`id` Int64, `na\\`me` Nullable(String), `at` Nullable(DateTime('UTC'))"
    )


# --- features ---------------------------------------------------------------------------------


def test_features_by_server_version() -> None:
    assert (OLD.datetime64, OLD.bool_type, OLD.date32, OLD.ttl, OLD.lightweight_exchange) == (
        False,
        False,
        False,
        False,
        False,
    )
    assert (NEW.datetime64, NEW.bool_type, NEW.date32, NEW.ttl, NEW.lightweight_exchange) == (
        True,
        True,
        True,
        True,
        True,
    )
    assert Features((20, 1)).datetime64 and not Features((19, 17)).datetime64
    assert Features((21, 9)).date32 and not Features((21, 8, 9)).date32
    assert Features((21, 12)).bool_type and not Features((21, 11)).bool_type
    assert Features((19, 6)).ttl and not Features((19, 5, 9)).ttl
    assert OLD.timestamp_type == "DateTime('UTC')"
    assert NEW.timestamp_type == "DateTime64(6, 'UTC')"
    assert OLD.timestamp_range == "1970-01-01 00:00:01 .. 2105-12-31 23:59:59"
    assert NEW.timestamp_range == "1900-01-01 00:00:00 .. 2299-12-31 23:59:59"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://h/db", "CDC_WAREHOUSE_URL must start with chdb:// or clickhouse://"),
        ("chdb://relative/path", "chDB warehouse URL needs an absolute path: chdb://relative/path"),
    ],
)
def test_bad_warehouse_urls_are_refused_before_connecting(url: str, message: str) -> None:
    with pytest.raises(WarehouseError, match=message):
        connect(url)


def test_literal_timestamps_are_utc_for_any_zone() -> None:
    instant = datetime(2024, 6, 1, 12, tzinfo=UTC)
    zones = [timezone(timedelta(hours=h)) for h in (-7, 0, 5)]
    assert {literal(instant.astimezone(z)) for z in zones} == {"'2024-06-01 12:00:00'"}
