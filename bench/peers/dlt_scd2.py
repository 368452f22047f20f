"""dlt's `scd2` merge fed Arrow tables, into DuckDB: the peer the users path is compared with.

Runs inside `.bench/dlt` (dlt pinned there), never in the project's environment, so it imports
nothing from the project. It reads the same MongoDB collection our pipeline reads, batches it
into Arrow exactly as a user of dlt would, and lets dlt detect changes on the same checked
columns as our users entity (`state`, `occupation`) through `row_version_column_name`.

    python bench/peers/dlt_scd2.py --mongo-uri URI --mongo-db DB --work DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

CHECK_COLS = ("state", "occupation")
VERSION_COLUMN = "_row_version"
BATCH_ROWS = 50_000


def peak_rss_kb() -> int | None:
    """This process's own high-water RSS (VmHWM).

    Not the parent's `wait4` figure: Linux carries the forking parent's RSS high-water mark
    over `exec`, so a small child of a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def arrow_batches(uri: str, database: str, collection: str) -> Iterator[Any]:
    """Documents -> Arrow tables of BATCH_ROWS rows; `_id` as text, like our extract."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pymongo

    with pymongo.MongoClient(uri) as client:
        docs: list[dict[str, Any]] = []
        for doc in client[database][collection].find({}, batch_size=BATCH_ROWS):
            doc["_id"] = str(doc["_id"])
            docs.append(doc)
            if len(docs) == BATCH_ROWS:
                yield _with_version(pa.Table.from_pylist(docs), pc)
                docs = []
        if docs:
            yield _with_version(pa.Table.from_pylist(docs), pc)


def _with_version(table: Any, pc: Any) -> Any:
    """The row version dlt compares: the key and the checked columns, unambiguously joined.

    dlt identifies scd2 records by this value alone, so it must include the key; NULLs are
    replaced by a marker that no real value carries.
    """
    parts = [table.column("_id")] + [pc.fill_null(table.column(c), "\x00") for c in CHECK_COLS]
    return table.append_column(VERSION_COLUMN, pc.binary_join_element_wise(*parts, "\x1f"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mongo-uri", required=True)
    parser.add_argument("--mongo-db", required=True)
    parser.add_argument("--collection", default="users")
    parser.add_argument("--work", type=Path, required=True, help="pipelines dir + DuckDB file")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    args.work.mkdir(parents=True, exist_ok=True)

    import dlt

    imported = time.perf_counter()

    @dlt.resource(
        name=args.collection,
        write_disposition={
            "disposition": "merge",
            "strategy": "scd2",
            "row_version_column_name": VERSION_COLUMN,
        },
    )
    def source_rows() -> Iterator[Any]:
        yield from arrow_batches(args.mongo_uri, args.mongo_db, args.collection)

    pipeline = dlt.pipeline(
        pipeline_name="bench_scd2",
        destination=dlt.destinations.duckdb(str(args.work / "peer.duckdb")),
        dataset_name="bench",
        pipelines_dir=str(args.work / "pipelines"),
    )
    pipeline.run(source_rows())
    done = time.perf_counter()

    import duckdb

    with duckdb.connect(str(args.work / "peer.duckdb"), read_only=True) as con:
        versions, current = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE _dlt_valid_to IS NULL)"
            f" FROM bench.{args.collection}"
        ).fetchone()
    result = {
        "inside": done - imported,
        "import_s": imported - STARTED,
        "rows": current,
        "extra": {"versions": versions, "current": current, "dlt": dlt.__version__},
        "peak_kb": peak_rss_kb(),
    }
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
