"""MongoDB `mode = changestream`: each batch reads what changed, not the collection.

A batch resumes the collection's change stream after the token stored with the last loaded
batch and reads up to a cluster time pinned when it starts; it stages one row per event (see
`change_rows`), each with the document's state at that event (`change_events`), and reports
the token to resume from as the window's `upper`. The framework stores it only after the raw
load has committed, so a crash re-reads the same events and the rerun loads them once.

Whole re-reads: the first batch records a start token, then scans the collection (in `_id`
ranges with `partitions`); the next batch replays from that token the changes made during
the scan. When the token has left the oplog (error 286) the entity takes one full-scan batch
and a new start token, and says so to `CDC_ALERT_WEBHOOK`; on a standalone server (no change
streams) every batch is a full scan, said once per process. Nothing is skipped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline import notify
from pipeline.core.errors import ConfigError
from pipeline.extract.base import CaptureStatus, Read
from pipeline.extract.change_events import Normaliser, cluster_text, keys_needing_state
from pipeline.extract.change_reader import (
    HistoryLost,
    NotReplicaSet,
    OplogWindow,
    Progress,
    classify,
    open_stream,
    oplog_window,
    pin_cluster_time,
    pre_images_enabled,
    prefetch,
    read_to_pin,
    start_token,
)
from pipeline.extract.change_rows import Collector, Position, events_to_batch, with_scan_meta
from pipeline.extract.change_state import RawStates
from pipeline.extract.documents import FieldMapping, coalesce
from pipeline.extract.mongo import (
    MongoSource,
    connect,
    dump_bounds,
    load_bounds,
    plan_ranges,
    require_collection,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("pipeline")

# raw events read ahead, and their keys looked up in the warehouse, at a time: each lookup
# reads the raw table's `_id` column, so few and large (a chunk holds a few MB of events)
EVENTS_PER_CHUNK = 10_000
RANGE_SEQ = 1 << 40  # `_seq` of range i of a partitioned scan starts at i * RANGE_SEQ
RESYNC = (
    "to start again from a full scan of the collection as it is now, clear the entity's"
    " position: ALTER TABLE {db}._cdc_state DELETE WHERE entity = '{entity}' (README,"
    " Change streams)"
)
_STANDALONE_SAID: set[str] = set()


class MongoChangeStreamSource(MongoSource):
    """A collection read through its change stream (full scans only to start or recover)."""

    modes = ("changestream",)

    @property
    def namespace(self) -> str:
        return f"{self.settings.mongo_db}.{self.entity.object_name}"

    def _mapping(self) -> FieldMapping:
        return FieldMapping(self.entity.fields, self.entity.flatten)

    def _require_id_key(self) -> None:
        if self.entity.unique_key != ("_id",):
            raise ConfigError(
                f"[entity.{self.entity.name}]: mode = changestream keys history by the"
                " document's _id (a change stream names the document by it): set"
                " unique_key = _id",
                entity=self.entity.name,
            )

    # -- a batch -----------------------------------------------------------------------------

    def read(self) -> Read:
        self._require_id_key()
        position = Position.parse(self.context.position)
        client = connect(self.settings.mongo_uri)
        try:
            collection = client[self.settings.mongo_db][self.entity.object_name]
            pre_images = pre_images_enabled(collection)  # and refuses a missing collection
            if position is None or position.token is None:
                return self._whole(client, collection, position)
            try:
                pin = pin_cluster_time(client, self.namespace)
                stream = open_stream(collection, position.token, pre_images)
            except HistoryLost as exc:
                self._alert(f"{exc}: {self.entity.name} takes one full-scan batch now")
                return self._whole(client, collection, position)
            except NotReplicaSet:
                return self._whole(client, collection, position)
        except BaseException:
            client.close()
            raise
        window: dict[str, str | None] = {"lower": self.context.position, "upper": None}
        batches = self._changes(client, stream, position, pin, window)
        return Read(self.checked_at_end(coalesce(batches, self.settings.batch_rows)), window, False)

    def _changes(
        self, client: Any, stream: Any, position: Position, pin: int, window: dict[str, Any]
    ) -> Iterator[pa.RecordBatch]:
        """The events in (token, pin] as raw rows; `window["upper"]` is set at the end (the
        manifest is written after the rows, so it carries the position to resume from)."""
        from pymongo.errors import PyMongoError

        assert position.token is not None and position.scan is not None
        assert self.context.warehouse is not None, "a change source needs the warehouse"
        states = RawStates(
            self.context.warehouse(),
            self.settings.database,
            self.entity,
            position.scan,
            self._mapping(),
        )
        normaliser = Normaliser(self.namespace, states.difference, position.replay_until)
        collector, fields, seq = Collector(), ["_id"], 1
        progress = Progress(pin, dict(position.token))
        try:
            with closing(prefetch(read_to_pin(stream, progress), EVENTS_PER_CHUNK)) as chunks:
                for chunk in chunks:
                    wanted = keys_needing_state(chunk, normaliser.known_keys)
                    if wanted:
                        normaliser.remember(states.lookup(wanted))
                    for staged in collector.add(normaliser.apply(raw) for raw in chunk):
                        yield events_to_batch(
                            staged, self.entity.object_name, fields, self._mapping(), seq
                        )
                        seq += len(staged)
            rest = collector.flush()
            if rest:
                yield events_to_batch(rest, self.entity.object_name, fields, self._mapping(), seq)
        except PyMongoError as exc:
            failure = classify(exc, self.namespace)
            failure.retriable = True  # history lost mid-read: the rerun takes the full scan
            raise failure from exc
        finally:
            stream.close()
            client.close()
        last = progress.last_wall.astimezone(UTC).isoformat() if progress.last_wall else None
        window["upper"] = position.after(progress.resume, pin, last).dump()

    # -- whole re-reads ----------------------------------------------------------------------

    def _start(self, collection: Any) -> dict[str, Any] | None:
        """The token a full scan's batch resumes from next, taken before the scan; None on a
        standalone server (said once per process)."""
        try:
            return start_token(collection)
        except NotReplicaSet as exc:
            if self.entity.name not in _STANDALONE_SAID:
                _STANDALONE_SAID.add(self.entity.name)
                self._alert(f"{exc}: {self.entity.name} is read by full scans instead")
            return None

    def _whole(self, client: Any, collection: Any, previous: Position | None) -> Read:
        start = self._start(collection)
        window: dict[str, str | None] = {"lower": self.context.position, "upper": None}
        scanned = self._scanned(client, start, previous, window)
        return Read(self.checked_at_end(scanned), window, True)

    def _scanned(
        self,
        client: Any,
        start: dict[str, Any] | None,
        previous: Position | None,
        window: dict[str, Any],
    ) -> Iterator[pa.RecordBatch]:
        seq = 1
        try:
            for batch in self._scan():
                yield with_scan_meta(batch, seq)
                seq += batch.num_rows
            window["upper"] = self._scan_position(client, start, previous).dump()
        finally:
            client.close()

    def _scan_position(
        self, client: Any, start: dict[str, Any] | None, previous: Position | None
    ) -> Position:
        """Where the stream continues after a whole scan: from the token taken before it,
        replaying what changed up to the pin taken after it."""
        last = previous.last_event if previous else None
        if start is None:
            return Position(scan=self.context.batch_id, standalone=True, last_event=last)
        pin = pin_cluster_time(client, self.namespace)
        return Position(start, self.context.batch_id, pin, pin, last)

    def partitions(self) -> int:
        """Only the bootstrap scan is partitioned; later batches read the stream."""
        return self.entity.partitions if self.context.position is None else 1

    def plan_ranges(self) -> tuple[bytes, int]:
        """The `_id` bounds, and the start token taken before any range is scanned."""
        self._require_id_key()
        cfg = self.settings
        client = connect(cfg.mongo_uri)
        try:
            require_collection(client, cfg.mongo_db, self.entity.object_name)
            start = self._start(client[cfg.mongo_db][self.entity.object_name])
        finally:
            client.close()
        bounds = plan_ranges(
            cfg.mongo_uri, cfg.mongo_db, self.entity.object_name, self.partitions()
        )
        return dump_bounds([bounds, start]), len(bounds) + 1

    def read_range(self, plan: bytes, index: int) -> Iterator[pa.RecordBatch]:
        bounds, _ = load_bounds(plan)
        if index > len(bounds):
            return
        lower = bounds[index - 1] if index > 0 else None
        upper = bounds[index] if index < len(bounds) else None
        seq = index * RANGE_SEQ + 1
        for batch in self._scan(lower, upper):
            yield with_scan_meta(batch, seq)
            seq += batch.num_rows

    def ranges_window(self, plan: bytes) -> tuple[dict[str, str | None], bool | None]:
        """The window of a batch scanned in ranges (after they all finished): it is whole."""
        _, start = load_bounds(plan)
        client = connect(self.settings.mongo_uri)
        try:
            position = self._scan_position(client, start, None)
        finally:
            client.close()
        return {"lower": self.context.position, "upper": position.dump()}, True

    # -- operators ---------------------------------------------------------------------------

    def _alert(self, text: str) -> None:
        """A warning in the log and to CDC_ALERT_WEBHOOK: something a person should know."""
        log.warning("%s", text)
        notify.send(self.context.batch_id, f"Extract {self.entity.name}", text)

    def acknowledge(self, position: str) -> None:
        """Nothing to tell the server: the stored position is the acknowledgement."""
        return None

    def status(self) -> list[CaptureStatus]:
        name = f"{self.namespace} (change stream)"
        position = Position.parse(self.context.position)
        if position is None:
            return [
                CaptureStatus(
                    self.entity.name,
                    name,
                    "-",
                    "-",
                    "not started: the next batch bootstraps with a full scan",
                )
            ]
        if position.standalone:
            note = "standalone server: every batch is a full scan (no change streams)"
            return [CaptureStatus(self.entity.name, name, "-", "-", note)]
        client = connect(self.settings.mongo_uri)
        try:
            window = oplog_window(client)
        finally:
            client.close()
        now = datetime.now(UTC)
        return [
            CaptureStatus(
                self.entity.name,
                name,
                _lag(position, now),
                _holds(window),
                _warning(position, window),
            )
        ]


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _lag(position: Position, now: datetime) -> str:
    """How far the loaded history is behind: the pin read up to, and the newest event."""
    parts = []
    if position.pin is not None:
        parts.append(
            f"read to {cluster_text(position.pin)} ({_ago(now.timestamp() - (position.pin >> 32))})"
        )
    if position.last_event:
        at = datetime.fromisoformat(position.last_event)
        parts.append(f"last event {at:%Y-%m-%d %H:%M:%S} UTC ({_ago((now - at).total_seconds())})")
    return "; ".join(parts) or "-"


def _holds(window: OplogWindow | None) -> str:
    if window is None:
        return "oplog not readable"
    hours = ((window.last >> 32) - (window.first >> 32)) / 3600
    return f"oplog {cluster_text(window.first)} .. {cluster_text(window.last)} ({hours:.1f}h)"


def _warning(position: Position, window: OplogWindow | None) -> str:
    """History lost (the next batch falls back to a full scan), or soon: the resume point is
    in the oldest quarter of the oplog."""
    if window is None or position.pin is None:
        return ""
    if window.first > position.pin:
        return "history lost: the resume point left the oplog; the next batch takes a full scan"
    if position.pin - window.first < (window.last - window.first) / 4:
        return (
            "the resume point is in the oldest quarter of the oplog: run batches more often"
            " or give the oplog more room (README, Change streams)"
        )
    return ""
