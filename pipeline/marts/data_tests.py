"""Data tests, as dbt's generic tests: run after each build, failing or warning by severity.

``unique``, ``not_null``, ``accepted_values`` and ``relationships``; NULLs pass every test but
``not_null``, as in dbt. A failure says how many rows fail, with a few of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import MartError
from pipeline.core.names import check_name
from pipeline.marts.header import DataTest
from pipeline.marts.project import Mart
from pipeline.warehouse import Warehouse, qualified, quote_ident

log = logging.getLogger("pipeline.marts")

SAMPLE_ROWS = 5


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


class MartTestError(MartError):
    """An ``error``-severity data test failed after a build; ``results`` holds every test run."""

    def __init__(self, mart: Mart, results: list[TestResult]) -> None:
        self.results = results
        failing = [r for r in results if not r.passed and r.test.severity == "error"]
        super().__init__([f"{mart.path}: {r.describe()}" for r in failing])


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


def _run_test(wh: Warehouse, database: str, mart: Mart, test: DataTest) -> TestResult:
    table = qualified(database, mart.name)
    column = quote_ident(test.column)
    params: dict[str, Any] = {}
    if test.kind == "not_null":
        failing = f"SELECT * FROM {table} WHERE {column} IS NULL"
        count = int(wh.scalar(f"SELECT count() FROM ({failing}) AS failing"))
        shown = _row_samples(wh, database, mart.name, failing) if count else ()
        return TestResult(mart.name, test, count, shown)
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
