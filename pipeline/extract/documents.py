"""BSON documents -> Arrow record batches: the type map, widening, field mapping, `_extra`.

Pure functions of the documents (no connection): each field becomes a column whose type
follows the BSON value (README, "Type mapping"); a field whose type changes between documents
is widened, never dropped; a field whose name cannot be a column lands in `_extra`.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import SourceError
from pipeline.core.names import EXTRA_COLUMN, column_name_problem

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("pipeline")


class MongoSourceError(SourceError):
    """MongoDB is unreachable or a value cannot be read; the message names what and where."""


MAX_EXACT_FLOAT_INT = 2**53

# Python type of a BSON value -> name of the pyarrow type factory it converts to directly
_DIRECT = {str: "string", int: "int64", float: "float64", bool: "bool_"}


def _json_default(value: Any) -> Any:
    """Canonical JSON for BSON values json cannot encode (used inside nested documents too)."""
    from bson import Decimal128, ObjectId
    from bson.binary import Binary

    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime):
        return _utc(value).isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal128):
        return str(value.to_decimal())
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Binary) and value.subtype in (3, 4):
        return str(value.as_uuid(value.subtype))
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    from bson import json_util

    return json.loads(json_util.dumps(value))


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: re-extracting the same document gives the same text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _kind(value: Any) -> str:
    """The Arrow-facing kind of one BSON value."""
    from bson import Decimal128, ObjectId
    from bson.binary import Binary

    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, datetime):
        return "timestamp"
    if isinstance(value, ObjectId):
        return "objectid"
    if isinstance(value, Decimal128):
        return "decimal"
    if isinstance(value, uuid.UUID) or (isinstance(value, Binary) and value.subtype in (3, 4)):
        return "uuid"
    if isinstance(value, bytes | bytearray):
        return "binary"
    return "json"


def _as_text(value: Any, kind: str) -> str:
    """The lossless text of a value when its column had to be widened to string."""
    if kind == "string":
        return value
    if kind in ("objectid", "decimal", "uuid", "binary", "timestamp"):
        return _json_default(value)
    return canonical_json(value)


def column_array(values: Sequence[Any], collection: str, field: str) -> pa.Array:
    """Type one field of a batch of documents (the widening rule lives here).

    Dispatch is on the set of Python types in the column, so a uniform column costs one pass in
    C; only mixed columns fall back to per-value classification.
    """
    import pyarrow as pa
    from bson import Int64, ObjectId

    types = {int if t is Int64 else t for t in set(map(type, values))}
    has_null = type(None) in types
    types.discard(type(None))
    try:
        if not types:
            return pa.nulls(len(values), pa.null())
        if len(types) == 1:
            (kind,) = types
            if kind in _DIRECT:
                return pa.array(values, type=getattr(pa, _DIRECT[kind])())
            if kind is ObjectId:
                if has_null:
                    return pa.array([None if v is None else str(v) for v in values], pa.string())
                return pa.array(list(map(str, values)), pa.string())
            if kind is datetime:
                return pa.array(
                    [None if v is None else _utc(v) for v in values], pa.timestamp("us", "UTC")
                )
        if types == {int, float} and all(
            not isinstance(v, int) or abs(v) <= MAX_EXACT_FLOAT_INT for v in values
        ):
            return pa.array([None if v is None else float(v) for v in values], pa.float64())
        return pa.array(
            [None if v is None else _as_text(v, _kind(v)) for v in values], type=pa.string()
        )
    except (OverflowError, pa.ArrowException) as exc:
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63 for v in values):
            return pa.array(
                [None if v is None else _as_text(v, _kind(v)) for v in values], type=pa.string()
            )
        raise MongoSourceError(f"{collection}: field {field!r} cannot be typed: {exc}") from exc


@dataclass(frozen=True)
class FieldMapping:
    """Which fields become columns: all of them (default), or `fields` plus `_extra` JSON.

    `flatten` names dotted paths inside nested documents that become columns of their own
    (`address.city` -> column `address__city`); the rest of a nested document stays JSON.
    """

    fields: tuple[str, ...] | None = None
    flatten: tuple[str, ...] = ()


EXTRA = EXTRA_COLUMN
_REPORTED: set[tuple[str, str]] = set()


def _dig(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def flat_name(path: str) -> str:
    return path.replace(".", "__")


def _unfit_fields(docs: Sequence[dict[str, Any]], collection: str) -> set[str]:
    """Top-level field names that cannot be columns; each is reported once per process."""
    unfit = set()
    for keys in dict.fromkeys(tuple(doc) for doc in docs):
        for key in keys:
            problem = column_name_problem(key)
            if problem is not None:
                unfit.add(key)
                if (collection, key) not in _REPORTED:
                    _REPORTED.add((collection, key))
                    log.warning(
                        "MongoDB collection %s: field %r is %s, so it cannot be a column;"
                        " its values land in %s (canonical JSON)",
                        collection,
                        key,
                        problem,
                        EXTRA,
                    )
    return unfit


def _shape(
    docs: Sequence[dict[str, Any]], mapping: FieldMapping, collection: str
) -> Sequence[dict[str, Any]]:
    """Apply flatten paths and the `fields` list; unmapped fields, and fields whose names
    cannot be columns, go to `_extra`."""
    unfit = _unfit_fields(docs, collection)
    if mapping.fields is None and not mapping.flatten and not unfit:
        return docs
    shaped = []
    keep = None if mapping.fields is None else {"_id", *mapping.fields} - unfit
    for doc in docs:
        out = {flat_name(p): _dig(doc, p) for p in mapping.flatten}
        extra = {}
        for key, value in doc.items():
            if key in unfit or (keep is not None and key not in keep):
                extra[key] = value
            else:
                out[key] = value
        if keep is not None or extra:
            out[EXTRA] = canonical_json(extra) if extra else None
        shaped.append(out)
    return shaped


def documents_to_batch(
    docs: Sequence[dict[str, Any]],
    collection: str,
    fields: list[str],
    mapping: FieldMapping | None = None,
) -> pa.RecordBatch:
    """Turn documents into one record batch; `fields` keeps first-seen order across batches."""
    import pyarrow as pa

    docs = _shape(docs, mapping or FieldMapping(), collection)
    seen = set(fields)
    for keys in dict.fromkeys(tuple(doc) for doc in docs):
        for key in keys:
            if key not in seen:
                seen.add(key)
                fields.append(key)
    arrays = []
    for name in fields:
        values = list(map(dict.get, docs, repeat(name)))
        try:
            arrays.append(column_array(values, collection, name))
        except MongoSourceError as exc:
            bad_id = next((d.get("_id") for d in docs if d.get(name) is not None), "<unknown>")
            raise MongoSourceError(f"{exc} (first document with a value: _id={bad_id})") from exc
    return pa.RecordBatch.from_arrays(arrays, names=list(fields))


def coalesce(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Group record batches into ones of about `rows` rows.

    A column that is all NULL in one chunk takes the type it has in the others; chunks whose
    types really differ are not merged (the raw load widens them by the documented rule).
    """
    import pyarrow as pa

    group: list[pa.Table] = []
    schema: pa.Schema | None = None
    count = 0

    def merged() -> pa.RecordBatch:
        table = pa.concat_tables(group, promote_options="default").combine_chunks()
        return table.to_batches(max_chunksize=max(table.num_rows, 1))[0]

    for batch in batches:
        table = pa.Table.from_batches([batch])
        if schema is not None:
            try:
                schema = pa.unify_schemas([schema, table.schema], promote_options="default")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                yield merged()
                group, schema, count = [], None, 0
        group.append(table)
        schema = schema or table.schema
        count += table.num_rows
        if count >= rows:
            yield merged()
            group, schema, count = [], None, 0
    if group:
        yield merged()
