"""Change-stream rows, pure: the stored position, events as raw rows, and states read back.

A change batch stages one row per event: the document's columns, typed by exactly the rules
of a full scan (`documents.documents_to_batch`), plus `_op`, `_seq`, `_cluster_time` and
`_wall_time` (`pipeline.core.names`). Rows of a whole re-read (the bootstrap scan, a fallback
after lost history) carry `_op = 'scan'`.

An update's base may be the key's newest raw row, so a row is turned back into a document
(`document_from_row`), and a pre-image is compared with it as the warehouse stores values
(`stored_difference`): nested documents are canonical JSON there, ObjectIds text, timestamps
whole seconds on servers without DateTime64.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.core.names import EXTRA_COLUMN, OP, RAW_META_COLUMNS, SCAN_OP, SEQ
from pipeline.extract.change_events import ChangeEvent, Document, key_of
from pipeline.extract.documents import (
    FieldMapping,
    _as_text,
    _kind,
    canonical_json,
    documents_to_batch,
    flat_name,
)

if TYPE_CHECKING:
    import pyarrow as pa

CLUSTER_TIME, WALL_TIME = "_cluster_time", "_wall_time"


@dataclass(frozen=True)
class Position:
    """Where a change-stream entity's loaded history ends (stored as JSON after each load).

    `token` is resumed after (None: no stream to resume, bootstrap with a full scan); `scan` is
    the batch of the last whole scan, from which on the raw table holds every key's state;
    `replay_until` the cluster time that scan was pinned at; `pin` the cluster time the batch
    read up to; `last_event` the newest event's wall time; `standalone` that the server has
    no change streams (every batch is a full scan).
    """

    token: dict[str, Any] | None = None
    scan: str | None = None
    replay_until: int | None = None
    pin: int | None = None
    last_event: str | None = None
    standalone: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Position | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def after(self, token: dict[str, Any] | None, pin: int, last_event: str | None) -> Position:
        """The position after a batch that read up to `pin` and resumes after `token`.

        `replay_until` stays: an event at or before it is a replay whichever batch reads it
        (a write that got its time before the scan's pin may commit after a later batch).
        """
        return replace(self, token=token, pin=pin, last_event=last_event or self.last_event)


# --- raw rows -> documents -----------------------------------------------------------------

# what each raw column type holds, for reading rows back and comparing pre-images with them
_KINDS = {"String": "string", "Float64": "float", "Int64": "int", "Bool": "bool", "UInt8": "bool"}


def column_kinds(types: Mapping[str, str]) -> dict[str, str]:
    """Raw column -> `string`, `float`, `int`, `bool`, `timestamp` (UInt8 holds bools on
    servers without Bool: MongoDB values never map to it otherwise)."""
    kinds = {}
    for name, ch_type in types.items():
        base = ch_type.removeprefix("Nullable(").removesuffix(")")
        kinds[name] = "timestamp" if base.startswith("DateTime") else _KINDS.get(base, "other")
    return kinds


def _parsed(text: str) -> Any:
    """A nested document or array stored as canonical JSON, back as one; a string that only
    looks like JSON (it would not come back as the same text) stays a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if canonical_json(value) == text else text


def document_from_row(
    row: Mapping[str, Any], kinds: Mapping[str, str], mapping: FieldMapping
) -> Document:
    """A raw row as the document it was typed from, up to what typing keeps: typed again by
    `documents_to_batch` it gives the same row, and an update applies to it as to the
    original (nested values come back from JSON, so their ObjectIds and dates are text)."""
    derived = {flat_name(path) for path in mapping.flatten}
    document: Document = {}
    for name, value in row.items():
        if value is None or name in RAW_META_COLUMNS or name in derived or name == EXTRA_COLUMN:
            continue
        kind = kinds.get(name)
        if kind == "bool" and not isinstance(value, bool):
            value = bool(value)
        elif kind == "timestamp" and isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        elif isinstance(value, str) and value[:1] in ("{", "["):
            value = _parsed(value)
        document[name] = value
    extra = row.get(EXTRA_COLUMN)
    if extra:
        document.update(json.loads(extra))
    return document


def stored_value(value: Any, kind: str | None, whole_seconds: bool) -> Any:
    """A value as a raw column of `kind` holds it (None: as text inside JSON, `_extra`)."""
    if isinstance(value, dict | list) or kind is None or kind == "other":
        return ("json", canonical_json(value))
    if kind == "string":
        return ("text", value if isinstance(value, str) else _as_text(value, _kind(value)))
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return ("number", float(value))
    if kind == "timestamp" and isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return ("time", value.replace(microsecond=0) if whole_seconds else value)
    return (_kind(value), value)


def stored_difference(
    known: Mapping[str, Any],
    pre_image: Mapping[str, Any],
    kinds: Mapping[str, str],
    mapping: FieldMapping,
    whole_seconds: bool,
) -> str | None:
    """The first top-level field where two documents differ as the raw table stores them."""
    keep = None if mapping.fields is None else {"_id", *mapping.fields}
    for name in sorted(set(known) | set(pre_image)):
        kind = kinds.get(name) if keep is None or name in keep else None
        left, right = known.get(name), pre_image.get(name)
        if left is None or right is None:
            if left is not right:
                return name
            continue
        if stored_value(left, kind, whole_seconds) != stored_value(right, kind, whole_seconds):
            return name
    return None


# --- events -> raw rows --------------------------------------------------------------------


def _meta(batch: pa.RecordBatch, columns: Sequence[pa.Array]) -> pa.RecordBatch:
    """Append `_op`, `_seq`, `_cluster_time`, `_wall_time` (given in that order)."""
    for name, values in zip((OP, SEQ, CLUSTER_TIME, WALL_TIME), columns, strict=True):
        batch = batch.append_column(name, values)
    return batch


def events_to_batch(
    events: Sequence[ChangeEvent],
    collection: str,
    fields: list[str],
    mapping: FieldMapping,
    first_seq: int,
) -> pa.RecordBatch:
    """Events as raw rows; a delete's row holds only its `_id`. `fields` keeps first-seen
    column order across the batch, as a scan's does."""
    import pyarrow as pa

    documents = [e.document if e.document is not None else {"_id": e.document_id} for e in events]
    batch = documents_to_batch(documents, collection, fields, mapping)
    return _meta(
        batch,
        [
            pa.array([e.operation for e in events], pa.string()),
            pa.array(range(first_seq, first_seq + len(events)), pa.uint64()),
            pa.array([e.cluster_time for e in events], pa.uint64()),
            pa.array([e.wall_time for e in events], pa.timestamp("us", "UTC")),
        ],
    )


def with_scan_meta(batch: pa.RecordBatch, first_seq: int) -> pa.RecordBatch:
    """A scanned record batch as rows of a whole re-read: `_op = 'scan'`, no change time."""
    import pyarrow as pa

    n = batch.num_rows
    return _meta(
        batch,
        [
            pa.repeat(pa.scalar(SCAN_OP), n),
            pa.array(range(first_seq, first_seq + n), pa.uint64()),
            pa.nulls(n, pa.uint64()),
            pa.nulls(n, pa.timestamp("us", "UTC")),
        ],
    )


class Collector:
    """Events -> lists of staged events: the replayed ones collapse to each key's last.

    Changes made while a scan ran arrive first (cluster-time order) and may be older than what
    the scan read, so only each key's last one is staged, at its own time: a version the scan
    already holds opens nothing, and no state older than the scanned one comes after it.
    Memory: the replayed events (the changes made during one scan), then one chunk at a time.
    """

    def __init__(self) -> None:
        self.replayed: dict[Any, int] = {}
        self.held: list[ChangeEvent] = []

    def add(self, events: Iterable[ChangeEvent]) -> Iterator[list[ChangeEvent]]:
        out: list[ChangeEvent] = []
        for event in events:
            if event.replay:
                self.replayed[key_of(event.document_id)] = len(self.held)
                self.held.append(event)
                continue
            if self.held:
                out.extend(self.flush())
            out.append(event)
        if out:
            yield out

    def flush(self) -> list[ChangeEvent]:
        last = sorted(self.replayed.values())
        kept = [self.held[i] for i in last]
        self.replayed, self.held = {}, []
        return kept
