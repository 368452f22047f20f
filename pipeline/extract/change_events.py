"""MongoDB change events -> the document's state at each event (pure: no I/O).

A change stream gives the whole document only for inserts and replaces; an update carries a
diff (`updateDescription`), and neither `updateLookup` nor SecantusDB's post-images are the
document as of the event (both are the document when read). So an update's state is computed
here by applying its diff to the key's previous state: the key's previous event in the batch,
else what the warehouse holds for it. Pre-images, where the collection keeps them, are exact
on SecantusDB and mongod alike: they confirm that previous state, and a mismatch fails the
batch naming the collection and `_id` (a wrong base would corrupt every later version).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.extract.documents import MongoSourceError

Document = dict[str, Any]
DATA_OPERATIONS = frozenset({"insert", "update", "replace", "delete"})
INTERRUPTIONS = frozenset({"drop", "rename", "dropDatabase", "invalidate"})


class UpdateConflict(ValueError):
    """An update path does not fit the previous state (it crosses a scalar, or names a field
    of an array): the previous state is not the one the server updated."""


class ChangeCaptureError(MongoSourceError):
    """The history the batch would write is wrong; the message names the collection and `_id`."""


class PreImageMismatch(ChangeCaptureError):
    """The server's pre-image differs from the previous state the warehouse holds."""


class MissingPreviousState(ChangeCaptureError):
    """An update arrived for a key whose previous state nobody knows (and no pre-image)."""


# --- applying an updateDescription ---------------------------------------------------------

_MISSING = object()
_CONTAINERS = (dict, list)


class _Writer:
    """Copy-on-write walker: each container along a written path is copied once per update,
    so the previous state (shared with earlier events) is never mutated and untouched
    subtrees are shared rather than deep-copied, which would dominate the cost per event."""

    def __init__(self, root: Mapping[str, Any], overwrite: bool) -> None:
        self.root: Document = dict(root)
        self.owned: set[int] = {id(self.root)}
        self.overwrite = overwrite

    def _conflict(self, message: str) -> None:
        if not self.overwrite:
            raise UpdateConflict(message)

    @staticmethod
    def _key(node: Any, segment: str) -> Any:
        """The dict key or list index `segment` names in `node`, or None for a name on a list."""
        if isinstance(node, dict):
            return segment
        return int(segment) if segment.isdigit() else None

    @staticmethod
    def _child(node: Any, key: Any) -> Any:
        if isinstance(node, dict):
            return node.get(key, _MISSING)
        return node[key] if key < len(node) else _MISSING

    def _attach(self, node: Any, key: Any, value: Any) -> Any:
        if type(node) is list and key >= len(node):
            node.extend([None] * (key - len(node) + 1))
        node[key] = value
        if type(value) in _CONTAINERS:
            self.owned.add(id(value))
        return value

    def _own(self, node: Any, key: Any) -> Any:
        child = node[key]
        if id(child) in self.owned:
            return child
        return self._attach(node, key, dict(child) if isinstance(child, dict) else list(child))

    def _walk(self, path: str, create: bool) -> tuple[Any, Any] | None:
        """The container holding the last segment of `path` and its key there; None when
        there is nothing to do (a missing path without `create`, or a skipped conflict)."""
        *parents, last = path.split(".")
        node: Any = self.root
        for segment in parents:
            key = self._key(node, segment)
            if key is None:
                self._conflict(f"path {path!r}: {segment!r} is not an index of an array")
                return None
            child = self._child(node, key)
            if isinstance(child, dict | list):
                node = self._own(node, key)
                continue
            if child is not _MISSING:
                self._conflict(f"path {path!r}: {segment!r} holds a {type(child).__name__}")
            if not create:
                return None
            node = self._attach(node, key, {})
        key = self._key(node, last)
        if key is None:
            self._conflict(f"path {path!r}: {last!r} is not an index of an array")
            return None
        return node, key

    def set(self, path: str, value: Any) -> None:
        if "." not in path:  # a top-level field: the common case, and the root is owned
            self.root[path] = value
            return
        found = self._walk(path, create=True)
        if found is not None:
            self._attach(*found, value)

    def unset(self, path: str) -> None:
        found = self._walk(path, create=False)
        if found is None:
            return
        node, key = found
        if isinstance(node, dict):
            node.pop(key, None)
        elif key < len(node):
            node[key] = None  # $unset of an array element leaves a null, as on mongod

    def truncate(self, path: str, size: int) -> None:
        found = self._walk(path, create=False)
        array = _MISSING if found is None else self._child(*found)
        if found is None or not isinstance(array, list):
            self._conflict(f"truncatedArrays: {path!r} is not an array")
            return
        del self._own(*found)[size:]


