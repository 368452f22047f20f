"""Canonical row encoding and xxhash: how we decide that a row changed.

The rule (README, "Change detection"): each non-NULL column contributes
`<name>=<byte length>:<canonical text>;`, in column-name order, and NULL columns contribute
nothing. So NULL differs from '' and from 'null', a column that is NULL everywhere does not move
any hash (adding a column never re-versions history), and two values can never run into each
other. Canonical text is type-stable: integers and decimals in plain digits, timestamps as
microseconds since the epoch in UTC (so the timezone notation of the source does not matter),
nested documents as JSON with sorted keys (done at extraction).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, TypeVar

from pipeline.core.names import CHECK_COLS, CHECK_HASH

if TYPE_CHECKING:
    import pyarrow as pa

Rows = TypeVar("Rows", "pa.Table", "pa.RecordBatch")


def canonical_text(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """One column as canonical strings (NULL stays NULL)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dtype = array.type
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return array
    if pa.types.is_timestamp(dtype):
        return pc.cast(pc.cast(array, pa.timestamp("us", "UTC")).cast(pa.int64()), pa.string())
    if pa.types.is_date(dtype):
        return pc.cast(pc.cast(array, pa.date32()).cast(pa.int32()), pa.string())
    if pa.types.is_boolean(dtype):
        return pc.cast(pc.cast(array, pa.uint8()), pa.string())
    if pa.types.is_null(dtype):
        return pa.nulls(len(array), pa.string())
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return pc.cast(array, pa.string())
    return pc.cast(array, pa.string())


def _piece(name: str | None, text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`<name>=<length>:<text>;`, NULL where the value is NULL (the join drops those)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    length = pc.cast(pc.binary_length(text), pa.string())
    prefix = "" if name is None else f"{name}="
    return pc.binary_join_element_wise(prefix, length, ":", text, ";", "")


def _join(pieces: list[pa.Array | pa.ChunkedArray]) -> pa.Array | pa.ChunkedArray:
    """Concatenate pieces row by row; a NULL piece (a NULL value) contributes nothing."""
    import pyarrow.compute as pc

    if len(pieces) == 1:
        return pc.fill_null(pieces[0], "")
    return pc.binary_join_element_wise(*pieces, "", null_handling="replace", null_replacement="")


def encode_rows(table: pa.Table, columns: Sequence[str]) -> pa.ChunkedArray | pa.Array:
    """The canonical encoding of the named columns of every row (see module docstring)."""
    import pyarrow as pa

    names = sorted(c for c in columns if c in table.column_names)
    if not names:
        return pa.array([""] * table.num_rows, pa.string())
    return _join([_piece(n, canonical_text(table.column(n))) for n in names])


def encode_key(table: pa.Table, key: Sequence[str]) -> pa.ChunkedArray | pa.Array:
    """An unambiguous string per key: ('ab','c') and ('a','bc') encode differently."""

    if len(key) == 1:
        return canonical_text(table.column(key[0]))
    return _join([_piece(None, canonical_text(table.column(k))) for k in key])


def _as_bytes(texts: pa.Array | pa.ChunkedArray) -> list[bytes | None]:
    """Each string as a bytes object: xxhash's C functions take them directly via map()."""
    import pyarrow as pa

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    values: list[bytes | None] = texts.cast(pa.binary()).to_pylist()
    return values


def xxh64_column(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """xxh3-64 of each string: one C call per row, driven by map() (no Python frame per row)."""
    import numpy as np
    import pyarrow as pa
    import xxhash

    digests = map(xxhash.xxh3_64_intdigest, _as_bytes(texts))  # type: ignore[arg-type]
    return pa.array(np.fromiter(digests, dtype=np.uint64, count=len(texts)), pa.uint64())


def row_hash(table: pa.Table, columns: Sequence[str]) -> pa.Array:
    return xxh64_column(encode_rows(table, columns))


def check_signature(check_cols: Sequence[str] | None) -> str:
    """Which columns a change hash covers: `*` (all source columns) or their sorted names.

    Stored beside each raw row's hash (`_check_cols`), so the snapshot uses stored hashes only
    while they still cover the entity's `check_cols`.
    """
    return "*" if check_cols is None else ",".join(sorted(check_cols))


def with_check_hash(part: Rows, check_cols: Sequence[str] | None, meta: Collection[str]) -> Rows:
    """`part` plus its change hash (`_check_hash`) and what the hash covers (`_check_cols`):
    the columns in `check_cols`, or every column not in `meta`."""
    import pyarrow as pa

    sources = [c for c in part.column_names if c not in meta]
    hashed = row_hash(part, sources if check_cols is None else check_cols)
    signature = pa.repeat(pa.scalar(check_signature(check_cols)), part.num_rows)
    return part.append_column(CHECK_HASH, hashed).append_column(CHECK_COLS, signature)
