"""The Source interface: what Extract needs from a kind of database, and nothing more.

A source reads one batch of an entity as Arrow record batches; the Extract task stages them
and the framework, not the source, keeps state between batches: a source is handed the
position the last loaded batch ended at (a PostgreSQL watermark, as ISO text) and reports the
window of the batch it read, whose `upper` becomes the next position once the raw load has
committed. A source that reads a database's log (a replication slot, a change stream) stages
each change with its operation and order (`pipeline.core.names.CHANGE_META_COLUMNS`) and is
acknowledged only after that load. Adding a source is one module with one `Source` subclass
plus one line in `pipeline.extract.SOURCES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pipeline.checks import check_columns
from pipeline.config import Entity, Settings
from pipeline.core.errors import ConfigError
from pipeline.core.manifest import Manifest
from pipeline.staging import Store

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.warehouse import Warehouse


@dataclass
class Read:
    """One batch as a source reads it: lazy record batches and the window they cover."""

    batches: Iterator[pa.RecordBatch]
    window: dict[str, str | None] = field(default_factory=dict)
    whole: bool | None = None  # a whole re-read of the source (None: as the entity's mode says)
    # parts the source staged itself, in subdirectories of the batch, before `batches` (the
    # resumable chunks of a first load); the batch's manifest lists them first
    staged: list[Manifest] = field(default_factory=list)


@dataclass(frozen=True)
class CaptureStatus:
    """One line of `status` for a log-reading source (a replication slot, a change stream)."""

    entity: str
    name: str  # the slot's or stream's name
    lag: str  # how far the loaded position is behind the source, in the source's units
    holds: str  # what the source keeps for us (retained WAL, the oplog window)
    warning: str = ""  # set when the lag or what is held needs a person


@dataclass(frozen=True)
class Context:
    """What a source is told about the batch it reads.

    `position` is where the last loaded batch ended (None before the first); `known_columns`
    are the raw table's columns, which a field no document holds any more still counts as.
    `store` opens staging, for a source that checkpoints a long read inside its batch's prefix;
    `warehouse` opens the warehouse, for a change source reading a key's previous state from
    its raw table.
    """

    settings: Settings
    entity: Entity
    batch_id: str
    position: str | None = None
    known_columns: frozenset[str] = frozenset()
    store: Callable[[], Store] | None = None
    warehouse: Callable[[], Warehouse] | None = None


class Source(ABC):
    """One kind of database. Subclasses set `kind` and implement `read`."""

    kind: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]  # the entity modes this class reads
    # what the source's name in messages is (`PostgreSQL table public.orders`)
    noun: ClassVar[str] = "source"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.settings = context.settings
        self.entity = context.entity

    @property
    def described(self) -> str:
        return f"{self.noun} {self.entity.object_name}"

    @property
    def incremental(self) -> bool:
        """Whether a batch reads only what changed since `position` (else the whole source)."""
        return self.entity.incremental

    @abstractmethod
    def read(self) -> Read:
        """The batch's rows; the settings are checked against the source's columns first."""

    def acknowledge(self, position: str) -> None:
        """Tell the source that every change up to `position` is loaded (called once the raw
        load of the batch has committed, and again before the next read, so a crash between
        the two loses nothing). Sources without a log of their own keep nothing."""
        return None

    def status(self) -> list[CaptureStatus]:
        """What an operator asks of a log-reading source: its slot or stream, how far behind
        it is, what it holds back. Sources that read rows, not a log, have nothing to say."""
        return []

    def keys(self) -> Iterator[pa.RecordBatch]:
        """Every key the source holds (reconciliation of hard deletes)."""
        raise ConfigError(f"{self.described}: reconcile is not supported by {self.kind} sources")

    def partitions(self) -> int:
        """How many ranges the source is extracted in by parallel tasks (1: one task)."""
        return 1

    def plan_ranges(self) -> tuple[bytes, int]:
        """The bounds of the ranges, as bytes that `read_range` takes back, and how many
        ranges they make."""
        raise ConfigError(f"{self.described}: {self.kind} sources cannot be partitioned")

    def read_range(self, plan: bytes, index: int) -> Iterator[pa.RecordBatch]:
        """The rows of one range of the plan."""
        raise ConfigError(f"{self.described}: {self.kind} sources cannot be partitioned")

    def ranges_window(self, plan: bytes) -> tuple[dict[str, str | None], bool | None]:
        """The window of a batch read in ranges, once every range is staged, and whether it
        is a whole re-read (None: as the entity's mode says). Row sources have none."""
        return {}, None

    def check_columns(self, columns: Collection[str]) -> None:
        """Refuse settings naming columns the source does not have (nothing is written yet)."""
        check_columns(self.entity, columns, self.described)

    def check_scanned(self, columns: Collection[str]) -> None:
        """For sources without a schema: check the settings against every column the batch
        met, and the raw table's; an empty batch of a new entity has nothing to check."""
        known = set(columns) | self.context.known_columns
        if known:
            self.check_columns(known)

    def checked_at_end(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Pass the batches through, then `check_scanned` them before staging writes the
        manifest (so a bad setting leaves no complete batch behind)."""
        seen: set[str] = set()
        for batch in batches:
            seen.update(batch.schema.names)
            yield batch
        self.check_scanned(seen)
