"""MongoDB change streams, the server side: pin, open from a token, read up to the pin.

What the server does decides every rule here (measured on SecantusDB 0.7 and written for
mongod 6+ as well; docs of each rule: README, "Change streams"):
- the pin is `ping`'s `operationTime`: every write acknowledged before it is at or before it;
- a read stops at the first event after the pin, or after a getMore that returned nothing
  when the postBatchResumeToken reached the pin or did not move (the server's clock moves
  without writes, so waiting for an event after the pin could wait forever); the token of the
  aggregate's own reply is never trusted (SecantusDB stamps it with the current time even
  when events wait behind 200 oplog entries of other collections);
- history lost is error 286 at `watch()`, a standalone server error 40573; resuming is always
  after a token (`startAtOperationTime` older than the oplog is silently accepted by
  SecantusDB, losing the changes in between, and costs a scan of the whole oplog).
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from queue import Full, Queue
from typing import Any

from pipeline.extract.change_events import timestamp_key, token_cluster_time
from pipeline.extract.documents import MongoSourceError

HISTORY_LOST = 286  # ChangeStreamHistoryLost
NOT_A_REPLICA_SET = 40573  # IllegalOperation: $changeStream on a standalone server
# every empty getMore waits this long on SecantusDB (1 s unset; mongod: until an event); a
# shorter wait only moves an event being written at the pin to the next batch
MAX_AWAIT_MS = 5
BATCH_SIZE = 1_000  # the server sends at most 200 events per getMore anyway


class HistoryLost(MongoSourceError):
    """The resume point is no longer in the oplog: only a full scan can recover."""


class NotReplicaSet(MongoSourceError):
    """The server is a standalone: no oplog, so no change streams."""


def classify(exc: Exception, namespace: str) -> MongoSourceError:
    """The driver's error as one the pipeline acts on (others: a retriable read failure)."""
    code = getattr(exc, "code", None)
    if code == HISTORY_LOST:
        return HistoryLost(
            f"MongoDB collection {namespace}: the resume point is no longer in the oplog"
            " (error 286, ChangeStreamHistoryLost)"
        )
    if code == NOT_A_REPLICA_SET:
        return NotReplicaSet(
            f"MongoDB collection {namespace}: the server is not a replica set (error 40573),"
            " so it has no change streams"
        )
    return MongoSourceError(
        f"MongoDB collection {namespace}: change stream failed: {exc}", retriable=True
    )


def pin_cluster_time(client: Any, namespace: str) -> int:
    """The cluster time a batch reads up to: the `operationTime` of a `ping`."""
    from bson import Timestamp

    pin = client.admin.command("ping").get("operationTime")
    if not isinstance(pin, Timestamp):
        raise NotReplicaSet(
            f"MongoDB collection {namespace}: the server reports no operationTime: it is not a"
            " replica set, so it has no change streams"
        )
    return timestamp_key(pin)


def start_token(collection: Any) -> dict[str, Any]:
    """A resume token at the server's visibility point, taken before a full scan starts:
    every change the scan may miss or see half-way comes after it."""
    from pymongo.errors import OperationFailure

    try:
        with collection.watch(max_await_time_ms=MAX_AWAIT_MS) as stream:
            token = stream.resume_token
    except OperationFailure as exc:
        raise classify(exc, collection.full_name) from exc
    if token is None:
        raise MongoSourceError(f"MongoDB collection {collection.full_name}: no resume token")
    return dict(token)


def pre_images_enabled(collection: Any) -> bool:
    """Whether the collection keeps pre-images; one listCollections also says it exists.

    Asking for pre-images where the collection keeps none still costs SecantusDB a lookup
    per event (a third of the read rate), so they are asked for only where it keeps them.
    """
    for info in collection.database.list_collections(filter={"name": collection.name}):
        images = (info.get("options") or {}).get("changeStreamPreAndPostImages") or {}
        return bool(images.get("enabled"))
    raise MongoSourceError(
        f"MongoDB collection {collection.full_name} does not exist"
        " (check `collection` of the entity and CDC_MONGO_DB)"
    )


def open_stream(collection: Any, token: Mapping[str, Any], pre_images: bool) -> Any:
    """A change stream resuming after `token`; history lost and standalone are classified."""
    from pymongo.errors import OperationFailure

    options: dict[str, Any] = {
        "resume_after": token,
        "max_await_time_ms": MAX_AWAIT_MS,
        "batch_size": BATCH_SIZE,
    }
    if pre_images:
        options["full_document_before_change"] = "whenAvailable"
    try:
        return collection.watch(**options)
    except OperationFailure as exc:
        raise classify(exc, collection.full_name) from exc


@dataclass
class Progress:
    """How far a pinned read has got: `resume` is the token to store once the load commits
    (the last event's, or a later postBatchResumeToken the server confirmed nothing at or
    before the pin came before, so a quiet collection's token keeps up with the oplog)."""

    pin: int
    resume: dict[str, Any]
    events: int = 0
    last_wall: datetime | None = None


def read_to_pin(stream: Any, progress: Progress) -> Iterator[Mapping[str, Any]]:
    """Raw change documents at or before the pin (see the module docstring for the stops)."""
    pin = progress.pin
    before = stream.resume_token
    while True:
        raw = stream.try_next()
        if raw is None:
            if not stream.alive:
                return
            token = stream.resume_token
            if token == before:
                return
            progress.resume = dict(token)
            before = token
            at = token_cluster_time(token)
            if at is not None and at >= pin:
                return
            continue
        if timestamp_key(raw["clusterTime"]) > pin:
            return
        before = raw["_id"]
        progress.resume = dict(before)
        progress.events += 1
        if isinstance(raw.get("wallTime"), datetime):
            progress.last_wall = raw["wallTime"]
        yield raw
        if raw["operationType"] == "invalidate":
            return


def prefetch(items: Iterable[Any], size: int, depth: int = 2) -> Generator[list[Any], None, None]:
    """`items` in chunks of `size`, read ahead in a thread, so the server's replies and the
    socket waits overlap the caller's work (pymongo releases the GIL while it waits). Closing
    the generator stops the thread within one chunk."""
    queue: Queue[Any] = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            iterator = iter(items)
            while chunk := list(islice(iterator, size)):
                if not put(chunk):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=produce, name="changestream-prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class OplogWindow:
    """The oldest and newest oplog entries: a token older than `first` is lost."""

    first: int
    last: int
    first_wall: datetime | None
    last_wall: datetime | None


def oplog_window(client: Any) -> OplogWindow | None:
    """First and last entry of local.oplog.rs; None where it cannot be read.

    Expensive on SecantusDB (each find decodes the whole oplog, ~5 s per 100K entries), so
    only `status` calls it, never a batch.
    """
    from pymongo.errors import PyMongoError

    oplog = client.local["oplog.rs"]
    try:
        first = oplog.find_one({}, {"ts": 1, "wall": 1}, sort=[("$natural", 1)])
        last = oplog.find_one({}, {"ts": 1, "wall": 1}, sort=[("$natural", -1)])
    except PyMongoError:
        return None
    if first is None or last is None:
        return None
    return OplogWindow(
        timestamp_key(first["ts"]), timestamp_key(last["ts"]), first.get("wall"), last.get("wall")
    )
