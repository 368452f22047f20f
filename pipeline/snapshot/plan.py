"""The SQL a merge runs, as strings: built here, executed by `merge`, testable without a server.

The batch's change hashes were computed at load, so the warehouse compares (key, hash) pairs
itself and only new, changed and vanished keys reach Python, where `diff` decides on the real
keys. The warehouse compares a key by a 64-bit fingerprint (set lookups on numbers are several
times faster than on strings): a clash can only let an extra row through to the exact diff,
never hold a changed one back, except when fingerprint and change hash both clash at once.

"Current" means current before this batch: `_opened_by < batch` and `_closed_by` empty or not
before it, so the crashed attempt's own writes are invisible and a rerun reads what the first
run did. Every statement takes `%(b)s` (the batch id) and `%(s)s` (the hash signature).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Entity
from pipeline.core.hashing import check_signature
from pipeline.core.names import keys_table
from pipeline.snapshot.storage import Names
from pipeline.warehouse import qualified, quote_ident
from pipeline.warehouse.buckets import Buckets
from pipeline.warehouse.sql import ints, key_fingerprint

CURRENT = "_opened_by < %(b)s AND (_closed_by = '' OR _closed_by >= %(b)s)"


def scd_id_sql(keys: tuple[str, ...], valid_from: str) -> str:
    """dbt_scd_id in SQL: md5 hex of (key text, '|', valid_from text), the shape of dbt's ids.

    Computed by the warehouse so that opened rows never pass through Python. Composite keys
    are length-prefixed, so ('ab','c') and ('a','bc') get different ids.
    """
    texts = [f"toString(assumeNotNull({quote_ident(k)}))" for k in keys]
    if len(texts) == 1:
        key = texts[0]
    else:
        key = "concat(" + ", ".join(f"toString(length({t})), ':', {t}, ';'" for t in texts) + ")"
    return f"lower(hex(MD5(concat({key}, '|', toString({valid_from})))))"


def parking_sqls(tables: dict[str, str]) -> list[str]:
    """Fresh Log tables (qualified name -> columns) that park a merge's rows per `_bucket`."""
    sqls = []
    for table, columns in tables.items():
        sqls.append(f"DROP TABLE IF EXISTS {table}")
        sqls.append(f"CREATE TABLE {table} ({columns}, _bucket UInt32) ENGINE = Log")
    return sqls


def groups(counts: dict[int, int], rows: int) -> list[list[int]]:
    """Consecutive buckets with parked rows, grouped up to `rows` rows per statement."""
    grouped: list[list[int]] = []
    size = 0
    for bucket in sorted(counts):
        if not grouped or size + counts[bucket] > rows:
            grouped.append([])
            size = 0
        grouped[-1].append(bucket)
        size += counts[bucket]
    return grouped


