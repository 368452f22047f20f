"""The previous state of changed keys, read from the entity's raw table.

The raw table of a change-stream entity holds every state loaded since the last full scan
(that scan's rows included), one row per event, ordered by batch and `_seq`; a key's newest
row is its state, a delete row says it is gone. Only keys whose first event in a batch is not
an insert are asked for, in one query per chunk of events, so a batch costs its changes and
not the collection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import Entity
from pipeline.core.names import OP, RAW_META_COLUMNS, SEQ
from pipeline.extract.change_events import Document, key_of
from pipeline.extract.change_rows import (
    column_kinds,
    document_from_row,
    stored_difference,
    stored_value,
)
from pipeline.extract.documents import FieldMapping
from pipeline.warehouse import Warehouse, qualified, quote_ident

# ids per lookup query: each query reads the raw table's `_id` column whole, so as few as the
# statement's size allows (ClickHouse parses at most 256 KiB of query text by default)
LOOKUP_BYTES = 200_000


class RawStates:
    """Looks keys up in `raw_<entity>` from the batch of the last full scan on."""

    def __init__(
        self, wh: Warehouse, database: str, entity: Entity, scan_batch: str, mapping: FieldMapping
    ) -> None:
        self.wh, self.database, self.entity = wh, database, entity
        self.scan_batch = scan_batch
        self.mapping = mapping
        self.whole_seconds = not wh.features.datetime64
        self._kinds: dict[str, str] | None = None

    @property
    def kinds(self) -> dict[str, str]:
        """What each source column of the raw table holds (read once, when first needed: a
        batch without updates, replaces or deletes never asks)."""
        if self._kinds is None:
            types = self.wh.columns(self.database, self.entity.raw_table)
            self._kinds = column_kinds(
                {c: t for c, t in types.items() if c not in RAW_META_COLUMNS}
            )
        return self._kinds

    def lookup(self, ids: Sequence[Any]) -> list[tuple[Any, Document | None]]:
        """Each id with its newest loaded state (None: never loaded since the scan, or deleted)."""
        found: dict[Any, Document | None] = {}
        if self.kinds:
            kind = self.kinds.get("_id")
            group: dict[Any, Any] = {}
            size = 0
            for document_id in ids:
                stored = stored_value(document_id, kind, self.whole_seconds)[1]
                group[stored] = document_id
                size += len(str(stored)) + 4
                if size >= LOOKUP_BYTES:
                    found.update(self._query(group))
                    group, size = {}, 0
            if group:
                found.update(self._query(group))
        return [(i, found.get(key_of(i))) for i in ids]

    def _query(self, stored: dict[Any, Any]) -> dict[Any, Document | None]:
        """The newest raw row of each id (stored value -> id). A row older than the last full
        scan is of a key that scan did not find: absent, whatever that row says."""
        columns = ", ".join(quote_ident(c) for c in self.kinds)
        table = self.wh.query_arrow(
            f"SELECT {columns}, {OP}, _batch_id"
            f" FROM {qualified(self.database, self.entity.raw_table)}"
            " PREWHERE `_id` IN %(ids)s"  # the other columns are read for those rows only
            f" ORDER BY _batch_id DESC, {SEQ} DESC LIMIT 1 BY `_id`",
            {"ids": tuple(stored)},
        )
        states: dict[Any, Document | None] = {}
        for row in table.to_pylist():
            document_id = stored.get(row["_id"])
            if document_id is None:
                continue
            if row[OP] == "delete" or row["_batch_id"] < self.scan_batch:
                states[key_of(document_id)] = None
                continue
            document = document_from_row(row, self.kinds, self.mapping)
            document["_id"] = document_id
            states[key_of(document_id)] = document
        return states

    def difference(self, known: Mapping[str, Any], pre_image: Mapping[str, Any]) -> str | None:
        """The first field where a state and a pre-image differ as this raw table stores them."""
        return stored_difference(known, pre_image, self.kinds, self.mapping, self.whole_seconds)
