"""SCD2 invariants: one current version per live key, `dbt_valid_from < dbt_valid_to`, and
windows of a key that never overlap and (except across an `invalidate` delete) touch end to
start. A pure check of Arrow versions, and the reads that feed it from storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core.hashing import encode_key
from pipeline.snapshot.diff import TS, Spec, spec_for
from pipeline.snapshot.storage import Names
from pipeline.warehouse import Warehouse, quote_ident
from pipeline.warehouse.buckets import Buckets
from pipeline.warehouse.cluster import scratch_in
from pipeline.warehouse.sql import key_fingerprint

if TYPE_CHECKING:
    import pyarrow as pa

# keys per bucket of a whole-history check (`[cdc] merge_bucket_rows`)
BUCKET_ROWS = 100_000
# a merge that touched at most this share of the live keys checks only those keys
FULL_CHECK_SHARE = 0.2


def _combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    import pyarrow as pa

    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def invariant_violations(spec: Spec, versions: pa.Table, limit: int = 5) -> list[str]:
    """Check a snapshot's history; returns human-readable violations naming the keys.

    `versions`: unique_key columns, dbt_valid_from, dbt_valid_to, and dbt_is_deleted if any.
    One current version per key; valid_from < valid_to; windows of a key never overlap and,
    unless hard_deletes = invalidate (which leaves a gap while a key is gone), touch end to start.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if versions.num_rows == 0:
        return []
    encoded = _combined(encode_key(versions, spec.unique_key)).dictionary_encode()
    names = encoded.dictionary
    start = versions.column("dbt_valid_from").cast(pa.timestamp(*TS)).cast(pa.int64())
    end = versions.column("dbt_valid_to").cast(pa.timestamp(*TS)).cast(pa.int64())
    table = pa.table({"k": encoded.indices, "s": start, "e": end}).sort_by(
        [("k", "ascending"), ("s", "ascending")]
    )
    k = table.column("k").to_numpy()
    s = table.column("s").to_numpy()
    e_arr = table.column("e")
    is_open = pc.is_null(e_arr).to_numpy(zero_copy_only=False)
    e = e_arr.fill_null(np.iinfo(np.int64).max).to_numpy()
    problems: list[str] = []

    def report(mask: np.ndarray, what: str) -> None:
        for key in list(dict.fromkeys(k[mask].tolist()))[:limit]:
            problems.append(f"{spec.entity}: key {names[key].as_py()!r}: {what}")

    report(~is_open & (e <= s), "dbt_valid_from is not before dbt_valid_to")
    same_key = k[1:] == k[:-1]
    report(np.concatenate([same_key & (e[:-1] > s[1:]), [False]]), "validity windows overlap")
    if spec.hard_deletes != "invalidate":
        report(
            np.concatenate([same_key & (e[:-1] < s[1:]), [False]]), "validity windows leave a gap"
        )
    open_keys = k[is_open]
    uniq, counts = np.unique(open_keys, return_counts=True)
    for key in uniq[counts > 1][:limit].tolist():
        problems.append(f"{spec.entity}: key {names[key].as_py()!r}: more than one current version")
    return problems


def check_invariants(
    wh: Warehouse,
    names: Names,
    entity: Entity,
    keys: str | None = None,
    bucket_rows: int = BUCKET_ROWS,
) -> list[str]:
    """Invariants of the whole history (bucket by bucket), or of the keys a subquery lists.

    Only keys a merge touched can break, so after a merge the check reads just those (a
    no-change run reads nothing); `python -m pipeline check` reads everything.
    """
    cols = [quote_ident(k) for k in entity.unique_key] + ["dbt_valid_from", "dbt_valid_to"]
    select = f"SELECT {', '.join(cols)} FROM {names.q_storage} FINAL"
    spec = spec_for(entity)
    if keys is not None:
        key_cols = ", ".join(quote_ident(k) for k in entity.unique_key)
        member = scratch_in(wh)  # the subquery may read this node's parking tables
        # PREWHERE: a key's versions pass together, so FINAL is unchanged (see Plan.history_of)
        return invariant_violations(
            spec, wh.query_arrow(f"{select} PREWHERE ({key_cols}) {member} ({keys})")
        )
    total = int(wh.scalar(f"SELECT count() FROM {names.q_storage}") or 0)
    buckets = Buckets.sized(total, bucket_rows, entity.unique_key)
    problems: list[str] = []
    for bucket in range(buckets.count):
        versions = wh.query_arrow(f"{select} WHERE {buckets.where(bucket)}")
        problems += invariant_violations(spec, versions)
    return problems


def first_load_violations(wh: Warehouse, names: Names, entity: Entity, rows: int) -> list[str]:
    """Invariants of a history this batch started: `rows` keys, one current version each.

    Single versions have no windows to overlap, so one aggregate over the stored rows proves
    what reading every version back would. Only a mismatch reads them, to name the keys (or
    to clear a fingerprint clash, which can only lower the distinct count).
    """
    count, distinct, current = wh.query_rows(
        f"SELECT count(), uniqExact({key_fingerprint(entity.unique_key)}),"
        f" countIf(isNull(dbt_valid_to)) FROM {names.q_storage}"
    )[0]
    if count == distinct == current == rows:
        return []
    problems = check_invariants(wh, names, entity)
    if problems or count == current == rows:
        return problems
    return [
        f"{entity.name}: a first load of {rows} keys left {count} version(s) of {distinct}"
        f" key(s), {current} current"
    ]
