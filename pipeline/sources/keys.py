"""Key reconciliation for PostgreSQL: the full list of primary keys, to see hard deletes.

An `updated_at` query never returns a deleted row. With `reconcile = true` each extract also
reads every key of the table (keys only: cheap next to the rows), and the snapshot stage retires
the live keys that are no longer there, as `hard_deletes` says. Keys go through the same COPY
reader as the rows, so they are typed (and hashed) exactly like them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


def read_keys(
    dsn: str, object_name: str, key: Sequence[str], batch_rows: int = 200_000
) -> Iterator[pa.RecordBatch]:
    """Every key of the table as record batches typed like the extracted rows."""
    from pipeline.sources.postgres import read

    _, batches = read(dsn, object_name, None, None, timedelta(0), batch_rows, columns=list(key))
    return batches
