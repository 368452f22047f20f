"""`invariant_violations`, the pure check of a history, on histories written by hand."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from pipeline.snapshot.diff import Spec, spec_for
from pipeline.snapshot.invariants import invariant_violations
from tests.support.scd2_scenarios import make_entity

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def t(seconds: int | None) -> datetime | None:
    return None if seconds is None else T0 + timedelta(seconds=seconds)


def spec(hard_deletes: str = "ignore", composite: bool = False) -> Spec:
    return spec_for(make_entity("check-cols", hard_deletes, composite))


def versions(*rows: tuple[object, int, int | None], composite: bool = False) -> pa.Table:
    """(key, valid_from, valid_to) rows; a composite key is a (k1, k2) tuple."""
    ts = pa.timestamp("us", "UTC")
    if composite:
        data = {
            "k1": [r[0][0] for r in rows],  # type: ignore[index]
            "k2": [r[0][1] for r in rows],  # type: ignore[index]
        }
    else:
        data = {"id": pa.array([r[0] for r in rows], pa.int64())}
    data["dbt_valid_from"] = pa.array([t(r[1]) for r in rows], ts)
    data["dbt_valid_to"] = pa.array([t(r[2]) for r in rows], ts)
    return pa.table(data)


def test_a_sound_history_has_no_violation() -> None:
    history = versions((1, 0, 5), (1, 5, 9), (1, 9, None), (2, 3, None), (3, 1, 2))
    assert invariant_violations(spec(), history) == []
    assert invariant_violations(spec(), history.slice(0, 0)) == []


def test_rows_in_any_order() -> None:
    history = versions((1, 9, None), (2, 3, None), (1, 0, 5), (1, 5, 9))
    assert invariant_violations(spec(), history) == []


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        (((1, 5, 5),), "item: key '1': dbt_valid_from is not before dbt_valid_to"),
        (((1, 6, 5),), "item: key '1': dbt_valid_from is not before dbt_valid_to"),
        (((1, 0, 6), (1, 5, None)), "item: key '1': validity windows overlap"),
        (((1, 0, None), (1, 5, None)), "item: key '1': more than one current version"),
        (((1, 0, 4), (1, 5, None)), "item: key '1': validity windows leave a gap"),
    ],
)
def test_each_violation_names_the_key(rows: tuple, problem: str) -> None:
    assert problem in invariant_violations(spec(), versions(*rows))


def test_two_current_versions_also_overlap() -> None:
    assert invariant_violations(spec(), versions((7, 0, None), (7, 5, None))) == [
        "item: key '7': validity windows overlap",
        "item: key '7': more than one current version",
    ]


def test_invalidate_allows_the_gap_while_a_key_was_gone() -> None:
    gap = versions((1, 0, 4), (1, 5, None))
    assert invariant_violations(spec("invalidate"), gap) == []
    assert invariant_violations(spec("new_record"), gap) == [
        "item: key '1': validity windows leave a gap"
    ]
    overlap = versions((1, 0, 6), (1, 5, None))
    assert invariant_violations(spec("invalidate"), overlap) == [
        "item: key '1': validity windows overlap"
    ]


def test_composite_keys_are_named_encoded_and_never_confused() -> None:
    """('ab', 'c') and ('a', 'bc') are two keys: each has one current version."""
    history = versions((("ab", "c"), 0, None), (("a", "bc"), 0, None), composite=True)
    assert invariant_violations(spec(composite=True), history) == []
    broken = versions((("ab", "c"), 0, None), (("ab", "c"), 1, None), composite=True)
    assert invariant_violations(spec(composite=True), broken)[-1] == (
        "item: key '2:ab;1:c;': more than one current version"
    )


def test_violations_are_limited_per_kind() -> None:
    rows = [(k, 0, None) for k in range(10)] + [(k, 1, None) for k in range(10)]
    problems = invariant_violations(spec(), versions(*rows), limit=3)
    assert sum("more than one current version" in p for p in problems) == 3
    assert sum("overlap" in p for p in problems) == 3


def test_the_entity_name_is_the_specs() -> None:
    renamed = replace(spec(), entity="people")
    assert invariant_violations(renamed, versions((1, 5, 5))) == [
        "people: key '1': dbt_valid_from is not before dbt_valid_to"
    ]
