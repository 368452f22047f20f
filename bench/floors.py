"""Floors: the fastest plain reads of the same data into Arrow, and the Parquet write to S3.

Runs in `.bench/floors` (pinned to the project's pyarrow/pymongo versions, plus pymongoarrow and
the ADBC PostgreSQL driver), one method per process, and imports nothing from the project: a
floor is what a bare driver does, so it must not share code with what it is compared to.

    python bench/floors.py METHOD --out RESULT.json [options]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
NUMERIC_OID = 1700


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


def mongo_collection(args: argparse.Namespace, **options: Any) -> Any:
    import pymongo

    client = pymongo.MongoClient(args.mongo_uri, **options)
    return client[args.mongo_db][args.collection]


def mongo_list(args: argparse.Namespace) -> dict[str, Any]:
    """Reference only (no Arrow): what the server and BSON decoding cost by themselves."""
    docs = list(mongo_collection(args).find({}))
    return {"rows": len(docs)}


def _pylist_table(args: argparse.Namespace) -> Any:
    import pyarrow as pa

    docs = list(mongo_collection(args).find({}))
    for doc in docs:
        doc["_id"] = str(doc["_id"])
    return pa.Table.from_pylist(docs)


def mongo_pylist(args: argparse.Namespace) -> dict[str, Any]:
    """pymongo `list(find())`, `_id` as text, then `pa.Table.from_pylist`."""
    return {"rows": _pylist_table(args).num_rows}


def mongo_pymongoarrow(args: argparse.Namespace) -> dict[str, Any]:
    """pymongoarrow decodes BSON straight into Arrow (schema inferred from the first document)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from pymongoarrow.api import find_arrow_all
    table = find_arrow_all(mongo_collection(args), {})
    abi = [str(w.message) for w in caught if "binary incompatibility" in str(w.message)]
    return {"rows": table.num_rows, "extra": {"abi_warnings": len(abi), "abi_sample": abi[:1]}}


def parquet_s3(args: argparse.Namespace) -> dict[str, Any]:
    """The MongoDB collection read (untimed), then its staging write and read back, timed."""
    return _staging_write(args, _pylist_table(args), args.collection)


def pg_parquet_s3(args: argparse.Namespace) -> dict[str, Any]:
    """The PostgreSQL window read by COPY (untimed), then its staging write, timed."""
    return _staging_write(args, _copy_table(args), args.table)


def _staging_write(args: argparse.Namespace, table: Any, name: str) -> dict[str, Any]:
    """Time Arrow -> Parquet (zstd) -> S3 (`inside`), then S3 -> Parquet -> Arrow (`read_s`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from minio import Minio

    client = Minio(
        args.s3_endpoint, access_key=args.s3_key, secret_key=args.s3_secret, secure=False
    )
    key = f"{args.s3_prefix}floor/{name}.parquet"
    begin = time.perf_counter()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    encoded = time.perf_counter()
    client.put_object(args.s3_bucket, key, io.BytesIO(data), len(data))
    written = time.perf_counter()
    response = client.get_object(args.s3_bucket, key)
    try:
        fetched = response.read()
    finally:
        response.close()
        response.release_conn()
    back = pq.read_table(pa.BufferReader(fetched))
    read = time.perf_counter()
    client.remove_object(args.s3_bucket, key)
    return {
        "inside": written - begin,
        "rows": back.num_rows,
        "extra": {
            "encode_s": encoded - begin,
            "put_s": written - encoded,
            "read_s": read - written,
            "bytes": len(data),
        },
    }


def _window_sql(args: argparse.Namespace) -> str:
    """The same window predicate as the pipeline's incremental read (literals we produced)."""
    upper = datetime.fromisoformat(args.upper).isoformat()
    where = f"updated_at <= '{upper}'"
    if args.lower:
        where = f"updated_at > '{datetime.fromisoformat(args.lower).isoformat()}' AND {where}"
    else:
        where = f"({where} OR updated_at IS NULL)"
    return f"SELECT * FROM {args.table} WHERE {where}"


