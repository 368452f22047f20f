"""Extract: a source's rows for one batch -> Parquet parts + manifest in staging.

`base.Source` is the interface; `SOURCES` the registry (one line per kind of database);
`tasks` holds the Luigi tasks.
"""

from __future__ import annotations

from pipeline.core.choices import SOURCES as SOURCE_KINDS
from pipeline.extract.base import Context, Read, Source
from pipeline.extract.mongo import MongoSource
from pipeline.extract.postgres import PostgresSource

SOURCES: dict[str, type[Source]] = {
    MongoSource.kind: MongoSource,
    PostgresSource.kind: PostgresSource,
}
assert set(SOURCES) == set(SOURCE_KINDS), "core.choices.Source and the registry disagree"


def source_for(context: Context) -> Source:
    return SOURCES[context.entity.source](context)


__all__ = ["SOURCES", "Context", "Read", "Source", "source_for"]
