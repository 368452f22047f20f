"""The settings block of a mart file: its leading ``--`` comment lines.

The leading ``--`` comment lines of the file. A line ``-- key: value`` is a setting; other
comment lines are prose. Keys:

``materialized``  ``table`` (default) or ``view``
``engine``        table engine, default ``MergeTree`` (e.g. ``ReplacingMergeTree(updated_at)``)
``order_by``      sorting key of a MergeTree table, default ``tuple()``; must not be Nullable
``partition_by``  partition key of a MergeTree table, default none
``tests``         followed by indented ``column: [test, ...]`` lines (a column may repeat)

Tests are written in YAML flow style, as in a dbt ``schema.yml``::

    -- materialized: table
    -- order_by: order_id
    -- tests:
    --   order_id: [unique, not_null]
    --   status: [{accepted_values: {values: [pending, paid, cancelled], severity: warn}}]
    --   user_id: [{relationships: {to: dim_users, field: user_id}}]

``unique`` and ``not_null`` take no arguments; ``accepted_values`` needs ``values`` (bare
numbers are numbers, anything else is a string; quote ``'1'`` to keep a string);
``relationships`` needs ``to`` (a table in the project database, which becomes a dependency)
and takes ``field`` (default: the same column name). Every test takes ``severity``: ``error``
(default; fails the build task) or ``warn`` (logged). As in dbt, NULLs pass every test but
``not_null``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import MartError
from pipeline.core.names import check_name

MATERIALIZATIONS = ("table", "view")
TEST_KINDS = ("unique", "not_null", "accepted_values", "relationships")
SEVERITIES = ("error", "warn")
_SETTING_KEYS = ("materialized", "engine", "order_by", "partition_by", "tests")
_TEST_ARGS = {
    "unique": {"severity"},
    "not_null": {"severity"},
    "accepted_values": {"severity", "values"},
    "relationships": {"severity", "to", "field"},
}
_SETTING = re.compile(r"^([a-z_]+):\s*(.*?)\s*$")
_TEST_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*?)\s*$")
_ENGINE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\(.*\))?$")
_FLOW_TOKEN = re.compile(
    r"""\s*(?:([\[\]{},:])|'((?:[^']|'')*)'|"((?:[^"\\]|\\.)*)"|([^\[\]{},:'"]+))"""
)
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


@dataclass(frozen=True)
class DataTest:
    """One generic test on one column, as in a dbt ``schema.yml``."""

    kind: str
    column: str
    severity: str = "error"
    values: tuple[Any, ...] = ()
    to: str | None = None
    field: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "relationships":
            return f"relationships({self.column} -> {self.to}.{self.field})"
        return f"{self.kind}({self.column})"


@dataclass(frozen=True)
class Header:
    materialized: str = "table"
    engine: str | None = None
    order_by: str | None = None
    partition_by: str | None = None
    tests: tuple[DataTest, ...] = ()


def parse_header(text: str, path: Path) -> Header:
    """Read the leading ``--`` comment block (format in the module docstring)."""
    options: dict[str, str] = {}
    tests: list[DataTest] = []
    problems: list[str] = []
    in_tests = False
    for number, comment in header_lines(text):
        body = comment.lstrip()
        indent = len(comment) - len(body)
        if not body:
            continue
        if in_tests and indent > 1:
            try:
                tests.extend(_parse_test_line(body))
            except ValueError as exc:
                problems.append(f"{path}:{number}: {exc}")
            continue
        in_tests = False
        match = _SETTING.match(body) if indent <= 1 else None
        if not match:
            continue
        key, value = match.groups()
        if key not in _SETTING_KEYS:
            problems.append(
                f"{path}:{number}: unknown setting {key!r} (known: {', '.join(_SETTING_KEYS)})"
            )
        elif key == "tests":
            in_tests = True
            if value:
                problems.append(f"{path}:{number}: list tests on indented lines below 'tests:'")
        elif key in options:
            problems.append(f"{path}:{number}: setting {key!r} given twice")
        else:
            options[key] = value
    if problems:
        raise MartError(problems)
    return _settings(options, tuple(tests), path)


def _settings(options: Mapping[str, str], tests: tuple[DataTest, ...], path: Path) -> Header:
    materialized = options.get("materialized", "table")
    if materialized not in MATERIALIZATIONS:
        raise MartError(f"{path}: materialized must be table or view, got {materialized!r}")
    engine = options.get("engine")
    order_by = options.get("order_by")
    partition_by = options.get("partition_by")
    if materialized == "view":
        if engine or order_by or partition_by:
            raise MartError(f"{path}: a view takes no engine, order_by or partition_by")
        return Header("view", tests=tests)
    engine = engine or "MergeTree"
    if not _ENGINE.match(engine):
        raise MartError(f"{path}: invalid engine {engine!r}")
    if not is_merge_tree(engine) and (order_by or partition_by):
        raise MartError(f"{path}: order_by and partition_by need a MergeTree-family engine")
    for key, expression in (("order_by", order_by), ("partition_by", partition_by)):
        if expression:
            check_expression(expression, key, path)
    return Header("table", engine, order_by, partition_by, tests)


