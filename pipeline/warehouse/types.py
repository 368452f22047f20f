"""The type map in both directions: Arrow <-> ClickHouse (README, "Type mapping").

What the staged Parquet holds decides the raw table's column types; what a server reports
decides how its columns come back as Arrow. Old servers get the types they have (no
DateTime64, Bool or Date32 before 20.1, 21.12, 21.9): see `Features`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.core.errors import WarehouseError
from pipeline.warehouse.base import Features
from pipeline.warehouse.sql import quote_ident

if TYPE_CHECKING:
    import pyarrow as pa

_WRAPPER = re.compile(r"^(?:Nullable|LowCardinality)\((.*)\)$")
_DECIMAL = re.compile(r"^Decimal(?:\d+)?\((\d+),\s*(\d+)\)$")


def clickhouse_to_arrow(ch_type: str) -> pa.DataType:
    """Map a ClickHouse column type to the Arrow type our stages use."""
    import pyarrow as pa

    while m := _WRAPPER.match(ch_type):
        ch_type = m.group(1)
    simple = {
        "String": pa.string(),
        "Int8": pa.int8(),
        "Int16": pa.int16(),
        "Int32": pa.int32(),
        "Int64": pa.int64(),
        "UInt8": pa.uint8(),
        "UInt16": pa.uint16(),
        "UInt32": pa.uint32(),
        "UInt64": pa.uint64(),
        "Float32": pa.float32(),
        "Float64": pa.float64(),
        "Date": pa.date32(),
        "Date32": pa.date32(),
        "Bool": pa.bool_(),
    }
    if ch_type in simple:
        return simple[ch_type]
    if ch_type.startswith("DateTime"):
        return pa.timestamp("us", "UTC")
    if m := _DECIMAL.match(ch_type):
        return pa.decimal128(int(m.group(1)), int(m.group(2)))
    if ch_type.startswith("FixedString"):
        return pa.string()
    raise WarehouseError(f"no Arrow mapping for ClickHouse type {ch_type}")


def arrow_to_clickhouse(dtype: pa.DataType, features: Features, nullable: bool = True) -> str:
    """The ClickHouse column type that holds an Arrow type without loss (documented in README)."""
    import pyarrow as pa
    import pyarrow.types as t

    if t.is_string(dtype) or t.is_large_string(dtype):
        base = "String"
    elif t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype):
        base = "String"
    elif t.is_boolean(dtype):
        base = "Bool" if features.bool_type else "UInt8"
    elif t.is_integer(dtype):
        base = {
            pa.int8(): "Int8",
            pa.int16(): "Int16",
            pa.int32(): "Int32",
            pa.int64(): "Int64",
            pa.uint8(): "UInt8",
            pa.uint16(): "UInt16",
            pa.uint32(): "UInt32",
            pa.uint64(): "UInt64",
        }[dtype]
    elif t.is_float32(dtype):
        base = "Float32"
    elif t.is_floating(dtype):
        base = "Float64"
    elif t.is_decimal(dtype):
        base = f"Decimal({dtype.precision}, {dtype.scale})"
    elif t.is_timestamp(dtype):
        base = "DateTime64(6, 'UTC')" if features.datetime64 else "DateTime('UTC')"
    elif t.is_date(dtype):
        base = "Date32" if features.date32 else "Date"
    elif t.is_null(dtype):
        base = "String"
    else:
        raise TypeError(f"no ClickHouse type for Arrow type {dtype}")
    return f"Nullable({base})" if nullable else base


def column_defs(schema: pa.Schema, features: Features, not_null: Sequence[str] = ()) -> str:
    return ", ".join(
        f"{quote_ident(f.name)} {arrow_to_clickhouse(f.type, features, f.name not in not_null)}"
        for f in schema
    )
