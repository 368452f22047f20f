"""The one warehouse interface both backends implement, plus the shared SQL helpers.

Everything above this layer speaks Arrow and ClickHouse SQL; nothing above it knows whether the
warehouse is a ClickHouse server or chDB in this process.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM = re.compile(r"%\((\w+)\)s")


class WarehouseError(RuntimeError):
    """A warehouse statement failed; the message names the statement's target."""


def quote_ident(name: str) -> str:
    """Quote one identifier for ClickHouse; anything from config or sources goes through here."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid identifier {name!r}")
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# columns every raw table has besides the source's own; a source field may not take these names
RAW_META_COLUMNS = ("_batch_id", "_loaded_at", "_row_hash", "_check_hash", "_check_cols")
EXTRA_COLUMN = "_extra"  # MongoDB fields that are not columns, as canonical JSON
# MergeTree keeps a file per column named after it, %XX-escaped, plus a suffix (`.null.mrk2`);
# servers before 23.x fail the insert when that name exceeds the file system's 255 bytes
MAX_ESCAPED_COLUMN_NAME = 200
_PLAIN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def column_name_problem(name: str) -> str | None:
    """Why a source field cannot be a raw column, or None; such a field lands in `_extra`."""
    if not name:
        return "an empty name"
    if "\x00" in name:
        return "a NUL character"
    if name in RAW_META_COLUMNS or name == EXTRA_COLUMN:
        return "a name the raw table reserves for its own column"
    escaped = sum(1 if byte in _PLAIN_BYTES else 3 for byte in name.encode())
    if escaped > MAX_ESCAPED_COLUMN_NAME:
        return f"a name too long for a column file ({escaped} > {MAX_ESCAPED_COLUMN_NAME} bytes)"
    return None


def check_name(name: str, what: str = "name") -> str:
    """Validate a database/table name from configuration: plain identifiers only."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits and _ only")
    return name


def qualified(database: str, table: str) -> str:
    return f"{quote_ident(database)}.{quote_ident(table)}"


def literal(value: Any) -> str:
    """Render a Python value as a ClickHouse literal (used where a backend has no client params)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float | Decimal):
        return repr(value) if not isinstance(value, Decimal) else str(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return "'" + value.isoformat(sep=" ") + "'"
    if isinstance(value, date):
        return "'" + value.isoformat() + "'"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return "'" + escaped + "'"
    if isinstance(value, list | tuple | set | frozenset):
        return "(" + ", ".join(literal(v) for v in value) + ")" if value else "(NULL)"
    raise TypeError(f"cannot render {type(value).__name__} as a ClickHouse literal")


def render(sql: str, params: Mapping[str, Any] | None) -> str:
    """Substitute %(name)s placeholders with escaped literals."""
    if not params:
        return sql
    return _PARAM.sub(lambda m: literal(params[m.group(1)]), sql)


@dataclass(frozen=True)
class Features:
    """What the connected server can do; probed once so old servers cost new ones nothing."""

    version: tuple[int, ...]

    @property
    def datetime64(self) -> bool:
        return self.version >= (20, 1)

    @property
    def bool_type(self) -> bool:
        return self.version >= (21, 12)

    @property
    def date32(self) -> bool:
        """Date32 spans 1900-2299; plain Date stops at 1970 and clamps silently."""
        return self.version >= (21, 9)

    @property
    def ttl(self) -> bool:
        return self.version >= (19, 6)

    @property
    def lightweight_exchange(self) -> bool:
        """EXCHANGE TABLES: atomic swap of two tables (Atomic database engine)."""
        return self.version >= (21, 1)

    @property
    def timestamp_range(self) -> str:
        """The documented range of `timestamp_type` (newer servers and chDB hold more)."""
        if self.datetime64:
            return "1900-01-01 00:00:00 .. 2299-12-31 23:59:59"
        return "1970-01-01 00:00:01 .. 2105-12-31 23:59:59"

    @property
    def timestamp_type(self) -> str:
        """The column type for instants: microseconds where the server has DateTime64."""
        return "DateTime64(6, 'UTC')" if self.datetime64 else "DateTime('UTC')"


class Warehouse(ABC):
    """A ClickHouse we can run SQL on and move Arrow tables in and out of."""

    url: str
    features: Features

    @abstractmethod
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""

    @abstractmethod
    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run a query and return its rows as tuples (small results only)."""

    @abstractmethod
    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query and return an Arrow table with normalised types."""

    @abstractmethod
    def insert_arrow(self, database: str, table: str, data: pa.Table) -> None:
        """Insert an Arrow table column-wise; columns are matched by name."""

    @abstractmethod
    def close(self) -> None: ...

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = self.query_rows(sql, params)
        return rows[0][0] if rows else None

    def table_exists(self, database: str, table: str) -> bool:
        return bool(
            self.scalar(
                "SELECT count() FROM system.tables WHERE database = %(d)s AND name = %(t)s",
                {"d": database, "t": table},
            )
        )

    def columns(self, database: str, table: str) -> dict[str, str]:
        """Column name -> ClickHouse type, in table order."""
        rows = self.query_rows(
            "SELECT name, type FROM system.columns WHERE database = %(d)s AND table = %(t)s",
            {"d": database, "t": table},
        )
        return dict(rows)

    def holds_timestamp(self, text: str) -> bool:
        """Whether a UTC timestamp (`YYYY-MM-DD HH:MM:SS[.ffffff]`) survives a round trip.

        ClickHouse stores a DateTime outside its range as 1970 (or clamps it) without a word,
        and the range of DateTime64 grew across versions, so the server itself is asked.
        """
        base, _, fraction = text.partition(".")
        if self.features.datetime64:
            sent, expression = text, "toString(toDateTime64(%(t)s, 6, 'UTC'))"
        else:
            sent, expression, fraction = base, "toString(toDateTime(%(t)s, 'UTC'))", ""
        try:
            stored = str(self.scalar(f"SELECT {expression}", {"t": sent}))
        except WarehouseError:
            return False
        stored_base, _, stored_fraction = stored.partition(".")
        return (stored_base, stored_fraction.rstrip("0")) == (base, fraction.rstrip("0"))

    def create_database(self, database: str) -> None:
        self.execute(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")

    def wait_mutations(self, database: str, table: str, timeout: float = 300.0) -> None:
        """Block until ALTER ... DELETE/UPDATE mutations on a table are done (they are async)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            pending = self.scalar(
                "SELECT count() FROM system.mutations"
                " WHERE database = %(d)s AND table = %(t)s AND is_done = 0",
                {"d": database, "t": table},
            )
            if not pending:
                return
            if time.monotonic() > deadline:
                raise WarehouseError(
                    f"mutations on {database}.{table} still running after {timeout}s"
                )
            time.sleep(0.05)

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
