"""cdc-pipeline: MongoDB and PostgreSQL into ClickHouse with SCD Type 2 history.

`luigi --module pipeline RunAll` finds the tasks here; heavy libraries load only inside tasks.
Importing `alerts` and `audit` registers their Luigi event handlers (run audit, failure alerts).
A process that `luigi` itself started runs without pandas (see `runtime.without_pandas`).
"""

import sys
from pathlib import Path

from pipeline import alerts, audit, runtime
from pipeline.tasks import BuildMart, Extract, LoadRaw, RunAll, Snapshot

if Path(sys.argv[0]).name == "luigi" or sys.argv[0].endswith("luigi/__main__.py"):
    runtime.without_pandas()

__all__ = ["BuildMart", "Extract", "LoadRaw", "RunAll", "Snapshot", "alerts", "audit"]