def apply_update(
    previous: Mapping[str, Any],
    update_description: Mapping[str, Any],
    *,
    overwrite_conflicts: bool = False,
) -> Document:
    """The document after an update event, from the state before it and its description.

    `updatedFields` paths are dotted and may index arrays (`a.b.2`); missing intermediate
    documents are created and arrays padded with nulls, as the server does. Then
    `removedFields` are removed and `truncatedArrays` shorten arrays (the server writes
    updated indices below the new length, so this is its order). Paths resolve by the type of
    the container they meet, which is what `disambiguatedPaths` would tell. `previous` is not
    modified. `overwrite_conflicts` replaces a scalar a path has to cross instead of raising
    `UpdateConflict`: only for replaying changes over a scan that may already hold later ones.
    """
    writer = _Writer(previous, overwrite_conflicts)
    for path, value in (update_description.get("updatedFields") or {}).items():
        writer.set(path, value)
    for path in update_description.get("removedFields") or ():
        writer.unset(path)
    for entry in update_description.get("truncatedArrays") or ():
        writer.truncate(entry["field"], int(entry["newSize"]))
    return writer.root


# --- tokens and times ----------------------------------------------------------------------

_MONGOD_TIMESTAMP_TYPE = "82"  # KeyString type byte of a Timestamp, first in a mongod token


def timestamp_key(value: Any) -> int:
    """A BSON Timestamp as one integer that sorts as the stream: seconds << 32 | increment."""
    return (int(value.time) << 32) | int(value.inc)


def token_cluster_time(token: Mapping[str, Any] | None) -> int | None:
    """The cluster time (as `timestamp_key`) a resume token stands for; None if unknown.

    SecantusDB's `_data` is the hex of a BSON document `{s: oplog seq, t: Timestamp, ...}`
    (whose hex does not sort in stream order); mongod's is a KeyString that starts with the
    Timestamp (type byte 0x82, then 8 bytes big-endian).
    """
    import bson
    from bson import Timestamp
    from bson.errors import BSONError

    data = token.get("_data") if token else None
    if not isinstance(data, str) or len(data) < 18:
        return None
    if data.startswith(_MONGOD_TIMESTAMP_TYPE):
        return int(data[2:18], 16)
    try:
        raw = bytes.fromhex(data)
        if int.from_bytes(raw[:4], "little") != len(raw):
            return None
        value = bson.decode(raw).get("t")
    except (ValueError, BSONError):
        return None
    return timestamp_key(value) if isinstance(value, Timestamp) else None


