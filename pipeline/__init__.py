"""cdc-pipeline: MongoDB and PostgreSQL into ClickHouse with SCD Type 2 history.

`luigi --module pipeline RunAll` finds the tasks here; heavy libraries load only inside tasks.
Importing `alerts` and `audit` registers their Luigi event handlers (run audit, failure alerts).
"""

from pipeline import alerts, audit
from pipeline.tasks import BuildMart, Extract, LoadRaw, RunAll, Snapshot

__all__ = ["BuildMart", "Extract", "LoadRaw", "RunAll", "Snapshot", "alerts", "audit"]
