"""The SCD2 diff of a change batch: each key's changes, in commit order, against its history.

A batch read from a database log (a PostgreSQL slot, a MongoDB change stream) holds every
committed change, several per key, each with its operation and the time it happened. History
keeps them: each change of a key opens a version at its time and closes the one before, so
intermediate states become versions. Pure function of Arrow tables, like `diff.diff`; `merge`
applies the result in the warehouse.

The rules, per key, change after change (`state` is the key's live version, if any):
- an insert, update, replace or read (a first-load row) whose change hash equals the state's
  opens nothing (an UPDATE that changes nothing is not history);
- otherwise it opens a version at its time and closes the state at that time; a change at or
  before the state's start (one transaction's several changes, or one second on a warehouse
  that keeps whole seconds) replaces the state in place instead: the last one wins;
- a delete closes the state at its time (`hard_deletes = invalidate`), also opening a deletion
  version (`new_record`), or is not history at all (`ignore`, dbt's default).
A change's time is its commit time; a first-load row (no commit time) starts at the batch time
(check strategy) or its `updated_at` (timestamp strategy); with the timestamp strategy a change
whose `updated_at` advanced starts at its `updated_at`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.core.hashing import encode_key
from pipeline.snapshot.diff import TS, Spec

if TYPE_CHECKING:
    import pyarrow as pa

DELETE = "delete"
OPS = ("insert", "update", "replace", "read", DELETE)


@dataclass
class _State:
    """A key's live version while its changes are walked."""

    valid_from: int  # microseconds since the epoch
    hash: int
    updated_at: int | None
    deleted: bool  # a deletion version (hard_deletes = new_record)
    seq: int | None  # the change that opened it in this batch; None: a stored version
    opened: int | None = None  # index in `_Out.opened` of an in-batch version


@dataclass
class _Out:
    """What the walk found, as columns."""

    opened: list[tuple[Any, ...] | None] = field(default_factory=list)  # None: voided
    closed: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(frozen=True)
class ChangeDiff:
    """Versions to write for a change batch; every table carries the unique_key columns.

    `opened`: versions the batch opens, each copied from the raw change `_seq` (a deletion
    version from `_from_seq`, or from the stored version when that is null); `dbt_valid_to` is
    set when a later change of the batch already closed it. `_replaces` marks a stored version
    rewritten in place: `_keep_scd_id` and `_keep_opened_by` are the id and opener it keeps.
    `closed`: stored versions the batch closes at `_new_valid_to`.
    """

    opened: pa.Table
    closed: pa.Table

    @property
    def empty(self) -> bool:
        return not (self.opened.num_rows or self.closed.num_rows)


def _micros(column: pa.ChunkedArray | pa.Array | None, rows: int, step: int) -> list[int | None]:
    """Instants as microseconds since the epoch, cut to the warehouse's precision (`step`)."""
    import pyarrow as pa

    if column is None:
        return [None] * rows
    values: list[int | None] = column.cast(pa.timestamp(*TS)).cast(pa.int64()).to_pylist()
    if step == 1:
        return values
    return [None if v is None else v - v % step for v in values]


def _keys(table: pa.Table, spec: Spec) -> list[str]:
    import pyarrow as pa

    encoded = encode_key(table, spec.unique_key)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    keys: list[str] = encoded.to_pylist()
    return keys


def _start(
    spec: Spec, time: int | None, updated: int | None, state: _State | None, batch: int
) -> int:
    """When a non-delete change's version starts (see the module docstring)."""
    if spec.strategy == "timestamp":
        if time is None:
            return updated if updated is not None else batch
        before = state.updated_at if state is not None else None
        if updated is not None and (before is None or updated > before):
            return updated
    return time if time is not None else batch


