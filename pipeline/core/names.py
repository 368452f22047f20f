"""Every name the stages share: tables in the warehouse, objects in staging, reserved columns.

A table name built anywhere else is a contract broken; identifiers from configuration are
checked here, and `pipeline.warehouse.sql.quote_ident` quotes whatever reaches SQL.
"""

from __future__ import annotations

import re

from pipeline.core.errors import ConfigError

# bookkeeping tables in the project database
BATCHES = "_cdc_batches"  # stage markers: a row per (entity, stage, batch) that finished
STATE = "_cdc_state"  # PostgreSQL watermarks, a row per loaded batch
RUNS = "_cdc_runs"  # the run audit, a row per task run

# columns the raw load adds to every row (a change source may stage the two change-hash
# columns already, computed while it waits on the log: the load keeps them when they still fit)
CHECK_HASH, CHECK_COLS = "_check_hash", "_check_cols"
LOAD_META_COLUMNS = ("_batch_id", "_loaded_at", "_row_hash", CHECK_HASH, CHECK_COLS)
# columns a change source (a database log) stages with each change: the operation, its order
# in the batch (`_seq`), where and when it was committed, which columns it left unchanged, and
# the key the row had before, when the change moved it to another key (`_old_key`, encoded as
# `hashing.encode_key` does: its unchanged columns are that key's)
OP, SEQ, UNCHANGED, OLD_KEY = "_op", "_seq", "_unchanged", "_old_key"
CHANGE_TIME = {"log": "_commit_ts", "changestream": "_wall_time"}
CHANGE_META_COLUMNS = (
    OP,
    SEQ,
    "_lsn",
    "_commit_ts",
    "_xid",
    "_cluster_time",
    "_wall_time",
    UNCHANGED,
    OLD_KEY,
)
# `_op` of the rows of a whole re-read (a first load or a resync) of a change entity
SCAN_OP = "scan"
# columns of a raw table that are not the source's own; a source field may not take these names
RAW_META_COLUMNS = LOAD_META_COLUMNS + CHANGE_META_COLUMNS
EXTRA_COLUMN = "_extra"  # MongoDB fields that are not columns, as canonical JSON
# the meta columns of a snapshot, as dbt names them (renamed by snapshot_meta_column_names)
SNAPSHOT_META_COLUMNS = (
    "dbt_scd_id",
    "dbt_updated_at",
    "dbt_valid_from",
    "dbt_valid_to",
    "dbt_is_deleted",
)
# MergeTree keeps a file per column named after it, %XX-escaped, plus a suffix (`.null.mrk2`);
# servers before 23.x fail the insert when that name exceeds the file system's 255 bytes
MAX_ESCAPED_COLUMN_NAME = 200
_PLAIN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# staging layout: <source>/<table>/batch=<id>/part-NNNNN.parquet, manifest last
MANIFEST = "_manifest.json"
KEYS_SUBDIR = "keys/"  # a reconciliation key list, staged beside the batch's rows
RANGES = "_ranges.json"  # the `_id` bounds of a partitioned MongoDB extract


def raw_table(entity: str) -> str:
    return f"raw_{entity}"


def keys_table(entity: str) -> str:
    """The reconciliation key lists of an entity (one per batch)."""
    return f"{raw_table(entity)}__keys"


def snapshot_view(entity: str) -> str:
    """What readers query: a view over the storage with FINAL."""
    return f"{entity}_snapshot"


def snapshot_storage(entity: str) -> str:
    """The ReplacingMergeTree that holds every version."""
    return f"{snapshot_view(entity)}__versions"


def mart_marker(mart: str) -> str:
    """The `entity` column of a mart's markers and audit rows."""
    return f"mart:{mart}"


def batch_prefix(source: str, table: str, batch_id: str) -> str:
    return f"{source}/{table}/batch={batch_id}/"


def range_subdir(index: int) -> str:
    return f"range={index:03d}/"


def check_name(name: str, what: str = "name") -> str:
    """Validate a database/table name from configuration: plain identifiers only."""
    if not _IDENTIFIER.fullmatch(name):  # `$` alone would let a trailing newline through
        raise ConfigError(f"invalid {what} {name!r}: use letters, digits and _ only")
    return name


def column_name_problem(name: str) -> str | None:
    """Why a source field cannot be a raw column, or None; such a field lands in `_extra`."""
    if not name:
        return "an empty name"
    if "\x00" in name:
        return "a NUL character"
    if name in RAW_META_COLUMNS or name == EXTRA_COLUMN:
        return "a name the raw table reserves for its own column"
    escaped = sum(1 if byte in _PLAIN_BYTES else 3 for byte in name.encode())
    if escaped > MAX_ESCAPED_COLUMN_NAME:
        return f"a name too long for a column file ({escaped} > {MAX_ESCAPED_COLUMN_NAME} bytes)"
    return None
