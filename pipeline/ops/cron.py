"""`cdc-run`: the cron wrapper, one supervised pipeline run (setup/cron/cdc-run calls it).

    */15 * * * * /opt/cdc/setup/cron/cdc-run --max-runtime 3000

Exit codes (also in docs/operations.md):
    0    success: the unfinished batch (if there was one) and a new batch both finished
    1    failure: a task failed, or the run was stopped; the next run resumes the batch
    75   skipped: another run holds the lock (EX_TEMPFAIL); one line on stderr says which
    78   configuration error (EX_CONFIG): the settings could not be loaded; nothing ran
    124  time limit: the run was stopped after --max-runtime; the next run resumes the batch

One run: load the settings; take an exclusive, non-blocking fcntl lock on
RUN_DIR/<database>/cdc-run.lock; open a new log file RUN_DIR/<database>/logs/cdc-run-<time>.log
(older ones beyond --keep-logs are deleted); run `python -m pipeline.ops.cron --once` as a child in
its own process group, its output redacted into the log; at --max-runtime send it SIGTERM, after
--grace SIGKILL. The child inherits the lock, so an orphaned child still blocks the next run.

The child resumes the newest unfinished batch before it starts a new one: batches must reach
the snapshots in order (a later batch's watermark would skip the failed batch's changes), so a
batch that keeps failing blocks new ones until it is fixed, and alerts each time. A batch is
finished when RunAll's markers exist, whichever worker ran its tasks. `cdc-run --batch ID` runs
that batch alone (a resume by hand, with the same lock, log and time limit) and no new one.

`cdc-run --assistant --scheduler-url URL` is the scale-out side: a long-running Luigi worker on
another machine that takes pending tasks of any batch from the shared luigid.
Exit code 2 means the command line itself was wrong (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import luigi

from pipeline import runtime
from pipeline.core.batch import batch_id_problem, new_batch_id
from pipeline.core.errors import ConfigError
from pipeline.graph import RunAll
from pipeline.ops import alerts, audit
from pipeline.ops.batches import unfinished_batch
from pipeline.ops.supervisor import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_TIMEOUT,
    GRACE_S,
    KEEP_LOGS,
    MAX_RUNTIME_S,
    supervised_run,
)

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_LOCKED", "EXIT_OK", "EXIT_TIMEOUT", "main"]

log = logging.getLogger("pipeline.cron")

WAIT_S = 2.0
RERAISE_S = 1.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunStopped(KeyboardInterrupt):
    """SIGTERM in the child: a KeyboardInterrupt, so Luigi lets it through instead of retrying."""


# --- the child: resume, then a new batch, in this process ---------------------------------


def _raise_stopped(_signum: int, _frame: object) -> None:
    """Raise RunStopped now, and again every second until it is handled.

    Luigi swallows a KeyboardInterrupt raised inside an event callback (the audit's insert, for
    example), so one raise may be lost; the SIGALRM repeat makes sure the run stops.
    """
    signal.setitimer(signal.ITIMER_REAL, RERAISE_S)
    raise RunStopped("stopped by SIGTERM (time limit or shutdown)")


def _stop_on_sigterm() -> None:
    for sig in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, _raise_stopped)


def _build(batch: str, scheduler_url: str | None) -> bool:
    """Run RunAll(batch) until its markers say it is complete, or it cannot be.

    With assistants sharing luigid, tasks another worker is running come back NOT_RUN; then
    this worker waits and schedules again, so the run ends when the batch does.
    """
    from luigi.execution_summary import LuigiStatusCode

    runtime.without_pandas()
    where = {"scheduler_url": scheduler_url} if scheduler_url else {"local_scheduler": True}
    while True:
        result = luigi.build([RunAll(batch=batch)], detailed_summary=True, **where)
        if RunAll(batch=batch).complete():
            log.info("batch %s: complete", batch)
            return True
        if result.status != LuigiStatusCode.NOT_RUN:
            log.info("batch %s: %s", batch, result.status.name)
            return False
        log.info("batch %s: other workers still run some of its tasks; waiting", batch)
        time.sleep(WAIT_S)


def _batches(scheduler_url: str | None, batch: str | None = None) -> int:
    """The given batch alone, or: the unfinished batch (if any), then a new one."""
    if batch is not None:
        log.info("running batch %s", batch)
        return EXIT_OK if _build(batch, scheduler_url) else EXIT_FAILED
    pending = unfinished_batch(runtime.warehouse(), runtime.settings().database)
    if pending is not None:
        log.info("resuming unfinished batch %s", pending)
        if not _build(pending, scheduler_url):
            return EXIT_FAILED
    batch = new_batch_id()
    log.info("starting batch %s", batch)
    return EXIT_OK if _build(batch, scheduler_url) else EXIT_FAILED


def _log_to_stderr() -> None:
    """One timestamped format for Luigi's lines and ours (Luigi's default has no time)."""
    from luigi.configuration import get_config

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    config = get_config()
    if not config.has_section("core"):
        config.add_section("core")
    config.set("core", "no_configure_logging", "true")


def _record_stop(stop: RunStopped) -> None:
    """Audit rows and alerts for the tasks a SIGTERM cut off (Luigi fires no event for them)."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    log.error("%s", stop)
    runtime.reset()  # the interrupted statement may have left the connection mid-reply
    for record in audit.record_interrupted(str(stop)):
        alerts.send(record.batch_id, record.task_id, record.error)


