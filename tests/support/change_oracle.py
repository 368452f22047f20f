"""An independent SCD2 oracle for change batches: plain Python, one change at a time.

It replays each key's changes in commit order into a list of versions, by the rules the README
states for log-based capture (each change that alters the row opens a version at its time,
closing the one before; an UPDATE that changes nothing opens nothing; changes at one instant
collapse to the last; deletes as `hard_deletes` says). Nothing is shared with the pipeline's
implementation but the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Row = dict[str, Any]


@dataclass
class Version:
    key: Any
    values: Row
    valid_from: datetime
    valid_to: datetime | None = None
    deleted: bool = False


@dataclass
class ChangeOracle:
    """History of every key after a sequence of change batches."""

    columns: tuple[str, ...]  # the checked columns
    hard_deletes: str = "ignore"
    collapse: bool = False
    versions: dict[Any, list[Version]] = field(default_factory=dict)

    def live(self, key: Any) -> Version | None:
        history = self.versions.get(key, [])
        if history and history[-1].valid_to is None:
            return history[-1]
        return None

    def apply(self, changes: list[Row], batch_time: datetime) -> None:
        """`changes` in commit order: dicts with `id`, `op`, `time` (None: a first-load row)
        and the column values."""
        if self.collapse:
            last = {c["id"]: i for i, c in enumerate(changes)}
            changes = [c for i, c in enumerate(changes) if last[c["id"]] == i]
        for change in changes:
            self._change(change, batch_time)

    def _change(self, change: Row, batch_time: datetime) -> None:
        key, at = change["id"], change["time"] or batch_time
        state = self.live(key)
        if change["op"] == "delete":
            if state is None or state.deleted or self.hard_deletes == "ignore":
                return
            if self.hard_deletes == "new_record":
                self._open(key, dict(state.values), at, deleted=True)
            elif at <= state.valid_from:  # born and gone at one instant: never was history
                self.versions[key].pop()
            else:
                state.valid_to = at
            return
        values = {c: change.get(c) for c in self.columns}
        if state is not None and not state.deleted and state.values == values:
            return
        self._open(key, values, at, deleted=False)

    def _open(self, key: Any, values: Row, at: datetime, deleted: bool) -> None:
        history = self.versions.setdefault(key, [])
        state = self.live(key)
        if state is not None and at <= state.valid_from:
            state.values, state.deleted = values, deleted  # one instant: the last one wins
            return
        if state is not None:
            state.valid_to = at
        history.append(Version(key, values, at, None, deleted))

    def history(self) -> list[tuple[Any, ...]]:
        """(key, checked values..., valid_from, valid_to, deleted) in (key, valid_from) order."""
        out = []
        for key in sorted(self.versions):
            for v in self.versions[key]:
                values = tuple(v.values.get(c) for c in self.columns)
                out.append((key, *values, v.valid_from, v.valid_to, v.deleted))
        return out
