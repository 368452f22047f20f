"""An independent SCD2 oracle: dbt snapshot semantics in plain Python, one row at a time.

Written from the documented semantics, not from `pipeline.scd2`: no hashing, no Arrow. Change
detection compares the check columns' values directly (None, '' and 'null' are all different),
keys are plain tuples (so ('ab', 'c') and ('a', 'bc') cannot collide).

- check: a key opens a version when its check columns' values differ from its current version's;
  the new version is valid from the batch time and closes the old one there.
- timestamp: a key opens a version when its `updated_at` is newer than the current version's
  dbt_updated_at; the version is valid from `updated_at`, or from the batch time when
  `updated_at` does not come after the window it would close (so windows never overlap).
- hard_deletes (full extracts only): `ignore` keeps missing keys current; `invalidate` closes
  them at the batch time; `new_record` also opens a copy of the last version with
  dbt_is_deleted = 'True'. A key that comes back opens a new version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import pairwise
from typing import Any

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Version:
    """One row of the snapshot as a dbt user sees it."""

    key: tuple[Any, ...]
    values: tuple[tuple[str, Any], ...]  # every source column, sorted by name
    updated_at: datetime  # dbt_updated_at
    valid_from: datetime
    valid_to: datetime | None
    is_deleted: str | None  # 'True' / 'False' with hard_deletes = new_record, else None

    @property
    def row(self) -> dict[str, Any]:
        return dict(self.values)


@dataclass
class Oracle:
    unique_key: tuple[str, ...]
    strategy: str  # "check" | "timestamp"
    check_cols: tuple[str, ...] | None  # None = every source column
    updated_at: str | None = None
    hard_deletes: str = "ignore"
    versions: list[Version] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)  # what happened, for statistics

    def _key(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[k] for k in self.unique_key)

    def _checked(self, row: Row) -> tuple[tuple[str, Any], ...]:
        cols = self.check_cols if self.check_cols is not None else tuple(row)
        return tuple(sorted((c, row.get(c)) for c in cols))

    def _current(self) -> dict[tuple[Any, ...], int]:
        """Index of each key's open version (valid_to is None)."""
        return {v.key: i for i, v in enumerate(self.versions) if v.valid_to is None}

    def _last_end(self, key: tuple[Any, ...]) -> datetime | None:
        ends = [v.valid_to for v in self.versions if v.key == key and v.valid_to is not None]
        return max(ends) if ends else None

    def _open(self, row: Row, valid_from: datetime, updated: datetime) -> None:
        flag = "False" if self.hard_deletes == "new_record" else None
        values = tuple(sorted(row.items()))
        self.versions.append(Version(self._key(row), values, updated, valid_from, None, flag))

    def _close(self, index: int, at: datetime) -> None:
        self.versions[index] = replace(self.versions[index], valid_to=at)

    def apply(self, rows: Iterable[Row], batch_ts: datetime, full_scan: bool = True) -> None:
        """Apply one extract of the source taken at `batch_ts`."""
        rows = list(rows)
        current = self._current()
        seen: set[tuple[Any, ...]] = set()
        for row in rows:
            key = self._key(row)
            if key in seen:
                raise ValueError(f"key {key!r} twice in one batch")
            seen.add(key)
            index = current.get(key)
            cur = self.versions[index] if index is not None else None
            deleted = cur is not None and cur.is_deleted == "True"
            if self.strategy == "check":
                if cur is not None and not deleted and self._checked(cur.row) == self._checked(row):
                    self.events["unchanged" if cur.row == dict(row) else "unchecked change"] += 1
                    continue
                valid_from = updated = batch_ts
            else:
                assert self.updated_at is not None
                ts = row[self.updated_at]
                if cur is not None and not deleted and not ts > cur.updated_at:
                    self.events["not newer: ignored"] += 1
                    continue
                # the window this version follows: the current one's start, or the gap after
                # the last closed window (invalidate); a first version follows nothing
                after = cur.valid_from if cur is not None else self._last_end(key)
                valid_from = ts if after is None or ts > after else batch_ts
                updated = ts
                if valid_from != ts:
                    self.events["valid from batch time"] += 1
            if index is not None:
                self._close(index, valid_from)
            self.events[_kind(cur, deleted, self._last_end(key))] += 1
            self._open(row, valid_from, updated)
        if self.hard_deletes == "ignore" or not full_scan:
            return
        for key, index in current.items():
            cur = self.versions[index]
            if key in seen or cur.is_deleted == "True":
                continue
            self._close(index, batch_ts)
            self.events["delete"] += 1
            if self.hard_deletes == "new_record":
                self.versions.append(
                    replace(
                        cur,
                        updated_at=batch_ts,
                        valid_from=batch_ts,
                        valid_to=None,
                        is_deleted="True",
                    )
                )

    def history(self) -> list[Version]:
        return sorted(self.versions, key=_order)


def _kind(cur: Version | None, deleted: bool, last_end: datetime | None) -> str:
    if deleted or (cur is None and last_end is not None):
        return "revival"
    return "insert" if cur is None else "change"


def _order(v: Version) -> tuple[Any, ...]:
    return (repr(v.key), v.valid_from)


def invariant_problems(versions: Sequence[Version], gaps_allowed: bool) -> list[str]:
    """SCD2 invariants over a history, checked independently of the engine."""
    problems: list[str] = []
    by_key: dict[tuple[Any, ...], list[Version]] = {}
    for v in versions:
        by_key.setdefault(v.key, []).append(v)
    for key, vs in by_key.items():
        vs.sort(key=lambda v: v.valid_from)
        if sum(v.valid_to is None for v in vs) > 1:
            problems.append(f"{key!r}: more than one current version")
        for v in vs:
            if v.valid_to is not None and not v.valid_from < v.valid_to:
                problems.append(f"{key!r}: empty window at {v.valid_from}")
        for a, b in pairwise(vs):
            if a.valid_to is None or a.valid_to > b.valid_from:
                problems.append(f"{key!r}: windows overlap at {b.valid_from}")
            elif a.valid_to < b.valid_from and not gaps_allowed:
                problems.append(f"{key!r}: gap before {b.valid_from}")
    return problems
