"""Key reconciliation for PostgreSQL: the full list of primary keys, to see hard deletes.

An `updated_at` query never returns a deleted row. With `reconcile = true` each extract also
reads every key of the table (keys only: cheap next to the rows), and the snapshot stage retires
the live keys that are no longer there, as `hard_deletes` says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


def read_keys(
    dsn: str, object_name: str, key: Sequence[str], batch_rows: int = 200_000
) -> Iterator[pa.RecordBatch]:
    """Every key of the table as record batches typed like the extracted rows."""
    import pyarrow as pa
    from psycopg2 import sql

    from pipeline.sources.postgres import (
        PostgresSourceError,
        arrow_type,
        connect,
        split_table,
        table_columns,
    )

    conn = connect(dsn)
    try:
        columns = {c.name: c for c in table_columns(conn, object_name)}
        missing = [k for k in key if k not in columns]
        if missing:
            raise PostgresSourceError(
                f"PostgreSQL table {object_name}: unique_key column(s) {missing} not found"
            )
        schema = pa.schema([pa.field(k, arrow_type(columns[k])) for k in key])
        schema_name, table = split_table(object_name)
        query = sql.SQL("SELECT {} FROM {}.{}").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key),
            sql.Identifier(schema_name),
            sql.Identifier(table),
        )
        with conn.cursor(name="cdc_keys") as cur:
            cur.itersize = batch_rows
            cur.execute(query)
            while rows := cur.fetchmany(batch_rows):
                arrays = [
                    pa.array([row[i] for row in rows], type=field.type)
                    for i, field in enumerate(schema)
                ]
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)
    finally:
        conn.close()
