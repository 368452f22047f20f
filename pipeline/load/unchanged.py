"""Values a change left out: filled from the key's previous row before the change is loaded.

PostgreSQL's log sends a large (TOASTed) column that an UPDATE did not touch as "unchanged",
without its value, even under REPLICA IDENTITY FULL. The change source stages such a column as
NULL and names it in `_unchanged`; here it takes the value of the key's previous row: an
earlier change of the same batch, or else the newest raw row of the key (every earlier
change, the first load included, is in raw, already filled). Never NULL, never an error.

A change that moved a row to another key (a primary-key UPDATE, staged as a delete of the old
key and, in the same part, an insert of the new one) names the old key in `_old_key`: its
unchanged columns are the old key's. A delete's own row is never a previous value (under
REPLICA IDENTITY DEFAULT it holds the key alone), so deletes are passed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import Entity
from pipeline.core.errors import LoadError
from pipeline.core.hashing import encode_key
from pipeline.core.names import OLD_KEY, OP, SEQ, UNCHANGED
from pipeline.warehouse import Warehouse, qualified, quote_ident

if TYPE_CHECKING:
    import pyarrow as pa

KEYS_PER_QUERY = 5_000


def _any_marked(part: pa.Table) -> bool:
    """Whether a row names an unchanged column (one vectorised pass; almost never true)."""
    import pyarrow.compute as pc

    longest = pc.max(pc.binary_length(part.column(UNCHANGED))).as_py()
    return bool(longest)


def _marked(part: pa.Table) -> list[set[str]]:
    return [set(m.split(",")) if m else set() for m in part.column(UNCHANGED).to_pylist()]


def fill_unchanged(wh: Warehouse, database: str, entity: Entity, part: pa.Table) -> pa.Table:
    """`part` with every column its rows mark unchanged filled in (see the module docstring)."""
    import pyarrow as pa

    if UNCHANGED not in part.column_names or not _any_marked(part):
        return part
    marks = _marked(part)
    names = sorted(set().union(*marks))
    if not names:
        return part
    encoded = encode_key(part, entity.unique_key)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    keys: list[str] = encoded.to_pylist()
    sources = list(keys)  # whose previous row each row's unchanged columns take
    if OLD_KEY in part.column_names:
        olds = part.column(OLD_KEY).to_pylist()
        sources = [old or key for old, key in zip(olds, keys, strict=True)]
    ops = part.column(OP).to_pylist() if OP in part.column_names else [None] * len(keys)
    seqs = part.column(SEQ).to_pylist()
    walk = _Walk(
        sorted(range(part.num_rows), key=seqs.__getitem__),
        marks,
        keys,
        sources,
        [op == "delete" for op in ops],
        {name: part.column(name).to_pylist() for name in names},
    )
    missing = walk.fill({})
    if missing:
        earlier = _from_raw(wh, database, entity, part, keys, missing)
        missing = walk.fill(earlier)
    if missing:
        source, name = min(missing)
        raise LoadError(
            f"{entity.name}: column {name!r} of key {source!r} ({list(entity.unique_key)}) was"
            " sent unchanged, but no earlier row of the key was loaded to take it from",
            entity=entity.name,
        )
    for name, values in walk.columns.items():
        index = part.column_names.index(name)
        typed = pa.array(values, part.schema.field(name).type)
        part = part.set_column(index, part.schema.field(name), typed)
    return part


@dataclass
class _Walk:
    """The part's rows in commit order, each unchanged value taken from the previous row of
    its source key: earlier in the part, else `earlier` (the newest raw row of that key)."""

    order: list[int]
    marks: list[set[str]]
    keys: list[str]
    sources: list[str]
    deletes: list[bool]
    columns: dict[str, list[Any]]

    def fill(self, earlier: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
        """Fill what can be filled; the (source key, column) pairs found nowhere."""
        missing: set[tuple[str, str]] = set()
        for name, values in self.columns.items():
            known: dict[str, Any] = {}
            for row in self.order:
                if name in self.marks[row]:
                    source = self.sources[row]
                    if source in known:
                        values[row] = known[source]
                    elif source in earlier:
                        values[row] = earlier[source][name]
                    else:
                        missing.add((source, name))
                if not self.deletes[row]:
                    known[self.keys[row]] = values[row]
        return missing


def _from_raw(
    wh: Warehouse,
    database: str,
    entity: Entity,
    part: pa.Table,
    keys: list[str],
    missing: set[tuple[str, str]],
) -> dict[str, dict[str, Any]]:
    """The newest raw row of each source key the part alone cannot fill from. A key's values
    are read from the part's row of that key (for an old key: the delete beside the move)."""
    names = sorted({name for _, name in missing})
    row_of = {key: row for row, key in enumerate(keys)}
    wanted = sorted({source for source, _ in missing if source in row_of})
    key_cols = list(entity.unique_key)
    key_values = part.select(key_cols).take([row_of[s] for s in wanted]).to_pylist()
    pending = [tuple(v[k] for k in key_cols) for v in key_values]
    latest: dict[str, dict[str, Any]] = {}
    changes = OP in part.column_names
    for start in range(0, len(pending), KEYS_PER_QUERY):
        chunk = pending[start : start + KEYS_PER_QUERY]
        for found in _latest(wh, database, entity, names, chunk, changes):
            latest[_encode(found, entity)] = found
    return latest


def _latest(
    wh: Warehouse,
    database: str,
    entity: Entity,
    names: list[str],
    key_values: list[tuple[Any, ...]],
    skip_deletes: bool = False,
) -> list[dict[str, Any]]:
    """The newest loaded value of each column for each key (changes are ordered by batch, then
    `_seq`; a first load sorts before the changes of its batch), deletes passed over."""
    key_cols = ", ".join(quote_ident(k) for k in entity.unique_key)
    latest = ", ".join(
        f"argMax({quote_ident(n)}, tuple(_batch_id, {SEQ})) AS {quote_ident(n)}" for n in names
    )
    only = f" AND {OP} != 'delete'" if skip_deletes else ""
    one = len(entity.unique_key) == 1
    values = [v[0] for v in key_values] if one else key_values
    table = wh.query_arrow(
        f"SELECT {key_cols}, {latest} FROM {qualified(database, entity.raw_table)}"
        f" WHERE ({key_cols}) IN %(keys)s{only} GROUP BY {key_cols}",
        {"keys": tuple(values)},
    )
    found: list[dict[str, Any]] = table.to_pylist()
    return found


def _encode(row: dict[str, Any], entity: Entity) -> str:
    import pyarrow as pa

    table = pa.Table.from_pylist([{k: row[k] for k in entity.unique_key}])
    encoded = encode_key(table, entity.unique_key)
    value: str = encoded[0].as_py()
    return value