def cluster_text(key: int) -> str:
    """A cluster time for people: `Timestamp(1764612000, 3)`."""
    return f"Timestamp({key >> 32}, {key & 0xFFFFFFFF})"


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One data change and the document's state right after it (None after a delete).

    `replay` marks an event of the first batch after a full scan that happened while the scan
    ran (cluster time at or before the scan's pin): the scan may already hold its effect.
    """

    operation: str
    cluster_time: int
    wall_time: datetime
    document_id: Any
    document: Document | None
    replay: bool = False


def key_of(document_id: Any) -> Any:
    """A hashable key for any `_id` that keeps `1`, `True` and `1.0` apart (int and Int64 are
    one key: the warehouse does not keep the width)."""
    import bson
    from bson import ObjectId

    kind = type(document_id)
    if kind is str or kind is ObjectId:
        return document_id
    if isinstance(document_id, int) and kind is not bool:
        return ("int", int(document_id))
    return bson.encode({"_id": document_id})


def interruption_message(raw: Mapping[str, Any], namespace: str) -> str:
    """drop, rename, dropDatabase or invalidate: why the stream of `namespace` has ended."""
    kind, to = raw["operationType"], raw.get("to")
    when = cluster_text(timestamp_key(raw["clusterTime"]))
    what = {
        "rename": f"was renamed to {to['db']}.{to['coll']}" if to else "was renamed",
        "invalidate": "had its change stream invalidated",
        "dropDatabase": "lost its database (dropDatabase)",
    }.get(kind, "was dropped")
    return f"MongoDB collection {namespace} {what} at {when}"


def keys_needing_state(raws: Iterable[Mapping[str, Any]], known: Container[Any]) -> list[Any]:
    """`_id`s whose first event here is not an insert and whose previous state is unknown: an
    update needs its base, a replace or delete needs it so a pre-image can confirm it."""
    seen: set[Any] = set()
    wanted: list[Any] = []
    for raw in raws:
        operation = raw.get("operationType")
        if operation not in DATA_OPERATIONS:
            continue
        document_id = raw["documentKey"]["_id"]
        key = key_of(document_id)
        if key in known or key in seen:
            continue
        seen.add(key)
        if operation != "insert":
            wanted.append(document_id)
    return wanted


# (previous state, pre-image) -> the first field where they differ as stored, or None
Confirm = Callable[[Mapping[str, Any], Mapping[str, Any]], str | None]


class Normaliser:
    """Raw change documents -> `ChangeEvent`s, keeping each key's state through a batch.

    The state before an event is the key's state after its previous event in this batch, else
    what the warehouse holds (`remember`), else the pre-image. Where a pre-image is there and
    the state is trusted, `confirm` must find no difference, or `PreImageMismatch` is raised.

    Events at or before `replay_until` replay the changes made while a full scan ran over
    documents that scan read: a scanned document may already contain later changes, so it is
    not trusted. A pre-image replaces it; an update without one is applied leniently
    (`overwrite_conflicts`) and is not trusted either. Once every replayed change has been
    applied, in order, each key equals the collection at the scan's pin: later events are
    strict.
    """

    def __init__(self, namespace: str, confirm: Confirm, replay_until: int | None = None) -> None:
        self.namespace = namespace
        self.confirm = confirm
        self.replay_until = replay_until
        self._states: dict[Any, Document | None] = {}
        self._trusted: set[Any] = set()
        self._stored: set[Any] = set()  # states from the warehouse, not yet changed here

    def remember(self, states: Iterable[tuple[Any, Document | None]]) -> None:
        """The warehouse's state of each key asked for (None: absent or deleted)."""
        for document_id, document in states:
            key = key_of(document_id)
            if key not in self._states:
                self._states[key] = document
                self._stored.add(key)

    @property
    def known_keys(self) -> Container[Any]:
        """Keys whose state is known (a live view)."""
        return self._states.keys()

    def apply(self, raw: Mapping[str, Any]) -> ChangeEvent:
        operation = raw["operationType"]
        if operation in INTERRUPTIONS:
            raise ChangeCaptureError(interruption_message(raw, self.namespace))
        if operation not in DATA_OPERATIONS:
            raise ChangeCaptureError(
                f"MongoDB collection {self.namespace}: unexpected change event {operation!r}"
                f" at {cluster_text(timestamp_key(raw['clusterTime']))}"
            )
        document_id = raw["documentKey"]["_id"]
        key = key_of(document_id)
        cluster_time = timestamp_key(raw["clusterTime"])
        replay = self.replay_until is not None and cluster_time <= self.replay_until
        exact = True
        document: Document | None
        if operation == "update":
            document, exact = self._updated(raw, key, document_id, replay)
        else:
            if operation != "insert":
                self._base(raw, key, document_id, replay)
            document = None if operation == "delete" else dict(raw["fullDocument"])
        self._states[key] = document
        self._stored.discard(key)
        if exact:
            self._trusted.add(key)
        else:
            self._trusted.discard(key)
        wall = raw.get("wallTime")
        if not isinstance(wall, datetime):  # servers before 6.0 send no wallTime
            wall = datetime.fromtimestamp(cluster_time >> 32, UTC)
        return ChangeEvent(operation, cluster_time, wall, document_id, document, replay)

    def _where(self, raw: Mapping[str, Any], document_id: Any) -> str:
        when = cluster_text(timestamp_key(raw["clusterTime"]))
        return f"MongoDB collection {self.namespace}: _id={document_id!r} at {when}"

    def _updated(
        self, raw: Mapping[str, Any], key: Any, document_id: Any, replay: bool
    ) -> tuple[Document, bool]:
        base, exact = self._base(raw, key, document_id, replay)
        if base is None:
            if not replay:
                raise MissingPreviousState(
                    f"{self._where(raw, document_id)}: an update, but the key's previous state"
                    " is unknown (not in the raw table since the last full scan, not earlier in"
                    " this batch, and no pre-image); the raw table has lost touch with the"
                    " collection: take a new full scan (README, Change streams)"
                )
            # replayed over a scan that did not see the key: its later events rebuild it
            base, exact = {"_id": document_id}, False
        try:
            return apply_update(
                base, raw["updateDescription"], overwrite_conflicts=not exact
            ), exact
        except UpdateConflict as exc:
            raise ChangeCaptureError(
                f"{self._where(raw, document_id)}: the update does not fit the key's previous"
                f" state ({exc}); take a new full scan (README, Change streams)"
            ) from exc

    def _base(
        self, raw: Mapping[str, Any], key: Any, document_id: Any, replay: bool
    ) -> tuple[Document | None, bool]:
        """The state before this event, and whether it is exact."""
        pre_image = raw.get("fullDocumentBeforeChange")
        known = self._states.get(key)
        if key in self._stored:
            trusted = not replay
        else:
            trusted = key in self._trusted
        if pre_image is None:
            return known, trusted
        if trusted:
            where = "the whole document" if known is None else self.confirm(known, pre_image)
            if where is not None:
                raise PreImageMismatch(
                    f"{self._where(raw, document_id)}: the server's pre-image differs from the"
                    f" state loaded for the key at {where!r} ("
                    + ("loaded: deleted or absent" if known is None else "values not shown")
                    + "); the raw table has lost touch with the collection: take a new full"
                    " scan (README, Change streams)"
                )
        return dict(pre_image), True
