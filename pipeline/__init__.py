"""cdc-pipeline: MongoDB and PostgreSQL into ClickHouse with SCD Type 2 history.

`luigi --module pipeline RunAll` finds the tasks here (`pipeline.graph`); heavy libraries load
only inside tasks. Importing `ops.audit` and `ops.alerts` registers their Luigi event handlers
(run audit, failure alerts); `ops.workers` lets several workers share one luigid. A process
that `luigi` itself started runs without pandas (see `runtime.without_pandas`).
"""

import sys
from pathlib import Path

from pipeline import runtime
from pipeline.graph import BuildMart, Extract, ExtractRange, LoadRaw, PlanRanges, RunAll, Snapshot
from pipeline.ops import alerts, audit, workers

if Path(sys.argv[0]).name == "luigi" or sys.argv[0].endswith("luigi/__main__.py"):
    runtime.without_pandas()

__all__ = [
    "BuildMart",
    "Extract",
    "ExtractRange",
    "LoadRaw",
    "PlanRanges",
    "RunAll",
    "Snapshot",
    "alerts",
    "audit",
    "workers",
]