def pg_cursor(args: argparse.Namespace) -> dict[str, Any]:
    """psycopg2 server-side cursor, 50K rows a fetch, columns -> `pa.array`."""
    import psycopg2
    import pyarrow as pa

    conn = psycopg2.connect(args.postgres_dsn)
    try:
        with conn.cursor(name="floor") as cur:
            cur.itersize = 50_000
            cur.execute(_window_sql(args))
            batches = []
            while rows := cur.fetchmany(50_000):
                names = [d.name for d in cur.description]
                batches.append(
                    pa.record_batch([pa.array(col) for col in zip(*rows, strict=True)], names)
                )
        conn.rollback()
    finally:
        conn.close()
    return {"rows": sum(b.num_rows for b in batches)}


def pg_copy(args: argparse.Namespace) -> dict[str, Any]:
    """`COPY (SELECT ...) TO STDOUT` as CSV, parsed by Arrow's multithreaded CSV reader."""
    table = _copy_table(args)
    return {"rows": table.num_rows, "extra": {"schema": str(table.schema).replace("\n", "; ")}}


def _copy_table(args: argparse.Namespace) -> Any:
    import psycopg2
    import pyarrow as pa
    import pyarrow.csv as csv

    conn = psycopg2.connect(args.postgres_dsn)
    try:
        buffer = io.BytesIO()
        with conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
            cur.copy_expert(f"COPY ({_window_sql(args)}) TO STDOUT WITH (FORMAT csv)", buffer)
            cur.execute(_window_sql(args) + " LIMIT 0")
            names = [d.name for d in cur.description]
            # numeric stays exact (decimal), as in the pipeline; the rest is inferred
            types = {
                d.name: pa.decimal128(d.precision, d.scale)
                for d in cur.description
                if d.type_code == NUMERIC_OID and d.precision
            }
    finally:
        conn.close()
    buffer.seek(0)
    return csv.read_csv(
        buffer,
        read_options=csv.ReadOptions(column_names=names),
        convert_options=csv.ConvertOptions(
            column_types=types,
            timestamp_parsers=["%Y-%m-%d %H:%M:%S%z", csv.ISO8601],
            strings_can_be_null=True,
        ),
    )


def pg_adbc(args: argparse.Namespace) -> dict[str, Any]:
    """The ADBC PostgreSQL driver: COPY BINARY decoded into Arrow in C++."""
    import adbc_driver_postgresql.dbapi as adbc

    with adbc.connect(args.postgres_dsn) as conn, conn.cursor() as cur:
        cur.execute(_window_sql(args))
        table = cur.fetch_arrow_table()
    return {"rows": table.num_rows}


def _replication(args: argparse.Namespace) -> Any:
    import psycopg2
    import psycopg2.extras

    return psycopg2.connect(
        args.postgres_dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )


