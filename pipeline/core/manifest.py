"""The staging manifest: what Load needs to trust a staged batch (the Extract -> Load contract).

Written last, after every part: a batch whose manifest exists is complete. It lists each part
(key, rows, bytes, xxh64 checksum, schema, column names) and the source window it covers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Manifest:
    """Row counts, schemas, checksums and the source window of one staged batch."""

    entity: str
    source: str
    table: str
    batch_id: str
    extracted_at: str  # ISO-8601 UTC: when the read started (valid_from of check snapshots)
    rows: int = 0
    parts: list[dict[str, Any]] = field(default_factory=list)  # key, rows, xxh64, schema, ...
    window: dict[str, str | None] = field(default_factory=dict)  # lower/upper for incremental
    full_scan: bool = True
    keys_rows: int | None = None  # rows of the key list under keys/ (reconciliation), if any

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls(**json.loads(data))

    def columns(self) -> set[str]:
        """Every column any part holds (parts staged before columns were listed hold none)."""
        return {name for part in self.parts for name in part.get("columns", ())}