@dataclass(frozen=True)
class Plan:
    """The queries of one batch against the history before it, bucket by bucket."""

    names: Names
    entity: Entity
    batch_id: str
    has_raw: bool
    reconciled: bool
    has_history: bool
    # `IN` for subqueries over the parking tables: `GLOBAL IN` on a cluster, where they exist
    # on this node only (`pipeline.warehouse.cluster.scratch_in`)
    scratch_in: str = "IN"

    @property
    def params(self) -> dict[str, str]:
        return {"b": self.batch_id, "s": check_signature(self.entity.check_cols)}

    @property
    def keys(self) -> str:
        return ", ".join(quote_ident(k) for k in self.entity.unique_key)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.entity.unique_key)

    @property
    def live(self) -> str:
        if self.entity.hard_deletes == "new_record":
            return "ifNull(dbt_is_deleted, '') != 'True'"
        return "1"

    @property
    def retires(self) -> bool:
        """Whether vanished keys matter: deletes tracked and visible in this batch."""
        visible = not self.entity.incremental or self.reconciled
        return self.entity.hard_deletes != "ignore" and visible

    @property
    def opens_everything(self) -> bool:
        """No current version and the check strategy: every batch row opens at the batch time."""
        return self.has_raw and not self.has_history and self.entity.strategy == "check"

    def raw_rows(self, where: str) -> str:
        raw = qualified(self.names.database, self.entity.raw_table)
        return f"FROM {raw} WHERE _batch_id = %(b)s AND _check_cols = %(s)s AND {where}"

    def stale_rows_sql(self) -> str:
        """Rows of the batch whose hashes cover other columns than the current `check_cols`."""
        raw = qualified(self.names.database, self.entity.raw_table)
        return f"SELECT count() FROM {raw} WHERE _batch_id = %(b)s AND _check_cols != %(s)s"

    def history(self, where: str) -> str:
        return f"FROM {self.names.q_storage} FINAL WHERE {CURRENT} AND {where}"

    def history_of(self, keys: str, where: str) -> str:
        """The history of the keys a condition on the key columns selects, read through
        PREWHERE: every version of a key passes or fails together (the key leads storage's
        sorting key), so FINAL is unchanged, and the other columns are read for those rows
        only (a third less time for 1% of the keys)."""
        return f"FROM {self.names.q_storage} FINAL PREWHERE {keys} WHERE {CURRENT} AND {where}"

    def digest(self, hash_column: str) -> str:
        """One number for a set of (key, hash) pairs: a sum of their fingerprints."""
        return f"sum(cityHash64({self.fingerprint}, {hash_column}))"

    def validate_sql(self) -> str:
        """The batch's rows, distinct key fingerprints, rows with a NULL key, and digest."""
        nulls = " OR ".join(f"isNull({quote_ident(k)})" for k in self.entity.unique_key)
        return (
            f"SELECT count(), uniqExact({self.fingerprint}), countIf({nulls}),"
            f" {self.digest('_check_hash')} {self.raw_rows('1')}"
        )

    def repeated_keys_sql(self) -> str:
        return (
            f"SELECT {self.keys}, count() {self.raw_rows('1')} GROUP BY {self.keys}"
            " HAVING count() > 1 LIMIT 5"
        )

    def live_digest_sql(self) -> str:
        """Count and digest of the live current (key, hash) pairs (the no-change test)."""
        return f"SELECT count(), {self.digest('_hash')} {self.history('1')} AND {self.live}"

    def bucket_counts_sql(self, buckets: Buckets) -> str:
        return f"SELECT {buckets.of_key} AS b, count() {self.raw_rows('1')} GROUP BY b"

    def changed_sql(self, where: str) -> str:
        """The batch's rows whose (key, hash) is not a live current version: new or changed."""
        cols = [self.keys, "_check_hash AS _hash"]
        if self.entity.strategy == "timestamp":
            assert self.entity.updated_at is not None
            cols.append(quote_ident(self.entity.updated_at))
        sql = f"SELECT {', '.join(cols)} {self.raw_rows(where)}"
        if not self.has_history:
            return sql
        return (
            f"{sql} AND ({self.fingerprint}, _check_hash) NOT IN"
            f" (SELECT {self.fingerprint}, _hash {self.history(where)} AND {self.live})"
        )

    def incoming_sql(self, where: str) -> str:
        if not self.has_raw:
            return f"SELECT {self.keys} FROM {self.names.q_storage} WHERE 0"
        return self.changed_sql(where)

    @property
    def current_columns(self) -> list[str]:
        """What the diff needs of a current version."""
        cols = [self.keys, "dbt_scd_id", "_hash"]
        if self.entity.strategy == "timestamp":
            cols += ["dbt_updated_at", "dbt_valid_from"]
        if self.entity.hard_deletes == "new_record":
            cols.append("dbt_is_deleted")
        return cols

    def current_sql(self, where: str) -> str | None:
        """Current versions of keys the batch changed, and of live keys it no longer has;
        None when no current version can matter. With a reconciliation key list, `_present`
        says which of them the source still has."""
        cols = self.current_columns
        present = None
        if self.retires and self.reconciled:
            listed = qualified(self.names.database, keys_table(self.entity.name))
            present = (
                f"({self.keys}) IN (SELECT {self.keys} FROM {listed}"
                f" WHERE _batch_id = %(b)s AND {where})"
            )
            cols.append(f"{present} AS _present")
        wanted = []
        if self.has_raw:
            in_batch = f"{self.fingerprint} IN (SELECT {self.fingerprint} {self.raw_rows(where)})"
            differs = (
                f"({self.fingerprint}, _hash) NOT IN"
                f" (SELECT {self.fingerprint}, _check_hash {self.raw_rows(where)})"
            )
            if not self.retires:
                wanted.append(f"{differs} AND {in_batch}")
            elif present is not None:
                wanted.append(f"{differs} AND ({in_batch} OR NOT {present})")
            else:
                wanted.append(differs)  # changed or vanished
            if self.entity.hard_deletes == "new_record":  # the tombstone of a key that is back
                wanted.append(f"NOT ({self.live}) AND {in_batch}")
        elif self.retires:  # no raw table: everything vanished
            wanted.append(self.live if present is None else f"{self.live} AND NOT {present}")
        if not wanted or not self.has_history:
            return None
        return f"SELECT {', '.join(cols)} {self.history(where)} AND ({' OR '.join(wanted)})"

    def current_or_empty_sql(self, where: str) -> str:
        sql = self.current_sql(where)
        if sql is None:
            return f"SELECT {', '.join(self.current_columns)} FROM {self.names.q_storage} WHERE 0"
        return sql

    def change_count_sqls(self) -> list[str]:
        """Counts of what the diff will see, batch side and history side: a no-change batch
        stops at them, and the merge is bucketed by what reaches Python."""
        sides = (self.changed_sql("1") if self.has_raw else None, self.current_sql("1"))
        return [f"SELECT count() FROM ({sql})" for sql in sides if sql is not None]

    def ended_sql(self, where: str) -> str | None:
        """Last `dbt_valid_to` of the changed keys whose history has closed versions.

        Only the timestamp strategy with hard_deletes = invalidate needs it: there a key can
        come back with an old `updated_at` and no current version to compare with.
        """
        entity = self.entity
        if entity.strategy != "timestamp" or entity.hard_deletes != "invalidate":
            return None
        return (
            f"SELECT {self.keys}, max(dbt_valid_to) AS last_valid_to"
            f" FROM {self.names.q_storage} FINAL"
            " WHERE _opened_by < %(b)s AND _closed_by != '' AND _closed_by < %(b)s"
            f" AND {where} AND ({self.keys}) IN (SELECT {self.keys}"
            f" FROM ({self.changed_sql(where)})) GROUP BY {self.keys}"
        )

    def live_count_sql(self) -> str:
        """Live keys before this batch: what the delete guard weighs a retirement against."""
        return f"SELECT count() {self.history('1')} AND {self.live}"