def pg_slot(args: argparse.Namespace) -> dict[str, Any]:
    """Not a floor: the decoding floor's own publication and slot, made before the changes it
    is to read (so it reads exactly what the pipeline's slot holds for the same batch)."""
    import psycopg2

    conn = psycopg2.connect(args.postgres_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (args.slot,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE PUBLICATION "{args.slot}" FOR TABLE {args.table}')
    conn.close()
    replication = _replication(args)
    with replication.cursor() as cur:
        cur.execute(f'CREATE_REPLICATION_SLOT "{args.slot}" LOGICAL pgoutput NOEXPORT_SNAPSHOT')
    replication.close()
    return {"rows": 0}


def pg_decode(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding floor: every change the slot holds up to now, as pgoutput messages read by
    psycopg2's `read_message()` loop (a 5 ms nap when the socket is empty, as the pipeline
    does), counted by their first byte; nothing decoded, nothing kept. `inside` is the read
    alone; the slot is dropped afterwards."""
    import select
    import struct

    import psycopg2

    conn = psycopg2.connect(args.postgres_dsn)
    with conn.cursor() as cur:  # the pin: an LSN every committed change lies below, flushed
        cur.execute("SELECT pg_current_wal_insert_lsn()::text, pg_current_xact_id()")
        high, low = cur.fetchone()[0].split("/")
    conn.commit()
    pin = (int(high, 16) << 32) | int(low, 16)
    replication = _replication(args)
    cur = replication.cursor()
    begin = time.perf_counter()
    cur.start_replication(
        slot_name=args.slot,
        decode=False,
        status_interval=365 * 24 * 3600.0,
        options={"proto_version": "1", "publication_names": args.slot},
    )
    changes, in_transaction, read = 0, False, cur.read_message
    row_kinds, begin_kind, commit_kind = frozenset(b"IUD"), ord("B"), ord("C")
    while True:
        msg = read()
        if msg is None:
            if not in_transaction and cur.wal_end >= pin:
                break
            time.sleep(0.005)
            select.select([cur], [], [], 1.0)
            continue
        kind = msg.payload[0]
        if kind in row_kinds:
            changes += 1
        elif kind == begin_kind:
            if struct.unpack_from("!Q", msg.payload, 1)[0] >= pin:
                break
            in_transaction = True
        elif kind == commit_kind:
            in_transaction = False
            if struct.unpack_from("!Q", msg.payload, 10)[0] >= pin:
                break
    inside = time.perf_counter() - begin
    replication.close()
    with conn.cursor() as drop:
        for _ in range(100):  # the walsender lets the slot go a moment after we closed
            try:
                drop.execute("SELECT pg_drop_replication_slot(%s)", (args.slot,))
                break
            except psycopg2.errors.ObjectInUse:
                conn.rollback()
                time.sleep(0.1)
    conn.commit()
    conn.close()
    return {"inside": inside, "rows": changes}


METHODS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "mongo_list": mongo_list,
    "mongo_pylist": mongo_pylist,
    "mongo_pymongoarrow": mongo_pymongoarrow,
    "parquet_s3": parquet_s3,
    "pg_parquet_s3": pg_parquet_s3,
    "pg_cursor": pg_cursor,
    "pg_copy": pg_copy,
    "pg_adbc": pg_adbc,
    "pg_slot": pg_slot,
    "pg_decode": pg_decode,
}
# the libraries each method needs, imported before the clock starts (imports are not the floor)
IMPORTS = {
    "mongo_list": ("pymongo",),
    "mongo_pylist": ("pymongo", "pyarrow"),
    "mongo_pymongoarrow": ("pymongo", "pyarrow"),
    "parquet_s3": ("pymongo", "pyarrow", "pyarrow.parquet", "minio"),
    "pg_parquet_s3": ("psycopg2", "pyarrow", "pyarrow.csv", "pyarrow.parquet", "minio"),
    "pg_cursor": ("psycopg2", "pyarrow"),
    "pg_copy": ("psycopg2", "pyarrow", "pyarrow.csv"),
    "pg_adbc": ("adbc_driver_postgresql.dbapi", "pyarrow"),
    "pg_slot": ("psycopg2", "psycopg2.extras"),
    "pg_decode": ("psycopg2", "psycopg2.extras"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mongo-uri", default=os.environ.get("CDC_MONGO_URI"))
    parser.add_argument("--mongo-db", default=os.environ.get("CDC_MONGO_DB", "source"))
    parser.add_argument("--collection", default="users")
    parser.add_argument("--postgres-dsn", default=os.environ.get("CDC_POSTGRES_DSN"))
    parser.add_argument("--table", default="public.orders")
    parser.add_argument("--lower", help="ISO instant, exclusive; omitted = from the beginning")
    parser.add_argument("--upper", help="ISO instant, inclusive")
    parser.add_argument("--slot", default="bench_floor", help="pg_slot / pg_decode: its name")
    parser.add_argument("--s3-endpoint", default=os.environ.get("CDC_S3_ENDPOINT"))
    parser.add_argument("--s3-key", default=os.environ.get("CDC_S3_ACCESS_KEY"))
    parser.add_argument("--s3-secret", default=os.environ.get("CDC_S3_SECRET_KEY"))
    parser.add_argument("--s3-bucket", default="cdc-staging")
    parser.add_argument("--s3-prefix", default="bench/")
    args = parser.parse_args()
    import importlib

    for module in IMPORTS[args.method]:
        importlib.import_module(module)
    imported = time.perf_counter()
    result = METHODS[args.method](args)
    done = time.perf_counter()
    result.setdefault("inside", done - imported)
    result["import_s"] = imported - STARTED
    result["peak_kb"] = peak_rss_kb()
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