def header_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text after ``--``) for the leading comment block."""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("--"):
            return
        yield number, stripped[2:]


def _header_length(text: str) -> int:
    count = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("--"):
            break
        count += 1
    return count


def body(text: str) -> str:
    """The SELECT without the settings block or a trailing semicolon."""
    lines = text.splitlines()[_header_length(text) :]
    return "\n".join(lines).strip().rstrip(";").rstrip()


def _parse_test_line(body: str) -> list[DataTest]:
    match = _TEST_LINE.match(body)
    if not match:
        raise ValueError(f"expected 'column: [test, ...]', got {body!r}")
    column, raw = match.groups()
    items = _parse_flow(raw)
    if not isinstance(items, list):
        items = [items]
    return [_data_test(column, item) for item in items]


def _data_test(column: str, item: Any) -> DataTest:
    args: Any
    if isinstance(item, str):
        kind, args = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        kind, args = next(iter(item.items()))
        args = args if args is not None else {}
    else:
        raise ValueError(f"a test is a name or {{name: {{arguments}}}}, got {item!r}")
    if kind not in TEST_KINDS:
        raise ValueError(f"unknown test {kind!r} (known: {', '.join(TEST_KINDS)})")
    if not isinstance(args, dict):
        raise ValueError(f"arguments of {kind} must be a {{key: value}} map")
    unknown = set(args) - _TEST_ARGS[kind]
    if unknown:
        raise ValueError(f"{kind} takes {', '.join(sorted(_TEST_ARGS[kind]))}, not {unknown}")
    severity = args.get("severity", "error")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be error or warn, got {severity!r}")
    values: tuple[Any, ...] = ()
    to = field = None
    if kind == "accepted_values":
        raw_values = args.get("values")
        if not isinstance(raw_values, list) or not raw_values:
            raise ValueError("accepted_values needs values: [a, b, ...]")
        if any(isinstance(v, list | dict) for v in raw_values):
            raise ValueError("accepted_values takes plain values")
        values = tuple(raw_values)
    if kind == "relationships":
        to, field = args.get("to"), args.get("field", column)
        if not isinstance(to, str) or not isinstance(field, str):
            raise ValueError("relationships needs to: <table> (and optionally field: <column>)")
        check_name(to, "relationships table")
        check_name(field, "relationships field")
    return DataTest(kind, column, severity, values, to, field)


def _parse_flow(text: str) -> Any:
    """A YAML flow value: ``[a, {b: {c: [1, 'x']}}]``; bare numbers become numbers."""
    tokens = _flow_tokens(text)
    value, position = _flow_value(tokens, 0)
    if position != len(tokens):
        raise ValueError(f"unexpected {tokens[position][1]!r} in {text!r}")
    return value


def _flow_tokens(text: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _FLOW_TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ValueError(f"cannot read {text[position:]!r}")
        punct, single, double, bare = match.groups()
        if punct:
            tokens.append(("punct", punct))
        elif single is not None:
            tokens.append(("scalar", single.replace("''", "'")))
        elif double is not None:
            tokens.append(("scalar", re.sub(r"\\(.)", r"\1", double)))
        elif bare.strip():
            word = bare.strip()
            number = _NUMBER.match(word)
            tokens.append(
                ("scalar", (float(word) if number.group(1) else int(word)) if number else word)
            )
        position = match.end()
    return tokens


def _flow_value(tokens: list[tuple[str, Any]], position: int) -> tuple[Any, int]:
    if position >= len(tokens):
        raise ValueError("value missing")
    kind, value = tokens[position]
    if kind == "scalar":
        return value, position + 1
    if value == "[":
        items: list[Any] = []
        position += 1
        while tokens[position : position + 1] != [("punct", "]")]:
            item, position = _flow_value(tokens, position)
            items.append(item)
            position = _flow_separator(tokens, position, "]")
        return items, position + 1
    if value == "{":
        mapping: dict[str, Any] = {}
        position += 1
        while tokens[position : position + 1] != [("punct", "}")]:
            key, position = _flow_value(tokens, position)
            if not isinstance(key, str) or tokens[position : position + 1] != [("punct", ":")]:
                raise ValueError(f"expected 'key: value' in a {{...}} map near {key!r}")
            if position + 1 < len(tokens) and tokens[position + 1] in (
                ("punct", ","),
                ("punct", "}"),
            ):
                mapping[key], position = None, position + 1
            else:
                mapping[key], position = _flow_value(tokens, position + 1)
            position = _flow_separator(tokens, position, "}")
        return mapping, position + 1
    raise ValueError(f"unexpected {value!r}")


def _flow_separator(tokens: list[tuple[str, Any]], position: int, close: str) -> int:
    if position >= len(tokens):
        raise ValueError(f"missing {close!r}")
    if tokens[position] == ("punct", ","):
        return position + 1
    if tokens[position] == ("punct", close):
        return position
    raise ValueError(f"expected ',' or {close!r}, got {tokens[position][1]!r}")


def check_expression(expression: str, key: str, path: Path) -> None:
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        sqlglot.parse_one(expression, read="clickhouse")
    except SqlglotError as exc:
        raise MartError(f"{path}: {key} is not a valid expression: {expression!r}") from exc


def is_merge_tree(engine: str) -> bool:
    return engine.split("(", 1)[0].endswith("MergeTree")
