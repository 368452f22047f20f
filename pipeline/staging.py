"""Parquet staging on S3/MinIO or local files: where Extract writes and Load reads.

A batch lives under `<source>/<table>/batch=<id>/` as `part-NNNNN.parquet` files (zstd) plus a
`_manifest.json` written last (`pipeline.core.manifest`). The manifest is the proof that the
batch is complete: the staging Target exists only when it does, so a crashed extract is simply
redone. Neither stage owns this module; both speak through what it stores.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from pipeline.core.errors import StagingError
from pipeline.core.manifest import Manifest
from pipeline.core.names import MANIFEST, batch_prefix

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.config import Settings


class Store(Protocol):
    """The five operations staging needs from an object store."""

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, keys: Iterable[str]) -> None: ...


class LocalStore:
    """file:///path: a directory; writes go to a temp file + rename, so readers see whole files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError as exc:
            raise StagingError(f"{self.url}: {key} not found") from exc

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            (self.root / key).unlink(missing_ok=True)


class S3Store:
    """s3://bucket/prefix/ through the minio client (MinIO, SeaweedFS, AWS S3)."""

    def __init__(self, client: Any, bucket: str, prefix: str, endpoint: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix} at {endpoint}"

    def put(self, key: str, data: bytes) -> None:
        self._call(
            "put",
            key,
            self.client.put_object,
            self.bucket,
            self.prefix + key,
            io.BytesIO(data),
            len(data),
        )

    def get(self, key: str) -> bytes:
        response = self._call("get", key, self.client.get_object, self.bucket, self.prefix + key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self.prefix + key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise StagingError(f"{self.url}: cannot stat {key}: {exc.code} {exc.message}") from exc
        except Exception as exc:
            raise StagingError(f"{self.url}: cannot stat {key}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        objects = self._call(
            "list",
            prefix,
            self.client.list_objects,
            self.bucket,
            prefix=self.prefix + prefix,
            recursive=True,
        )
        return sorted(o.object_name.removeprefix(self.prefix) for o in objects)

    def delete(self, keys: Iterable[str]) -> None:
        from minio.deleteobjects import DeleteObject

        errors = self.client.remove_objects(
            self.bucket, [DeleteObject(self.prefix + k) for k in keys]
        )
        for error in errors:
            raise StagingError(f"{self.url}: cannot delete {error.name}: {error.message}")

    def _call(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from minio.error import S3Error

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            raise StagingError(
                f"{self.url}: {what} {key} failed: {exc.code} {exc.message}"
            ) from exc
        except Exception as exc:  # the connection, not the object: a rerun may succeed
            raise StagingError(f"{self.url}: {what} {key} failed: {exc}", retriable=True) from exc


def open_store(settings: Settings) -> Store:
    """The store CDC_STAGING_URL names; S3 buckets are checked so a wrong name fails early."""
    url = settings.staging_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStore(Path(parts.path))
    if parts.scheme == "s3":
        from minio import Minio

        client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
        )
        bucket = parts.netloc
        prefix = parts.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        store = S3Store(client, bucket, prefix, settings.s3_endpoint)
        try:
            found = client.bucket_exists(bucket)
        except Exception as exc:
            raise StagingError(
                f"staging S3 endpoint {settings.s3_endpoint} (CDC_S3_ENDPOINT) unreachable: {exc}",
                retriable=True,
            ) from exc
        if not found:
            raise StagingError(
                f"staging bucket {bucket!r} (CDC_STAGING_URL={url}) does not exist at "
                f"{settings.s3_endpoint}"
            )
        return store
    raise StagingError(f"CDC_STAGING_URL must start with s3:// or file://, got {url!r}")


class _PartWriter:
    """One Parquet part being written: batches are compressed as they arrive, so memory holds
    the compressed part plus one record batch, not the part's raw rows."""

    def __init__(self, schema: pa.Schema) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = schema
        self.rows = 0
        self._sink = pa.BufferOutputStream()
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> bytes:
        self._writer.close()
        return self._sink.getvalue().to_pybytes()


def write_batch(
    store: Store,
    manifest: Manifest,
    batches: Iterable[pa.RecordBatch],
    part_rows: int = 500_000,
    subdir: str = "",
) -> Manifest:
    """Stream record batches into parts, then write the manifest last.

    A part closes when it reaches `part_rows` or when the schema changes (drift), so each part
    has one schema. Part keys are relative to the batch prefix, so range manifests (`subdir`)
    can be merged into the batch's.
    """
    import xxhash

    prefix = batch_prefix(manifest.source, manifest.table, manifest.batch_id)
    stale = [k for k in store.list(prefix + subdir) if "/" not in k[len(prefix + subdir) :]]
    if stale:
        store.delete(stale)
    part: _PartWriter | None = None

    def flush() -> None:
        nonlocal part
        if part is None:
            return
        data = part.close()
        key = f"{subdir}part-{len(manifest.parts):05d}.parquet"
        store.put(prefix + key, data)
        manifest.parts.append(
            {
                "key": key,
                "rows": part.rows,
                "bytes": len(data),
                "xxh64": xxhash.xxh64_hexdigest(data),
                "schema": part.schema.to_string(show_schema_metadata=False),
                "columns": part.schema.names,
            }
        )
        manifest.rows += part.rows
        part = None

    for batch in batches:
        if batch.num_rows == 0:
            continue
        if part is not None and not batch.schema.equals(part.schema):
            flush()
        if part is None:
            part = _PartWriter(batch.schema)
        part.write(batch)
        if part.rows >= part_rows:
            flush()
    flush()
    store.put(prefix + subdir + MANIFEST, manifest.to_json())
    return manifest


def merge_manifests(store: Store, manifest: Manifest, ranges: Iterable[Manifest]) -> Manifest:
    """Write the batch manifest listing the parts of every range manifest, in range order."""
    for part_manifest in ranges:
        manifest.parts.extend(part_manifest.parts)
        manifest.rows += part_manifest.rows
    prefix = batch_prefix(manifest.source, manifest.table, manifest.batch_id)
    store.put(prefix + MANIFEST, manifest.to_json())
    return manifest


def read_manifest(store: Store, prefix: str) -> Manifest:
    """The manifest under `prefix` (a batch's, or one range's or key list's of it)."""
    return Manifest.from_json(store.get(prefix + MANIFEST))


def manifest_exists(store: Store, prefix: str) -> bool:
    return store.exists(prefix + MANIFEST)


def read_parts(store: Store, manifest: Manifest) -> Iterator[pa.Table]:
    """Yield the batch's rows one Parquet row group at a time (one source record batch each).

    Each part's checksum and row count are checked against the manifest before any of its rows
    is yielded; memory holds one compressed part and one row group, not a decoded part.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    prefix = batch_prefix(manifest.source, manifest.table, manifest.batch_id)
    for part in manifest.parts:
        data = store.get(prefix + part["key"])
        if xxhash.xxh64_hexdigest(data) != part["xxh64"]:
            raise StagingError(
                f"{store.url}: {prefix}{part['key']} checksum mismatch: the staged file is damaged"
            )
        parquet = pq.ParquetFile(pa.BufferReader(data))
        if parquet.metadata.num_rows != part["rows"]:
            raise StagingError(
                f"{store.url}: {prefix}{part['key']} has {parquet.metadata.num_rows} rows, "
                f"manifest says {part['rows']}"
            )
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group)


def staged_batches(store: Store, source: str, table: str) -> dict[str, list[str]]:
    """Batch id -> its object keys, for one entity."""
    batches: dict[str, list[str]] = {}
    root = f"{source}/{table}/batch="
    for key in store.list(f"{source}/{table}/"):
        if key.startswith(root):
            batch_id = key[len(root) :].split("/", 1)[0]
            batches.setdefault(batch_id, []).append(key)
    return batches


def prune(
    store: Store, source: str, table: str, expired: Callable[[str], bool], keep: str
) -> list[str]:
    """Delete the staged batches `expired` says are past retention (never `keep`)."""
    pruned = []
    for batch_id, keys in sorted(staged_batches(store, source, table).items()):
        if batch_id != keep and expired(batch_id):
            store.delete(sorted(keys, key=lambda k: k.endswith(MANIFEST), reverse=True))
            pruned.append(batch_id)
    return pruned
