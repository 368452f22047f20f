"""Schema drift: a new source column becomes a raw column; a column whose type must change is
widened by the documented rule (int + float -> float64, anything else -> string). No value is
ever dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core.errors import LoadError
from pipeline.core.hashing import canonical_text
from pipeline.warehouse import Warehouse, arrow_to_clickhouse, quote_ident
from pipeline.warehouse.ddl import alter_table
from pipeline.warehouse.types import clickhouse_to_arrow

if TYPE_CHECKING:
    import pyarrow as pa


def widen(raw: pa.DataType, incoming: pa.DataType) -> pa.DataType:
    """The type both fit in: ints widen to float64 when the other side is float, else string."""
    import pyarrow as pa

    if raw == incoming or pa.types.is_null(incoming):
        return raw
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(raw) for f in numeric) and any(f(incoming) for f in numeric):
        if pa.types.is_integer(raw) and pa.types.is_integer(incoming):
            return pa.int64()
        return pa.float64()
    return pa.string()


def align(wh: Warehouse, database: str, entity: Entity, part: pa.Table) -> pa.Table:
    """Evolve the raw table for this part (new columns, widened types) and cast the part to it."""
    import pyarrow as pa

    table = entity.raw_table
    existing = wh.columns(database, table)
    arrays, names, added = [], [], []
    for field in part.schema:
        column = part.column(field.name)
        if pa.types.is_null(field.type) and field.name in existing:
            continue
        if field.name not in existing:
            ch = arrow_to_clickhouse(field.type, wh.features)
            added.append(f"ADD COLUMN {quote_ident(field.name)} {ch}")
        elif arrow_to_clickhouse(field.type, wh.features) != existing[field.name]:
            raw_type = clickhouse_to_arrow(existing[field.name])
            target = widen(raw_type, field.type)
            if target != raw_type:
                ch = arrow_to_clickhouse(target, wh.features)
                alter_table(wh, database, table, [f"MODIFY COLUMN {quote_ident(field.name)} {ch}"])
                wh.wait_mutations(database, table)
            if target != field.type:
                column = _cast(column, target, entity, field.name)
        arrays.append(column)
        names.append(field.name)
    alter_table(wh, database, table, added)  # one statement: on a cluster, one round of DDL
    return pa.table(arrays, names=names)


def _cast(
    column: pa.ChunkedArray, target: pa.DataType, entity: Entity, name: str
) -> pa.ChunkedArray:
    import pyarrow as pa

    try:
        return canonical_text(column) if pa.types.is_string(target) else column.cast(target)
    except pa.ArrowException as exc:
        raise LoadError(f"{entity.name}: column {name!r} cannot widen to {target}: {exc}") from exc
