"""Which batch comes next: the newest batch any task touched, unless RunAll says it is done.

The cron wrapper resumes that batch before it starts a new one, and `status` names it.
"""

from __future__ import annotations

import logging

from pipeline.core.batch import batch_id_problem
from pipeline.graph import RunAll
from pipeline.ops.audit import newest_batch
from pipeline.warehouse import Warehouse

log = logging.getLogger("pipeline.cron")


def unfinished_batch(wh: Warehouse, database: str) -> str | None:
    """The newest batch any task touched, unless RunAll's markers say it is complete."""
    batch = newest_batch(wh, database)
    if batch is None:
        return None
    if batch_id_problem(batch) is not None:
        log.warning("ignoring batch %r: not a batch id RunAll accepts", batch)
        return None
    return None if RunAll(batch=batch).complete() else batch