class _Walk:
    """One pass over the changes of every key, keeping each key's live state."""

    def __init__(
        self, spec: Spec, current: pa.Table, ended: pa.Table | None, batch: int, step: int
    ) -> None:
        self.spec, self.batch, self.step = spec, batch, step
        self.out = _Out()
        self.states: dict[str, _State] = {}
        self.stored: dict[str, int] = {}  # key -> row of `current`
        # where each key's last closed window ended: a key that comes back starts no earlier
        self.floors: dict[str, int] = {}
        if ended is not None and ended.num_rows:
            last = _micros(ended.column("last_valid_to"), ended.num_rows, step)
            for key, end in zip(_keys(ended, spec), last, strict=True):
                if end is not None:
                    self.floors[key] = end
        keys = _keys(current, spec)
        starts = _micros(current.column("dbt_valid_from"), current.num_rows, step)
        updates = _micros(current.column("dbt_updated_at"), current.num_rows, step)
        hashes = current.column("_hash").to_pylist()
        deleted = (
            [v == "True" for v in current.column("dbt_is_deleted").to_pylist()]
            if "dbt_is_deleted" in current.column_names
            else [False] * current.num_rows
        )
        for row, key in enumerate(keys):
            start = starts[row]
            assert start is not None
            self.states[key] = _State(start, hashes[row], updates[row], deleted[row], None)
            self.stored[key] = row

    def _born_here(self, state: _State) -> bool:
        """Whether the state is a version this batch opened (not a stored one rewritten)."""
        if state.opened is None:
            return False
        opened = self.out.opened[state.opened]
        return opened is not None and opened[8] is None

    def close(self, key: str, state: _State, at: int) -> None:
        if state.opened is not None:  # opened by this batch: it ends where the next starts
            opened = self.out.opened[state.opened]
            assert opened is not None
            row = list(opened)
            row[3] = at
            self.out.opened[state.opened] = tuple(row)
        else:
            self.out.closed.append((key, self.stored[key], at))

    def open(
        self, key: str, seq: int, start: int, updated: int, hash_: int, tombstone: bool
    ) -> None:
        """Open a version (or rewrite the live one in place when it starts no earlier)."""
        state = self.states.get(key)
        replaces = None
        from_seq = None
        if tombstone:
            from_seq = state.seq if state is not None else None
        if state is not None and start <= state.valid_from:
            start = state.valid_from  # the last change at one instant wins
            if state.opened is not None:
                # a stored version this batch already rewrites stays rewritten (not born here)
                before = self.out.opened[state.opened]
                kept = before[8] if before is not None else None
                self.out.opened[state.opened] = (
                    key,
                    seq,
                    start,
                    None,
                    updated,
                    hash_,
                    tombstone,
                    from_seq,
                    kept,
                )
                self.states[key] = _State(start, hash_, updated, tombstone, seq, state.opened)
                return
            replaces = self.stored[key]
        elif state is not None:
            self.close(key, state, start)
        self.out.opened.append(
            (key, seq, start, None, updated, hash_, tombstone, from_seq, replaces)
        )
        self.states[key] = _State(start, hash_, updated, tombstone, seq, len(self.out.opened) - 1)

    def change(
        self, key: str, seq: int, op: str, hash_: int, time: int | None, updated: int | None
    ) -> None:
        state = self.states.get(key)
        live = state is not None and not state.deleted
        if op == DELETE:
            if not live or self.spec.hard_deletes == "ignore":
                return
            assert state is not None
            at = time if time is not None else self.batch
            if self.spec.hard_deletes == "new_record":
                self.open(key, seq, at, at, state.hash, tombstone=True)
            elif state.opened is not None and self._born_here(state) and at <= state.valid_from:
                # opened and deleted at one instant (one transaction): it never was history
                self.out.opened[state.opened] = None
                self.floors[key] = state.valid_from
                del self.states[key]
            else:
                end = max(at, state.valid_from + self.step)  # a window never ends as it starts
                self.close(key, state, end)
                self.floors[key] = end
                del self.states[key]
            return
        if live and state is not None and state.hash == hash_:
            return
        start = _start(self.spec, time, updated, state if live else None, self.batch)
        start = max(start, self.floors.get(key, start))
        self.open(key, seq, start, updated if updated is not None else start, hash_, False)


