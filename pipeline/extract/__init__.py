"""Extract: a source's rows for one batch -> Parquet parts + manifest in staging.

`base.Source` is the interface; `SOURCES` the registry (one line per source class, each naming
the kind of database and the modes it reads); `tasks` holds the Luigi tasks.
"""

from __future__ import annotations

from pipeline.core.choices import MODES
from pipeline.core.choices import SOURCES as SOURCE_KINDS
from pipeline.core.errors import ConfigError
from pipeline.extract.base import CaptureStatus, Context, Read, Source
from pipeline.extract.mongo import MongoSource
from pipeline.extract.mongo_changestream import MongoChangeStreamSource
from pipeline.extract.postgres import PostgresSource
from pipeline.extract.postgres_log import PostgresLogSource

SOURCES: tuple[type[Source], ...] = (
    MongoSource,
    MongoChangeStreamSource,
    PostgresSource,
    PostgresLogSource,
)
BY_MODE: dict[tuple[str, str], type[Source]] = {
    (source.kind, mode): source for source in SOURCES for mode in source.modes
}
assert {kind for kind, _ in BY_MODE} == set(SOURCE_KINDS), "core.choices.Source and SOURCES differ"
assert {mode for _, mode in BY_MODE} <= set(MODES), "a source reads a mode core.choices lacks"


def source_for(context: Context) -> Source:
    entity = context.entity
    source = BY_MODE.get((entity.source, entity.mode))
    if source is None:
        raise ConfigError(
            f"[entity.{entity.name}]: no {entity.source} source reads mode = {entity.mode}",
            entity=entity.name,
        )
    return source(context)


__all__ = ["BY_MODE", "SOURCES", "CaptureStatus", "Context", "Read", "Source", "source_for"]
