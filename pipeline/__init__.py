"""cdc-pipeline: MongoDB and PostgreSQL into ClickHouse with SCD Type 2 history.

`luigi --module pipeline RunAll` finds the tasks here; heavy libraries load only inside tasks.
"""

from pipeline.tasks import BuildMart, Extract, LoadRaw, RunAll, Snapshot

__all__ = ["BuildMart", "Extract", "LoadRaw", "RunAll", "Snapshot"]