def diff_changes(
    spec: Spec,
    current: pa.Table,
    changes: pa.Table,
    batch_ts: datetime,
    collapse: bool = False,
    ended: pa.Table | None = None,
    step_us: int = 1,
) -> ChangeDiff:
    """Versions to open and close so that history holds every change of `changes`.

    `changes`: the unique_key columns, `_seq` (the batch's commit order), `_op`, `_hash` (the
    change hash of the row), `_time` (commit time; null for a first-load row) and, for the
    timestamp strategy, the `updated_at` column. `current`: the live (or deletion) version of
    each key the batch touches: unique_key columns, dbt_scd_id, _hash, dbt_valid_from,
    dbt_updated_at, _opened_by and dbt_is_deleted with `new_record`. `collapse` keeps only each
    key's last change of the batch. `ended` (key, `last_valid_to`) tells where the closed
    history of a key without a live version ended. `step_us` is the warehouse's precision
    (1 s without DateTime64): changes of a key within one step collapse to the last.
    """
    import pyarrow as pa

    ts = pa.timestamp(*TS)
    batch_us = pa.scalar(batch_ts, ts).cast(pa.int64()).as_py()
    batch = batch_us - batch_us % step_us
    order = changes.sort_by([("_seq", "ascending")])
    keys = _keys(order, spec)
    seqs = order.column("_seq").to_pylist()
    ops = order.column("_op").to_pylist()
    hashes = order.column("_hash").to_pylist()
    times = _micros(order.column("_time"), order.num_rows, step_us)
    updated_at = spec.updated_at if spec.strategy == "timestamp" else None
    updates = _micros(order.column(updated_at) if updated_at else None, order.num_rows, step_us)
    rows: range | list[int] = range(order.num_rows)
    if collapse:
        last = {key: row for row, key in enumerate(keys)}
        rows = sorted(last.values())
    walk = _Walk(spec, current, ended, batch, step_us)
    for row in rows:
        walk.change(keys[row], seqs[row], ops[row], hashes[row], times[row], updates[row])
    return _tables(spec, current, order, keys, walk.out)


def _tables(
    spec: Spec, current: pa.Table, order: pa.Table, keys: list[str], out: _Out
) -> ChangeDiff:
    """The walk's rows as Arrow tables with the real key columns (not their encodings)."""
    import pyarrow as pa

    ts = pa.timestamp(*TS)
    key_cols = list(spec.unique_key)
    opened_rows = [o for o in out.opened if o is not None]
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    change_rows = pa.array([first[o[0]] for o in opened_rows], pa.int64())
    opened = order.select(key_cols).take(change_rows)
    columns = {
        "_seq": pa.array([o[1] for o in opened_rows], pa.uint64()),
        "dbt_valid_from": pa.array([o[2] for o in opened_rows], pa.int64()).cast(ts),
        "dbt_valid_to": pa.array([o[3] for o in opened_rows], pa.int64()).cast(ts),
        "dbt_updated_at": pa.array([o[4] for o in opened_rows], pa.int64()).cast(ts),
        "_hash": pa.array([o[5] for o in opened_rows], pa.uint64()),
        "_tombstone": pa.array([o[6] for o in opened_rows], pa.bool_()),
        "_from_seq": pa.array([o[7] for o in opened_rows], pa.uint64()),
        "_replaces": pa.array([o[8] is not None for o in opened_rows], pa.bool_()),
    }
    for name, values in columns.items():
        opened = opened.append_column(name, values)
    stored_rows = pa.array([c[1] for c in out.closed], pa.int64())
    closed = current.select([*key_cols, "dbt_scd_id"]).take(stored_rows)
    closed = closed.append_column(
        "_new_valid_to", pa.array([c[2] for c in out.closed], pa.int64()).cast(ts)
    )
    ids: list[str | None] = [None] * opened.num_rows
    openers: list[str | None] = [None] * opened.num_rows
    scd_ids = current.column("dbt_scd_id").to_pylist()
    opened_by = current.column("_opened_by").to_pylist()
    for i, o in enumerate(opened_rows):
        if o[8] is not None:  # a stored version rewritten in place keeps its id and opener
            ids[i], openers[i] = scd_ids[o[8]], opened_by[o[8]]
    opened = opened.append_column("_keep_scd_id", pa.array(ids, pa.string()))
    opened = opened.append_column("_keep_opened_by", pa.array(openers, pa.string()))
    return ChangeDiff(opened, closed)
