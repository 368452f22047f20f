"""Several workers on one luigid: `luigi --module pipeline RunAll --RunAll-batch B` started on
several machines runs each task once, and every process exits 0 when the batch is complete.

luigid hands each task to one worker; two of Luigi's defaults stand in the way of the rest:

* a worker with `keep_alive` stays alive while any task it scheduled is pending or FAILED, and
  luigid gives a failed task out again only after its `retry_delay` (15 minutes by default),
  so one failure would hold every process that long and then retry it. Here a worker that is
  not an assistant stays alive while another worker runs a task of its graph, and no longer:
  it waits for work that happens elsewhere, and a failure ends it at once (non-zero);
* a worker's exit code and summary know only what it ran or found done when it scheduled, so a
  task another worker ran counts as "run by another worker" (exit `[retcode] already_running`)
  even once it is complete. Here a task that is complete by the time the summary is made (its
  marker exists, whoever wrote it) counts as done.

`luigi.cfg` sets `[worker] keep_alive = true`; with one worker nothing changes, since no other
worker runs anything. Importing this module installs both (Luigi has no hook for either).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import luigi
import luigi.execution_summary as summary
import luigi.worker

log = logging.getLogger("pipeline")


def done_elsewhere(task: luigi.Task) -> bool:
    """Whether a task is complete now; a check that fails counts as not done."""
    try:
        return bool(task.complete())
    except Exception as exc:  # the summary must not fail because a warehouse is away
        log.warning("%s: completeness unknown (%s)", task, exc)
        return False


def _keep_alive(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(original)
    def keep_alive(self: luigi.worker.Worker, response: Any) -> bool:
        if getattr(self, "_assistant", False) or not self._config.keep_alive:
            return original(self, response)
        return bool(response.running_tasks)  # another worker runs a task this one waits for

    keep_alive.__cdc_patched__ = True  # type: ignore[attr-defined]
    return keep_alive


def _partition(original: Callable[..., dict[str, set[Any]]]) -> Callable[..., Any]:
    @functools.wraps(original)
    def partition(worker: luigi.worker.Worker) -> dict[str, set[Any]]:
        sets = original(worker)
        done = {t for t in sets["still_pending_not_ext"] if done_elsewhere(t)}
        sets["still_pending_not_ext"] -= done
        sets["already_done"] |= done
        return sets

    partition.__cdc_patched__ = True  # type: ignore[attr-defined]
    return partition


def _run_by_others(original: Callable[..., set[Any]]) -> Callable[..., set[Any]]:
    @functools.wraps(original)
    def run_by_others(worker: luigi.worker.Worker) -> set[Any]:
        return {t for t in original(worker) if not done_elsewhere(t)}

    run_by_others.__cdc_patched__ = True  # type: ignore[attr-defined]
    return run_by_others


def install() -> None:
    """Install both changes once (importing this module does)."""
    if not getattr(luigi.worker.Worker._keep_alive, "__cdc_patched__", False):
        luigi.worker.Worker._keep_alive = _keep_alive(luigi.worker.Worker._keep_alive)
    if not getattr(summary._partition_tasks, "__cdc_patched__", False):
        summary._partition_tasks = _partition(summary._partition_tasks)
    if not getattr(summary._get_run_by_other_worker, "__cdc_patched__", False):
        summary._get_run_by_other_worker = _run_by_others(summary._get_run_by_other_worker)


install()