@dataclass(frozen=True)
class Parking:
    """The SQL of a batch's diff parked in two Log tables until every bucket is diffed, then
    written: opens copied from the raw batch, tombstones and closes copied from storage."""

    plan: Plan
    key_types: dict[str, str]
    timestamp_type: str
    batch_ts: str  # the batch time as a SQL expression

    @property
    def open_table(self) -> str:
        return f"{self.plan.names.storage}__open"

    @property
    def close_table(self) -> str:
        return f"{self.plan.names.storage}__close"

    def q(self, table: str) -> str:
        return qualified(self.plan.names.database, table)

    @property
    def timestamped(self) -> bool:
        return self.plan.entity.strategy == "timestamp"

    def create_sqls(self) -> list[str]:
        ts = self.timestamp_type
        keys = ", ".join(f"{quote_ident(k)} {t}" for k, t in self.key_types.items())
        opened = f", dbt_updated_at {ts}, dbt_valid_from {ts}" if self.timestamped else ""
        tables = {
            self.open_table: f"{keys}{opened}",
            self.close_table: f"{keys}, dbt_scd_id String, _new_valid_to {ts}, _tombstone UInt8",
        }
        return parking_sqls({self.q(table): columns for table, columns in tables.items()})

    def drop_sqls(self) -> list[str]:
        return [f"DROP TABLE IF EXISTS {self.q(t)}" for t in (self.open_table, self.close_table)]

    def parked_opens(self, group: list[int]) -> str:
        return f"FROM {self.q(self.open_table)} WHERE _bucket IN ({ints(group)})"

    def open_sql(
        self, columns: list[str], rows: str, parked: str | None, block_rows: int | None = None
    ) -> str:
        """INSERT the batch's rows that open versions, with their meta columns, in one statement.

        `parked` (timestamp strategy) supplies each key's validity start; the check strategy
        opens every version at the batch time. Takes `%(v)s`, the version of the write.
        `block_rows` caps the rows the server gathers before it writes a part (its memory).
        """
        entity, keys = self.plan.entity, self.plan.keys
        meta = {
            "dbt_updated_at": self.batch_ts,
            "dbt_valid_from": self.batch_ts,
            "_hash": "_check_hash",
            "dbt_valid_to": "NULL",
            "_opened_by": "%(b)s",
            "_closed_by": "''",
            "_version": "%(v)s",
        }
        meta["dbt_scd_id"] = scd_id_sql(entity.unique_key, meta["dbt_valid_from"])
        if entity.hard_deletes == "new_record":
            meta["dbt_is_deleted"] = "'False'"
        source = ", ".join(quote_ident(c) for c in columns)
        raw = f"SELECT {source}, _check_hash {self.plan.raw_rows(rows)}"
        if self.timestamped:
            assert parked is not None
            meta.update(
                dbt_updated_at="_p_updated_at",
                dbt_valid_from="_p_valid_from",
                dbt_scd_id=scd_id_sql(entity.unique_key, "_p_valid_from"),
            )
            raw = (
                f"({raw}) AS r ANY INNER JOIN (SELECT {keys},"
                f" dbt_updated_at AS _p_updated_at, dbt_valid_from AS _p_valid_from {parked})"
                f" AS p USING ({keys})"
            )
        else:
            raw = f"({raw})"
        target = [*columns, *meta]
        settings = (
            "" if block_rows is None else f" SETTINGS min_insert_block_size_rows = {block_rows:d}"
        )
        return (
            f"INSERT INTO {self.plan.names.q_storage} ({', '.join(map(quote_ident, target))})"
            f" SELECT {', '.join([*map(quote_ident, columns), *meta.values()])} FROM {raw}"
            f"{settings}"
        )

    def opens_of_parked(self, columns: list[str], group: list[int]) -> str:
        parked = self.parked_opens(group)
        keys = self.plan.keys
        rows = f"({keys}) {self.plan.scratch_in} (SELECT {keys} {parked})"
        return self.open_sql(columns, rows, parked)

    def copy_sql(
        self, group: list[int], cols: list[str], overrides: dict[str, str], only: str = "1"
    ) -> str:
        """Re-insert parked versions with some columns replaced (ReplacingMergeTree keeps it)."""
        keys, storage = self.plan.keys, self.plan.names.q_storage
        select = ", ".join(overrides.get(c, quote_ident(c)) for c in cols)
        parked = f"FROM {self.q(self.close_table)} WHERE _bucket IN ({ints(group)}) AND {only}"
        return (
            f"INSERT INTO {storage} ({', '.join(quote_ident(c) for c in cols)})"
            f" SELECT {select} FROM (SELECT * FROM {storage} FINAL"
            f" WHERE ({keys}) {self.plan.scratch_in} (SELECT {keys} {parked})) AS s"
            f" ANY INNER JOIN (SELECT dbt_scd_id, _new_valid_to {parked}) AS c"
            " USING (dbt_scd_id)"
        )

    @property
    def tombstone_columns(self) -> dict[str, str]:
        """A deletion version (hard_deletes = new_record) opening when the key went away."""
        return {
            "dbt_scd_id": scd_id_sql(self.plan.entity.unique_key, "_new_valid_to"),
            "dbt_updated_at": "_new_valid_to",
            "dbt_valid_from": "_new_valid_to",
            "dbt_valid_to": "NULL",
            "dbt_is_deleted": "'True'",
            "_opened_by": "%(b)s",
            "_closed_by": "''",
            "_version": "%(v)s",
        }

    @property
    def close_columns(self) -> dict[str, str]:
        return {"dbt_valid_to": "_new_valid_to", "_closed_by": "%(b)s", "_version": "%(v)s"}

    def touched_keys_sql(self, created: bool, whole: list[int], buckets: Buckets) -> str:
        """A subquery listing every key this batch opened or closed a version of."""
        keys, parts = self.plan.keys, []
        if created:
            parts += [
                f"SELECT {keys} FROM {self.q(self.open_table)}",
                f"SELECT {keys} FROM {self.q(self.close_table)}",
            ]
        if whole:
            parts.append(f"SELECT {keys} {self.plan.raw_rows(buckets.where_any(whole))}")
        return " UNION ALL ".join(parts)
