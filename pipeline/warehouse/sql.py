"""SQL text: the one quoting function for identifiers, and literals for values.

Identifiers from configuration or sources reach SQL only through `quote_ident`; values go
through driver parameters (`%(name)s`), which the embedded backend renders with `literal`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

_PARAM = re.compile(r"%%|%\((\w+)\)s")  # %% is a literal %, as in the server's driver


def quote_ident(name: str) -> str:
    """Quote one identifier for ClickHouse; anything from config or sources goes through here."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid identifier {name!r}")
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def qualified(database: str, table: str) -> str:
    return f"{quote_ident(database)}.{quote_ident(table)}"


def column_list(names: Any) -> str:
    """`a`, `b`, ... for a sequence of column names."""
    return ", ".join(quote_ident(n) for n in names)


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
    """Substitute %(name)s placeholders with escaped literals (and %% with %, as clickhouse-driver
    does with parameters: the same statement means the same on both backends)."""
    if not params:
        return sql
    return _PARAM.sub(lambda m: "%" if m.group(1) is None else literal(params[m.group(1)]), sql)


def key_fingerprint(keys: tuple[str, ...]) -> str:
    """A key as one number, in SQL; text first, so a widened key type keeps its fingerprint."""
    text = ", ".join(f"toString({quote_ident(k)})" for k in keys)
    return f"cityHash64({text})"


def ints(values: list[int]) -> str:
    """`1, 2, 3`: integers rendered for an IN list."""
    return ", ".join(str(int(v)) for v in values)


def timestamp_sql(datetime64: bool, text_literal: str) -> str:
    """A timestamp literal as the warehouse's instant type (DateTime64 where it has one)."""
    if datetime64:
        return f"toDateTime64({text_literal}, 6, 'UTC')"
    return f"toDateTime({text_literal}, 'UTC')"
