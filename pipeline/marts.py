"""Marts: one ClickHouse SELECT per file under ``sql/``, built atomically and tested like dbt.

A mart is ``sql/<name>.sql``; its name is the file stem. Dependencies are never listed by hand:
the SELECT is parsed with sqlglot (ClickHouse dialect) and every table it reads in the project
database is a dependency, so marts build in the order their SQL implies.

Templating
    ``{{ database }}`` is replaced by the project database (``CDC_DATABASE``); other
    ``{{ name }}`` variables come from the ``variables`` mapping and are inserted verbatim (quote
    them in the SQL if they are strings: ``'{{ start_date }}'``). An unknown variable is an error
    naming the file, line and variable; Jinja blocks (``{% ... %}``) are not supported. Tables are
    referenced as ``{{ database }}.name``: an unqualified name would be looked up in the
    connection's default database, so it is rejected (CTE names excepted). ``system.*`` tables and
    tables listed as ``db.table`` in ``known_tables`` may also be read; they are not dependencies.

Settings block
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

Builds
    ``table``: ``CREATE TABLE <name>__new ... AS <select>``, then swap it in (``EXCHANGE TABLES``
    on servers and databases that have it, else one ``RENAME TABLE`` statement for both names),
    then drop the previous version: readers see the old mart or the new one, never a missing or
    half-built one, and a failed build leaves the old mart untouched. ``view`` takes the same path
    with ``CREATE VIEW``, which is atomic on ClickHouse 18.16 too (it has no ``CREATE OR REPLACE``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.warehouse import WarehouseError, check_name, qualified, quote_ident

if TYPE_CHECKING:
    from sqlglot import exp

    from pipeline.warehouse import Warehouse

log = logging.getLogger(__name__)

MATERIALIZATIONS = ("table", "view")
TEST_KINDS = ("unique", "not_null", "accepted_values", "relationships")
SEVERITIES = ("error", "warn")
SAMPLE_ROWS = 5
_RESERVED_SUFFIXES = ("__new", "__old")
_EXCHANGE_ENGINES = ("Atomic", "Replicated")
_SETTING_KEYS = ("materialized", "engine", "order_by", "partition_by", "tests")
_TEST_ARGS = {
    "unique": {"severity"},
    "not_null": {"severity"},
    "accepted_values": {"severity", "values"},
    "relationships": {"severity", "to", "field"},
}
_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_JINJA_BLOCK = re.compile(r"\{%|\{#|\{\{(?!\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\})")
_SETTING = re.compile(r"^([a-z_]+):\s*(.*?)\s*$")
_TEST_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*?)\s*$")
_ENGINE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\(.*\))?$")
_FLOW_TOKEN = re.compile(
    r"""\s*(?:([\[\]{},:])|'((?:[^']|'')*)'|"((?:[^"\\]|\\.)*)"|([^\[\]{},:'"]+))"""
)
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


