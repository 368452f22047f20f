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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import MartError
from pipeline.core.names import check_name
from pipeline.marts.header import DataTest, body, parse_header

if TYPE_CHECKING:
    from sqlglot import exp

_RESERVED_SUFFIXES = ("__new", "__old")
_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_JINJA_BLOCK = re.compile(r"\{%|\{#|\{\{(?!\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\})")


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
    settings = parse_header(text, path)
    query = _parse_select(text, path)
    references = _table_references(query)
    depends_on = {r.name for r in references if r.database == database}
    depends_on.update(t.to for t in settings.tests if t.to is not None and t.to != name)
    mart = Mart(
        name=name,
        path=path,
        sql=body(text),
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


def _parse_select(text: str, path: Path) -> exp.Query:
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


def _table_references(query: exp.Query) -> list[_Reference]:
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
