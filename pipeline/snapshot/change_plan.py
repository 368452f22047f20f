"""The SQL of a change batch's merge, as strings (executed by `change_merge`).

A change batch holds several rows per key, told apart by `_seq`; each version the batch opens
is copied from its change row by (key, `_seq`), or, for a deletion version, from the row or
the stored version it repeats. "Current" is read by batch ids exactly as in `plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.names import CHANGE_TIME, OP, SEQ
from pipeline.snapshot.plan import Plan, parking_sqls, scd_id_sql
from pipeline.warehouse import qualified, quote_ident
from pipeline.warehouse.sql import ints

# what a change batch parks per opened version, besides the key columns
OPEN_COLUMNS = (
    f"{SEQ} UInt64",
    "dbt_valid_from {ts}",
    "dbt_valid_to Nullable({ts})",
    "dbt_updated_at {ts}",
    "_tombstone UInt8",
    "_from_seq Nullable(UInt64)",
    "_replaces UInt8",
    "_keep_scd_id Nullable(String)",
    "_keep_opened_by Nullable(String)",
)


@dataclass(frozen=True)
class ChangePlan:
    """The queries and writes of one change batch, bucket by bucket."""

    plan: Plan
    key_types: dict[str, str]
    timestamp_type: str

    @property
    def keys(self) -> str:
        return self.plan.keys

    @property
    def open_table(self) -> str:
        return f"{self.plan.names.storage}__copen"

    @property
    def close_table(self) -> str:
        return f"{self.plan.names.storage}__close"

    def q(self, table: str) -> str:
        return qualified(self.plan.names.database, table)

    def changes_sql(self, where: str) -> str:
        """The batch's changes: key, order, operation, change hash, time (and updated_at)."""
        entity = self.plan.entity
        time = quote_ident(CHANGE_TIME[entity.mode])
        cols = [self.keys, SEQ, OP, "_check_hash AS _hash", f"{time} AS _time"]
        if entity.strategy == "timestamp":
            assert entity.updated_at is not None
            cols.append(quote_ident(entity.updated_at))
        return f"SELECT {', '.join(cols)} {self.plan.raw_rows(where)}"

    def rows_sql(self, source: list[str], where: str) -> str:
        """The batch's changes whole: the source columns an opened version copies, and what
        `changes_sql` reads under raw names (for versions written straight from Arrow)."""
        time = quote_ident(CHANGE_TIME[self.plan.entity.mode])
        cols = dict.fromkeys([*map(quote_ident, source), SEQ, OP, "_check_hash", time])
        return f"SELECT {', '.join(cols)} {self.plan.raw_rows(where)}"

    def opened_columns(self, source: list[str]) -> dict[str, str]:
        """Storage column -> expression over an opened version's row (its source columns and
        meta columns, with `_keep_scd_id` where it keeps a stored id): the id is computed here,
        as in `open_sql`, so it is the same text whichever way a version is written."""
        valid_from = f"CAST(dbt_valid_from AS {self.timestamp_type})"
        new_id = scd_id_sql(self.plan.entity.unique_key, valid_from)
        meta = ["dbt_updated_at", "dbt_valid_from", "dbt_valid_to", "_hash"]
        meta += ["_opened_by", "_closed_by", "_version"]
        if self.plan.entity.hard_deletes == "new_record":
            meta.append("dbt_is_deleted")
        columns = {c: quote_ident(c) for c in [*source, *meta]}
        columns["dbt_scd_id"] = f"ifNull(_keep_scd_id, {new_id})"
        return columns

    def batch_keys_sql(self) -> str:
        """Every key the batch changes (the keys a merge without parking touched, and more)."""
        return f"SELECT {self.keys} {self.plan.raw_rows('1')}"

    def _in_batch(self, where: str) -> str:
        fingerprint = self.plan.fingerprint
        return f"{fingerprint} IN (SELECT {fingerprint} {self.plan.raw_rows(where)})"

    def current_sql(self, where: str) -> str:
        """The live (or deletion) version of each key the batch changes, whole: a version the
        batch closes is written back from this row, not read from storage again."""
        return f"SELECT * {self.plan.history_of(self._in_batch(where), where)}"

    def ended_sql(self, where: str) -> str | None:
        """Where the closed history of each changed key ended (keys invalidated earlier)."""
        if self.plan.entity.hard_deletes != "invalidate":
            return None
        return (
            f"SELECT {self.keys}, max(dbt_valid_to) AS last_valid_to"
            f" FROM {self.plan.names.q_storage} FINAL"
            " WHERE _opened_by < %(b)s AND _closed_by != '' AND _closed_by < %(b)s"
            f" AND {where} AND {self._in_batch(where)} GROUP BY {self.keys}"
        )

    def create_sqls(self, stored: dict[str, str]) -> list[str]:
        """Parking for opened versions (keys and times) and for closed ones (whole stored rows,
        `stored`: storage's column -> type, and where each now ends)."""
        ts = self.timestamp_type
        keys = ", ".join(f"{quote_ident(k)} {t}" for k, t in self.key_types.items())
        opened = ", ".join(c.format(ts=ts) for c in OPEN_COLUMNS)
        rows = ", ".join(f"{quote_ident(c)} {t}" for c, t in stored.items())
        tables = {
            self.open_table: f"{keys}, {opened}",
            self.close_table: f"{rows}, _new_valid_to {ts}, _tombstone UInt8",
        }
        return parking_sqls({self.q(table): columns for table, columns in tables.items()})

    def close_sql(self, stored: list[str], group: list[int]) -> str:
        """Closed versions: their parked stored rows, ending at `_new_valid_to`."""
        overrides = {"dbt_valid_to": "_new_valid_to", "_closed_by": "%(b)s", "_version": "%(v)s"}
        select = ", ".join(overrides.get(c, quote_ident(c)) for c in stored)
        return (
            f"INSERT INTO {self.plan.names.q_storage} ({', '.join(map(quote_ident, stored))})"
            f" SELECT {select} FROM {self.q(self.close_table)} WHERE _bucket IN ({ints(group)})"
        )

    def drop_sqls(self) -> list[str]:
        return [f"DROP TABLE IF EXISTS {self.q(t)}" for t in (self.open_table, self.close_table)]

    def _meta(self, tombstone: bool) -> dict[str, str]:
        """The meta columns of an opened version, from the parked row `p`."""
        keys = self.plan.entity.unique_key
        new_id = scd_id_sql(keys, "dbt_valid_from")
        meta = {
            "dbt_scd_id": f"if(_replaces = 1, assumeNotNull(_keep_scd_id), {new_id})",
            "dbt_updated_at": "dbt_updated_at",
            "dbt_valid_from": "dbt_valid_from",
            "dbt_valid_to": "dbt_valid_to",
            "_hash": "_check_hash",
            "_opened_by": "if(_replaces = 1, assumeNotNull(_keep_opened_by), %(b)s)",
            "_closed_by": "if(isNull(dbt_valid_to), '', %(b)s)",
            "_version": "%(v)s",
        }
        if self.plan.entity.hard_deletes == "new_record":
            meta["dbt_is_deleted"] = "'True'" if tombstone else "'False'"
        return meta

    def open_sql(self, columns: list[str], group: list[int], tombstone: bool) -> str:
        """Versions copied from change rows: opened ones from their own row, deletion versions
        (`tombstone`) from the row of the change before the delete (`_from_seq`)."""
        keys = self.keys
        parked = f"FROM {self.q(self.open_table)} WHERE _bucket IN ({ints(group)})"
        if tombstone:
            parked += " AND _tombstone = 1 AND isNotNull(_from_seq)"
            seq = f"assumeNotNull(_from_seq) AS {SEQ}"
        else:
            parked += " AND _tombstone = 0"
            seq = SEQ
        meta = self._meta(tombstone)
        source = ", ".join(quote_ident(c) for c in columns)
        raw = (
            f"SELECT {source}, {SEQ}, _check_hash"
            f" {self.plan.raw_rows(f'({keys}) {self.plan.scratch_in} (SELECT {keys} {parked})')}"
        )
        joined = (
            f"({raw}) AS r ANY INNER JOIN (SELECT {keys}, {seq}, dbt_valid_from, dbt_valid_to,"
            f" dbt_updated_at, _replaces, _keep_scd_id, _keep_opened_by {parked}) AS p"
            f" USING ({keys}, {SEQ})"
        )
        target = [*columns, *meta]
        return (
            f"INSERT INTO {self.plan.names.q_storage} ({', '.join(map(quote_ident, target))})"
            f" SELECT {', '.join([*map(quote_ident, columns), *meta.values()])} FROM {joined}"
        )

    def stored_tombstone_sql(self, stored: list[str], group: list[int]) -> str:
        """Deletion versions that repeat a key's stored version (the delete came first)."""
        keys, storage = self.keys, self.plan.names.q_storage
        parked = (
            f"FROM {self.q(self.open_table)} WHERE _bucket IN ({ints(group)})"
            " AND _tombstone = 1 AND isNull(_from_seq)"
        )
        overrides = {
            "dbt_scd_id": scd_id_sql(self.plan.entity.unique_key, "_t_from"),
            "dbt_updated_at": "_t_from",
            "dbt_valid_from": "_t_from",
            "dbt_valid_to": "_t_to",
            "dbt_is_deleted": "'True'",
            "_opened_by": "%(b)s",
            "_closed_by": "if(isNull(_t_to), '', %(b)s)",
            "_version": "%(v)s",
        }
        select = ", ".join(overrides.get(c, quote_ident(c)) for c in stored)
        return (
            f"INSERT INTO {storage} ({', '.join(quote_ident(c) for c in stored)})"
            f" SELECT {select} FROM (SELECT * {self.plan.history('1')}"
            f" AND ({keys}) {self.plan.scratch_in} (SELECT {keys} {parked})) AS s"
            f" ANY INNER JOIN (SELECT {keys}, dbt_valid_from AS _t_from, dbt_valid_to AS _t_to"
            f" {parked}) AS t USING ({keys})"
        )

    def touched_keys_sql(self) -> str:
        keys = self.keys
        return (
            f"SELECT {keys} FROM {self.q(self.open_table)}"
            f" UNION ALL SELECT {keys} FROM {self.q(self.close_table)}"
        )