class MartError(Exception):
    """The project is invalid or a build failed; each problem names the file (and line)."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


class MartTestError(MartError):
    """An ``error``-severity data test failed after a build; ``results`` holds every test run."""

    def __init__(self, mart: Mart, results: list[TestResult]) -> None:
        self.results = results
        failing = [r for r in results if not r.passed and r.test.severity == "error"]
        super().__init__([f"{mart.path}: {r.describe()}" for r in failing])


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
class TestResult:
    """What one data test found: how many rows fail and a few of them to show."""

    __test__ = False

    mart: str
    test: DataTest
    failures: int
    samples: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.failures == 0

    def describe(self) -> str:
        if self.passed:
            return f"{self.mart}: {self.test.name} passed"
        shown = "; ".join(self.samples)
        return (
            f"{self.mart}: {self.test.name} [{self.test.severity}] failed for"
            f" {_rows(self.failures)}, e.g. {shown}"
        )

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Mart:
    """A validated mart: resolved SQL, how to materialize it, its tests and what it reads."""

    name: str
    path: Path
    sql: str
    materialized: str
    engine: str | None
    order_by: str | None
    partition_by: str | None
    tests: tuple[DataTest, ...]
    depends_on: frozenset[str]


@dataclass(frozen=True)
class _Settings:
    materialized: str = "table"
    engine: str | None = None
    order_by: str | None = None
    partition_by: str | None = None
    tests: tuple[DataTest, ...] = ()


def load_project(
    sql_dir: Path,
    database: str,
    known_tables: set[str],
    variables: Mapping[str, str] | None = None,
) -> dict[str, Mart]:
    """Load and validate every ``sql_dir/*.sql``; all problems are reported together.

    ``known_tables`` are the non-mart tables of the project database (sources, snapshots), plus
    any ``db.table`` outside it that marts may read.
    """
    check_name(database, "database")
    if not sql_dir.is_dir():
        raise MartError(f"{sql_dir}: mart directory not found")
    values = {**(variables or {}), "database": database}
    paths = sorted(sql_dir.glob("*.sql"))
    problems: list[str] = []
    marts: dict[str, Mart] = {}
    references: dict[str, list[_Reference]] = {}
    for path in paths:
        try:
            marts[path.stem], references[path.stem] = _load_file(path, database, values)
        except MartError as exc:
            problems.extend(exc.problems)
    names = {path.stem for path in paths}
    for name, mart in marts.items():
        if name in known_tables:
            problems.append(f"{mart.path}: mart {name} has the name of a source/snapshot table")
        for test in mart.tests:
            if test.to is not None and test.to not in known_tables and test.to not in names:
                problems.append(
                    f"{mart.path}: {test.name}: unknown table {database}.{test.to}"
                    f" (not a source, a snapshot or a mart)"
                )
    for name, refs in references.items():
        problems.extend(_unknown_references(marts[name].path, refs, database, known_tables, names))
    if problems:
        raise MartError(problems)
    cycle = find_cycle(marts)
    if cycle:
        raise MartError(f"dependency cycle: {_describe_cycle(marts, cycle)}")
    return marts


def build_order(marts: Mapping[str, Mart]) -> list[str]:
    """Marts in an order where each comes after the marts it reads (ties broken by name)."""
    cycle = find_cycle(marts)
    if cycle:
        raise MartError(f"dependency cycle: {_describe_cycle(marts, cycle)}")
    done: list[str] = []
    placed: set[str] = set()
    remaining = sorted(marts)
    while remaining:
        ready = [n for n in remaining if _mart_deps(marts, n) <= placed]
        done.extend(ready)
        placed.update(ready)
        remaining = [n for n in remaining if n not in placed]
    return done


def find_cycle(marts: Mapping[str, Mart]) -> list[str] | None:
    """A dependency cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(_mart_deps(marts, name)):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(marts):
        if name not in state and (found := visit(name)):
            return found
    return None


def compile_mart(marts: Mapping[str, Mart], name: str | None = None) -> str:
    """The resolved SQL of one mart, or of all of them in build order with a header each."""
    if name is not None:
        if name not in marts:
            raise MartError(f"no mart named {name!r} (marts: {', '.join(sorted(marts))})")
        return marts[name].sql + "\n"
    parts = []
    for mart_name in build_order(marts):
        mart = marts[mart_name]
        header = f"-- {mart.name} ({mart.path}): {mart.materialized}"
        parts.append(f"{header}\n{mart.sql}\n")
    return "\n".join(parts)


def create_statement(database: str, mart: Mart, table: str) -> str:
    """The DDL that materializes ``mart`` as ``database.table``."""
    target = qualified(database, table)
    if mart.materialized == "view":
        return f"CREATE VIEW {target} AS\n{mart.sql}"
    engine = mart.engine or "MergeTree"
    clauses = [f"CREATE TABLE {target} ENGINE = {engine}"]
    if _is_merge_tree(engine):
        if mart.partition_by:
            clauses.append(f"PARTITION BY {mart.partition_by}")
        clauses.append(f"ORDER BY {mart.order_by or 'tuple()'}")
    return "\n".join(clauses) + f" AS\n{mart.sql}"


def build(wh: Warehouse, database: str, mart: Mart) -> int:
    """Build ``mart`` beside the live one and swap it in; returns its row count.

    On failure the half-built ``<name>__new`` is dropped and the previous mart stays live.
    """
    check_name(database, "database")
    staging = f"{mart.name}__new"
    wh.execute(f"DROP TABLE IF EXISTS {qualified(database, staging)}")
    try:
        wh.execute(create_statement(database, mart, staging))
        rows = int(wh.scalar(f"SELECT count() FROM {qualified(database, staging)}"))
    except WarehouseError as exc:
        _drop_quietly(wh, database, staging)
        raise MartError(
            f"{mart.path}: building {mart.name} failed; the previous version is unchanged: {exc}"
        ) from exc
    _swap(wh, database, staging, mart.name)
    log.info("built %s.%s (%s, %d rows)", database, mart.name, mart.materialized, rows)
    return rows


def run_tests(wh: Warehouse, database: str, mart: Mart) -> list[TestResult]:
    """Run the mart's data tests; raise MartTestError if an ``error`` test fails, log ``warn``."""
    check_name(database, "database")
    results = [_run_test(wh, database, mart, test) for test in mart.tests]
    for result in results:
        if not result.passed and result.test.severity == "warn":
            log.warning("%s", result.describe())
    if any(not r.passed and r.test.severity == "error" for r in results):
        raise MartTestError(mart, results)
    return results


def resolve_template(text: str, values: Mapping[str, str], path: Path) -> str:
    """Substitute ``{{ name }}``; unknown names and Jinja blocks are errors naming file:line."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if _JINJA_BLOCK.search(line):
            problems.append(
                f"{path}:{number}: only {{{{ variable }}}} substitutions are supported here"
            )
        for match in _VARIABLE.finditer(line):
            if match.group(1) not in values:
                problems.append(
                    f"{path}:{number}: unknown template variable {match.group(1)!r}"
                    f" (known: {', '.join(sorted(values))})"
                )
    if problems:
        raise MartError(problems)
    return _VARIABLE.sub(lambda m: str(values[m.group(1)]), text)


def _parse_settings(text: str, path: Path) -> _Settings:
    """Read the leading ``--`` comment block (format in the module docstring)."""
    options: dict[str, str] = {}
    tests: list[DataTest] = []
    problems: list[str] = []
    in_tests = False
    for number, comment in _header_lines(text):
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


def _settings(options: Mapping[str, str], tests: tuple[DataTest, ...], path: Path) -> _Settings:
    materialized = options.get("materialized", "table")
    if materialized not in MATERIALIZATIONS:
        raise MartError(f"{path}: materialized must be table or view, got {materialized!r}")
    engine = options.get("engine")
    order_by = options.get("order_by")
    partition_by = options.get("partition_by")
    if materialized == "view":
        if engine or order_by or partition_by:
            raise MartError(f"{path}: a view takes no engine, order_by or partition_by")
        return _Settings("view", tests=tests)
    engine = engine or "MergeTree"
    if not _ENGINE.match(engine):
        raise MartError(f"{path}: invalid engine {engine!r}")
    if not _is_merge_tree(engine) and (order_by or partition_by):
        raise MartError(f"{path}: order_by and partition_by need a MergeTree-family engine")
    for key, expression in (("order_by", order_by), ("partition_by", partition_by)):
        if expression:
            _check_expression(expression, key, path)
    return _Settings("table", engine, order_by, partition_by, tests)


def _load_file(
    path: Path, database: str, values: Mapping[str, str]
) -> tuple[Mart, list[_Reference]]:
    """One file, parsed and resolved; references are checked once all mart names are known."""
    name = path.stem
    try:
        check_name(name, "mart name")
    except ValueError as exc:
        raise MartError(f"{path}: {exc}") from exc
    if name.endswith(_RESERVED_SUFFIXES):
        raise MartError(f"{path}: mart names may not end with {' or '.join(_RESERVED_SUFFIXES)}")
    text = resolve_template(path.read_text(encoding="utf-8"), values, path)
    settings = _parse_settings(text, path)
    query = _parse_select(text, path)
    references = _table_references(query)
    depends_on = {r.name for r in references if r.database == database}
    depends_on.update(t.to for t in settings.tests if t.to is not None and t.to != name)
    mart = Mart(
        name=name,
        path=path,
        sql=_body(text),
        materialized=settings.materialized,
        engine=settings.engine,
        order_by=settings.order_by,
        partition_by=settings.partition_by,
        tests=settings.tests,
        depends_on=frozenset(depends_on),
    )
    return mart, references


@dataclass(frozen=True)
class _Reference:
    database: str
    name: str
    line: int | None


def _parse_select(text: str, path: Path) -> exp.Expression:
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ParseError, TokenError

    try:
        statements = [s for s in sqlglot.parse(text, read="clickhouse") if s is not None]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f"{path}:{first['line']}" if first.get("line") else str(path)
        description = first.get("description") or str(exc)
        raise MartError(f"{where}: syntax error: {description}") from exc
    except TokenError as exc:
        raise MartError(f"{path}: syntax error: {exc}") from exc
    if len(statements) != 1:
        raise MartError(f"{path}: expected one SELECT statement, found {len(statements)}")
    query = statements[0]
    if not isinstance(query, exp.Query):
        raise MartError(f"{path}: expected a SELECT, found {query.key.upper()}")
    return query


def _table_references(query: exp.Expression) -> list[_Reference]:
    """Tables the query reads (CTE names and table functions are not tables)."""
    from sqlglot import exp

    ctes = {cte.alias_or_name for cte in query.find_all(exp.CTE)}
    found = []
    for table in query.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue
        if not table.db and table.name in ctes:
            continue
        found.append(_Reference(table.db, table.name, table.this.meta.get("line")))
    return found


def _unknown_references(
    path: Path,
    references: Iterable[_Reference],
    database: str,
    known_tables: set[str],
    marts: set[str],
) -> Iterator[str]:
    """Problems with what one file reads: unknown, unqualified or foreign tables."""
    for ref in references:
        where = f"{path}:{ref.line}" if ref.line else str(path)
        if not ref.database:
            yield f"{where}: unqualified table {ref.name}: write {{{{ database }}}}.{ref.name}"
        elif ref.database == database:
            if ref.name not in known_tables and ref.name not in marts:
                yield (
                    f"{where}: unknown table {database}.{ref.name}"
                    " (not a source, a snapshot or a mart)"
                )
        elif ref.database != "system" and f"{ref.database}.{ref.name}" not in known_tables:
            yield f"{where}: unknown table {ref.database}.{ref.name} (outside {database})"


def _mart_deps(marts: Mapping[str, Mart], name: str) -> set[str]:
    """The marts ``name`` reads (itself included if it reads itself, which is a cycle)."""
    return {d for d in marts[name].depends_on if d in marts}


def _describe_cycle(marts: Mapping[str, Mart], cycle: list[str]) -> str:
    return " -> ".join(f"{n} ({marts[n].path})" for n in cycle)


def _header_lines(text: str) -> Iterator[tuple[int, str]]:
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


def _body(text: str) -> str:
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


def _check_expression(expression: str, key: str, path: Path) -> None:
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        sqlglot.parse_one(expression, read="clickhouse")
    except SqlglotError as exc:
        raise MartError(f"{path}: {key} is not a valid expression: {expression!r}") from exc


def _is_merge_tree(engine: str) -> bool:
    return engine.split("(", 1)[0].endswith("MergeTree")


def _swap(wh: Warehouse, database: str, staging: str, name: str) -> None:
    """Put ``staging`` live under ``name`` in one statement, then drop the previous version."""
    live = qualified(database, name)
    new = qualified(database, staging)
    if not wh.table_exists(database, name):
        wh.execute(f"RENAME TABLE {new} TO {live}")
        return
    if wh.features.lightweight_exchange and _database_engine(wh, database) in _EXCHANGE_ENGINES:
        wh.execute(f"EXCHANGE TABLES {new} AND {live}")
        wh.execute(f"DROP TABLE {new} SYNC")
        return
    old = qualified(database, f"{name}__old")
    wh.execute(f"DROP TABLE IF EXISTS {old}")
    wh.execute(f"RENAME TABLE {live} TO {old}, {new} TO {live}")
    wh.execute(f"DROP TABLE {old}")


def _database_engine(wh: Warehouse, database: str) -> str:
    return str(
        wh.scalar("SELECT engine FROM system.databases WHERE name = %(d)s", {"d": database}) or ""
    )


def _drop_quietly(wh: Warehouse, database: str, table: str) -> None:
    """Best-effort cleanup after a failed build; the build error is what the user needs."""
    try:
        wh.execute(f"DROP TABLE IF EXISTS {qualified(database, table)}")
    except WarehouseError as exc:
        log.warning("could not drop %s.%s after a failed build: %s", database, table, exc)


def _run_test(wh: Warehouse, database: str, mart: Mart, test: DataTest) -> TestResult:
    table = qualified(database, mart.name)
    column = quote_ident(test.column)
    params: dict[str, Any] = {}
    if test.kind == "not_null":
        failing = f"SELECT * FROM {table} WHERE {column} IS NULL"
        count = int(wh.scalar(f"SELECT count() FROM ({failing}) AS failing"))
        samples = _row_samples(wh, database, mart.name, failing) if count else ()
        return TestResult(mart.name, test, count, samples)
    if test.kind == "unique":
        failing = (
            f"SELECT {column} AS value FROM {table} WHERE {column} IN"
            f" (SELECT {column} FROM {table} WHERE {column} IS NOT NULL"
            f" GROUP BY {column} HAVING count() > 1)"
        )
    elif test.kind == "accepted_values":
        params["values"] = test.values
        failing = (
            f"SELECT {column} AS value FROM {table}"
            f" WHERE {column} IS NOT NULL AND {column} NOT IN %(values)s"
        )
    else:
        parent = qualified(database, str(test.to))
        field = quote_ident(str(test.field))
        failing = (
            f"SELECT {column} AS value FROM {table} WHERE {column} IS NOT NULL"
            f" AND {column} NOT IN (SELECT {field} FROM {parent} WHERE {field} IS NOT NULL)"
        )
    count = int(wh.scalar(f"SELECT count() FROM ({failing}) AS failing", params))
    samples: tuple[str, ...] = ()
    if count:
        rows = wh.query_rows(
            f"SELECT value, count() AS n FROM ({failing}) AS failing"
            f" GROUP BY value ORDER BY n DESC, value LIMIT {SAMPLE_ROWS}",
            params,
        )
        samples = tuple(f"{test.column}={_short(value)} ({_rows(n)})" for value, n in rows)
    return TestResult(mart.name, test, count, samples)


def _row_samples(wh: Warehouse, database: str, table: str, failing: str) -> tuple[str, ...]:
    names = list(wh.columns(database, table))
    rows = wh.query_rows(f"{failing} LIMIT {SAMPLE_ROWS}")
    return tuple(
        "{" + ", ".join(f"{n}: {_short(v)}" for n, v in zip(names, row, strict=False)) + "}"
        for row in rows
    )


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
