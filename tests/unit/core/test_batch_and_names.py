"""`pipeline.core.batch` (ids are UTC times) and `pipeline.core.names` (every shared name)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.core import names
from pipeline.core.batch import FORMAT, batch_id_problem, batch_time, new_batch_id
from pipeline.core.errors import BatchIdError, ConfigError, PipelineError

# --- batch ids --------------------------------------------------------------------------------


def test_new_batch_id_is_the_utc_time_now() -> None:
    before = datetime.now(UTC)
    batch = new_batch_id()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{8}T\d{12}Z", batch), batch
    assert before - timedelta(microseconds=1) <= batch_time(batch) <= after
    assert batch_id_problem(batch) is None


@pytest.mark.parametrize(
    ("batch", "time"),
    [
        ("20261126T031500123456Z", datetime(2026, 11, 26, 3, 15, 0, 123456, tzinfo=UTC)),
        ("20261126T031500Z", datetime(2026, 11, 26, 3, 15, tzinfo=UTC)),
        ("20261126T031500123Z", datetime(2026, 11, 26, 3, 15, 0, 123000, tzinfo=UTC)),
        ("20261126T031500", datetime(2026, 11, 26, 3, 15, tzinfo=UTC)),
        ("20200101T000000000000Z", datetime(2020, 1, 1, tzinfo=UTC)),
    ],
)
def test_batch_time_reads_the_id(batch: str, time: datetime) -> None:
    assert batch_time(batch) == time
    assert batch_id_problem(batch) is None


def test_batch_ids_round_trip_and_sort_as_their_times() -> None:
    times = [
        datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=s, microseconds=m)
        for s, m in ((0, 0), (0, 1), (0, 999999), (1, 0), (86400 * 400, 5))
    ]
    ids = [t.strftime(FORMAT) for t in times]
    assert [batch_time(b) for b in ids] == times
    assert sorted(reversed(ids)) == ids


@pytest.mark.parametrize("batch", ["", "latest", "2026-11-26", "20261326T000000Z", "2026112T0Z"])
def test_bad_batch_ids_are_refused_by_name(batch: str) -> None:
    with pytest.raises(BatchIdError) as err:
        batch_time(batch)
    assert str(err.value) == f"batch id {batch!r} is not YYYYMMDDTHHMMSS[ffffff]Z"
    assert err.value.batch == batch and isinstance(err.value, ValueError | PipelineError)
    assert err.value.retriable is False
    assert batch_id_problem(batch) == str(err.value)


# --- names ------------------------------------------------------------------------------------


def test_table_and_staging_names() -> None:
    assert names.raw_table("users") == "raw_users"
    assert names.keys_table("users") == "raw_users__keys"
    assert names.snapshot_view("users") == "users_snapshot"
    assert names.snapshot_storage("users") == "users_snapshot__versions"
    assert names.mart_marker("dim_users") == "mart:dim_users"
    assert names.batch_prefix("mongo", "users", "20240101T000000Z") == (
        "mongo/users/batch=20240101T000000Z/"
    )
    assert names.range_subdir(7) == "range=007/"
    assert names.MANIFEST == "_manifest.json"


@pytest.mark.parametrize("name", ["a", "_x", "users_2", "A_b_C", "x" * 300])
def test_check_name_accepts_plain_identifiers(name: str) -> None:
    assert names.check_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "ä", "a.b", "a`b", "a;DROP", "a\n"])
def test_check_name_refuses_anything_else(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        names.check_name(name, "entity name in [entity.x]")
    assert str(err.value) == (
        f"invalid entity name in [entity.x] {name!r}: use letters, digits and _ only"
    )


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "an empty name"),
        ("a\x00b", "a NUL character"),
        *[
            (meta, "a name the raw table reserves for its own column")
            for meta in (*names.RAW_META_COLUMNS, names.EXTRA_COLUMN)
        ],
        ("x" * 201, "a name too long for a column file (201 > 200 bytes)"),
        ("é" * 34, "a name too long for a column file (204 > 200 bytes)"),  # 2 bytes, %XX each
        ("-" * 67, "a name too long for a column file (201 > 200 bytes)"),
    ],
)
def test_column_name_problem_names_why(name: str, problem: str) -> None:
    assert names.column_name_problem(name) == problem


@pytest.mark.parametrize(
    "name",
    ["x" * 200, "é" * 33, "-" * 66, "weird `name`", "has space", "dots.in.it", "_batch", "ünï"],
)
def test_column_names_that_fit(name: str) -> None:
    assert names.column_name_problem(name) is None


def test_reserved_columns_do_not_overlap_the_snapshot_meta_columns() -> None:
    assert set(names.RAW_META_COLUMNS).isdisjoint(names.SNAPSHOT_META_COLUMNS)
    assert len(set(names.RAW_META_COLUMNS)) == len(names.RAW_META_COLUMNS)
    assert names.EXTRA_COLUMN not in names.RAW_META_COLUMNS