def run_once(scheduler_url: str | None = None, batch: str | None = None) -> int:
    """What the wrapper's child runs: no lock, no time limit of its own."""
    _stop_on_sigterm()
    _log_to_stderr()
    try:
        return _batches(scheduler_url, batch)
    except RunStopped as stop:
        _record_stop(stop)
        return EXIT_TIMEOUT
    except Exception as exc:
        error = audit.describe_error(exc)
        log.error("run failed outside any task: %s", error)
        alerts.send("", "cdc-run", error)
        return EXIT_FAILED


def assist(scheduler_url: str) -> int:
    """A long-running worker that takes any pending pipeline task from luigid (scale-out)."""
    from luigi.configuration import get_config

    _stop_on_sigterm()
    _log_to_stderr()
    config = get_config()
    if not config.has_section("worker"):
        config.add_section("worker")
    config.set("worker", "keep_alive", "true")
    try:
        luigi.build([], assistant=True, scheduler_url=scheduler_url)
    except RunStopped as stop:
        _record_stop(stop)
    return EXIT_OK


def _assistant_refusal() -> str | None:
    """Why this machine cannot serve other machines' batches, if it cannot."""
    try:
        url = runtime.settings().warehouse_url
    except ConfigError as exc:
        return str(exc)
    if url.startswith("chdb://"):
        return (
            "it serves the batches of other machines, but CDC_WAREHOUSE_URL is chDB, embedded"
            " in this process only; use a ClickHouse server (clickhouse://...) to run workers"
            " on several machines"
        )
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdc-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, help="lock and logs (default: see above)")
    parser.add_argument("--max-runtime", type=float, default=MAX_RUNTIME_S, help="seconds")
    parser.add_argument("--grace", type=float, default=GRACE_S, help="seconds from TERM to KILL")
    parser.add_argument("--keep-logs", type=int, default=KEEP_LOGS, help="log files kept")
    parser.add_argument(
        "--scheduler-url",
        default=os.environ.get("LUIGID_URL") or None,
        help="luigid to report to (default: $LUIGID_URL, else Luigi's local scheduler)",
    )
    parser.add_argument(
        "--batch",
        metavar="ID",
        help="run (resume) this batch only, e.g. a failed one named by `status`; no new batch",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--once",
        action="store_true",
        help="run in this process: no lock, no log file, no time limit (the wrapper's child)",
    )
    mode.add_argument(
        "--assistant",
        action="store_true",
        help="serve luigid as an extra worker until stopped (needs --scheduler-url)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.keep_logs < 1 or args.max_runtime <= 0:
        print("cdc-run: --keep-logs and --max-runtime must be positive", file=sys.stderr)
        return EXIT_CONFIG
    if args.batch is not None:
        problem = batch_id_problem(args.batch)
        if problem:
            print(f"cdc-run: --batch: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    if args.once:
        return run_once(args.scheduler_url, args.batch)
    if args.assistant:
        if not args.scheduler_url:
            print("cdc-run: --assistant needs --scheduler-url (or LUIGID_URL)", file=sys.stderr)
            return EXIT_CONFIG
        refused = _assistant_refusal()
        if refused:
            print(f"cdc-run: --assistant: {refused}", file=sys.stderr)
            return EXIT_CONFIG
        return assist(args.scheduler_url)
    return supervised_run(args)


if __name__ == "__main__":
    sys.exit(main())
