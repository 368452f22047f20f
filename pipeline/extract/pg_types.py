"""PostgreSQL column types -> Arrow: the type map, how each column is selected, exact JSON.

The documented map (docs/postgres.md, "Type mapping"); `spec` says how a column leaves the
server in COPY's CSV and which Arrow type it is parsed into, then finished as.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import pyarrow as pa

# PostgreSQL type name (information_schema.columns.udt_name) -> Arrow type factory
_SIMPLE = {
    "int2": "int16",
    "int4": "int32",
    "int8": "int64",
    "float4": "float32",
    "float8": "float64",
    "bool": "bool_",
    "date": "date32",
}
TIMESTAMPS = ("timestamptz", "timestamp")
_JSON = ("json", "jsonb")
# Session settings the text the server sends depends on; fixed so output is the same everywhere.

_MARK = "\ue000"  # a private-use character: brackets a fractional number inside the encoder
_ESCAPED_MARK = re.compile(r"\\u[eE]000")
_MARKED_NUMBER = re.compile(f'"{_MARK}([^"{_MARK}]*){_MARK}"')


@dataclass(frozen=True)
class Column:
    name: str
    udt_name: str
    precision: int | None
    scale: int | None


def _is_decimal(column: Column) -> bool:
    """numeric(p, s) that decimal128 holds exactly (PostgreSQL 15 also allows s < 0 or s > p)."""
    p, s = column.precision, column.scale
    return column.udt_name == "numeric" and p is not None and s is not None and 0 <= s <= p <= 38


def arrow_type(column: Column) -> pa.DataType:
    """The documented Arrow type of a PostgreSQL column (docs/postgres.md, "Type mapping")."""
    import pyarrow as pa

    if column.udt_name in _SIMPLE:
        return getattr(pa, _SIMPLE[column.udt_name])()
    if _is_decimal(column):
        return pa.decimal128(column.precision, column.scale)
    if column.udt_name in TIMESTAMPS:
        return pa.timestamp("us", "UTC")
    # text, uuid, unconstrained numeric (exact text), json/jsonb and arrays (canonical JSON),
    # bytea (base64), and every other type as the server's text
    return pa.string()


class Spec(NamedTuple):
    """How one column is selected, parsed from CSV, and finished into its Arrow type."""

    expr: Any  # psycopg2.sql.Composable
    parsed: pa.DataType
    final: pa.DataType
    json: bool


def spec(column: Column) -> Spec:
    import pyarrow as pa
    from psycopg2 import sql

    ident = sql.Identifier(column.name)
    final = arrow_type(column)
    if column.udt_name == "timestamptz":
        return Spec(
            sql.SQL("({} AT TIME ZONE 'UTC')").format(ident), pa.timestamp("us"), final, False
        )
    if column.udt_name == "timestamp":
        return Spec(ident, pa.timestamp("us"), final, False)
    if column.udt_name.startswith("_"):
        return Spec(sql.SQL("array_to_json({})").format(ident), final, final, True)
    if column.udt_name == "bytea":
        b64 = sql.SQL("translate(encode({}, 'base64'), E'\\n', '')").format(ident)
        return Spec(b64, final, final, False)
    return Spec(ident, final, final, column.udt_name in _JSON)


class _Number(str):
    """A fractional JSON number token, kept verbatim."""


def _exact_json(value: Any) -> Iterator[str]:
    """Canonical JSON with number tokens verbatim (the slow path of `canonical_json`)."""
    if isinstance(value, dict):
        yield "{"
        for i, key in enumerate(sorted(value)):
            yield ("," if i else "") + json.dumps(key, ensure_ascii=False) + ":"
            yield from _exact_json(value[key])
        yield "}"
    elif isinstance(value, list):
        yield "["
        for i, item in enumerate(value):
            if i:
                yield ","
            yield from _exact_json(item)
        yield "]"
    elif isinstance(value, _Number):
        yield value
    else:
        yield json.dumps(value, ensure_ascii=False)


def _marked(token: str) -> str:
    return _MARK + token + _MARK


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_MARKING = json.JSONDecoder(parse_float=_marked)


def canonical_json(text: str) -> str:
    """Sorted keys, no spaces, non-ASCII kept, numbers exactly as PostgreSQL wrote them.

    Fractional numbers travel through the C encoder as marked strings and are unquoted after;
    a document that could already contain the marker takes the slower exact path.
    """
    if _MARK in text or _ESCAPED_MARK.search(text):
        return "".join(_exact_json(json.loads(text, parse_float=_Number)))
    out = _ENCODER.encode(_MARKING.decode(text))
    return _MARKED_NUMBER.sub(r"\1", out) if _MARK in out else out
