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
(older ones beyond --keep-logs are deleted); run `python -m pipeline.cron --once` as a child in
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
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.warehouse import Warehouse

log = logging.getLogger("pipeline.cron")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_LOCKED = 75
EXIT_CONFIG = 78
EXIT_TIMEOUT = 124
MEANING = {
    EXIT_OK: "success",
    EXIT_FAILED: "failed",
    EXIT_LOCKED: "skipped, locked",
    EXIT_CONFIG: "configuration error",
    EXIT_TIMEOUT: "time limit reached",
}
MAX_RUNTIME_S = 3600.0
GRACE_S = 30.0
KEEP_LOGS = 50
WAIT_S = 2.0
RERAISE_S = 1.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunStopped(KeyboardInterrupt):
    """SIGTERM in the child: a KeyboardInterrupt, so Luigi lets it through instead of retrying."""


def default_run_dir() -> Path:
    """CDC_RUN_DIR, else systemd's STATE_DIRECTORY, else ~/.local/state/cdc-pipeline."""
    for var in ("CDC_RUN_DIR", "STATE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "cdc-pipeline"


def batch_id_problem(batch: str) -> str | None:
    """Why `batch` is not a batch id RunAll accepts, or None."""
    from pipeline.scd2 import SnapshotError
    from pipeline.snapshots import batch_time

    try:
        batch_time(batch)
    except SnapshotError as exc:
        return str(exc)
    return None


def unfinished_batch(wh: Warehouse, database: str) -> str | None:
    """The newest batch any task touched, unless RunAll's markers say it is complete."""
    from pipeline.audit import newest_batch
    from pipeline.scd2 import SnapshotError
    from pipeline.snapshots import batch_time
    from pipeline.tasks import RunAll

    batch = newest_batch(wh, database)
    if batch is None:
        return None
    try:
        batch_time(batch)
    except SnapshotError:
        log.warning("ignoring batch %r: not a batch id RunAll accepts", batch)
        return None
    return None if RunAll(batch=batch).complete() else batch


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
    import luigi
    from luigi.execution_summary import LuigiStatusCode

    from pipeline.runtime import without_pandas
    from pipeline.tasks import RunAll

    without_pandas()
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
    from pipeline.runtime import settings, warehouse
    from pipeline.tasks import new_batch_id

    if batch is not None:
        log.info("running batch %s", batch)
        return EXIT_OK if _build(batch, scheduler_url) else EXIT_FAILED
    pending = unfinished_batch(warehouse(), settings().database)
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
    from pipeline import alerts, audit, runtime

    signal.setitimer(signal.ITIMER_REAL, 0)
    log.error("%s", stop)
    runtime.reset()  # the interrupted statement may have left the connection mid-reply
    for record in audit.record_interrupted(str(stop)):
        alerts.send(record.batch_id, record.task_id, record.error)


def run_once(scheduler_url: str | None = None, batch: str | None = None) -> int:
    """What the wrapper's child runs: no lock, no time limit of its own."""
    from pipeline import alerts, audit

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
    import luigi
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


# --- the parent: settings, lock, log file, time limit -------------------------------------


class RunLog:
    """One log file per run; the child's output and the wrapper's own lines, redacted."""

    def __init__(self, path: Path, secrets: set[str]) -> None:
        self.path = path
        self._secrets = secrets
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        from pipeline.audit import redact

        with self._lock:
            self._file.write(redact(line.rstrip("\n"), self._secrets) + "\n")
            self._file.flush()

    def note(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        self.write(f"{stamp} INFO cdc-run: {message}")

    def pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.write(raw.decode("utf-8", errors="replace"))

    def close(self) -> None:
        self._file.close()


def new_log(log_dir: Path, keep: int, secrets: set[str]) -> RunLog:
    """A file named by the start time, linked as `latest.log`; the oldest beyond `keep` go."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"cdc-run-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.log"
    run_log = RunLog(path, secrets)
    for old in sorted(log_dir.glob("cdc-run-*.log"))[:-keep]:
        old.unlink(missing_ok=True)
    latest = log_dir / "latest.log"
    temporary = log_dir / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(path.name)
    temporary.replace(latest)
    return run_log


def take_lock(path: Path) -> tuple[int | None, str]:
    """(fd, "") with the lock held, or (None, who holds it) without waiting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text().strip() or "a run that has not written its pid yet"
        return None, holder
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}\n".encode())
    return fd, ""


class _ParentStopped(Exception):
    """SIGTERM/SIGINT to the wrapper itself: stop the child the same way as at the time limit."""


def _raise_parent_stopped(signum: int, _frame: object) -> None:
    raise _ParentStopped(signal.Signals(signum).name)


def _stop_child(proc: subprocess.Popen[bytes], grace: float, run_log: RunLog) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            run_log.note(f"the run did not stop within {wait:.0f} s of {sig.name}")


def supervise(
    command: Sequence[str], run_log: RunLog, max_runtime: float, grace: float, lock_fd: int
) -> int:
    """Run the child to completion or to the time limit; its exit code, mapped to ours."""
    proc = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        pass_fds=(lock_fd,),
    )
    assert proc.stdout is not None
    pump = threading.Thread(target=run_log.pump, args=(proc.stdout,), daemon=True)
    pump.start()
    previous = {s: signal.signal(s, _raise_parent_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait(timeout=max_runtime)
    except subprocess.TimeoutExpired:
        run_log.note(f"time limit of {max_runtime:.0f} s reached: stopping the run")
        _stop_child(proc, grace, run_log)
        code = EXIT_TIMEOUT
    except _ParentStopped as stop:
        run_log.note(f"cdc-run got {stop}: stopping the run")
        _stop_child(proc, grace, run_log)
        code = EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    pump.join(timeout=10)
    return code if code in MEANING else EXIT_FAILED


def _child_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "pipeline.cron", "--once"]
    if args.scheduler_url:
        command += ["--scheduler-url", args.scheduler_url]
    if args.batch:
        command += ["--batch", args.batch]
    return command


def _prepare(args: argparse.Namespace) -> tuple[Path, set[str]]:
    """The deployment's run directory and secrets; raises on a configuration error."""
    from pipeline.audit import secret_values
    from pipeline.config import settings

    cfg = settings()
    run_dir = (args.run_dir or default_run_dir()) / cfg.database
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, secret_values()


def supervised_run(args: argparse.Namespace) -> int:
    import configparser

    from pipeline import alerts
    from pipeline.audit import describe_error
    from pipeline.config import ConfigError

    try:
        run_dir, secrets = _prepare(args)
    except (ConfigError, ValueError, OSError, configparser.Error) as exc:
        reason = describe_error(exc)
        print(f"cdc-run: configuration error: {reason}", file=sys.stderr)
        alerts.send("", "cdc-run", f"configuration error: {reason}")
        return EXIT_CONFIG
    lock_path = run_dir / "cdc-run.lock"
    lock_fd, holder = take_lock(lock_path)
    if lock_fd is None:
        print(f"cdc-run: skipped: another run holds {lock_path} ({holder})", file=sys.stderr)
        return EXIT_LOCKED
    try:
        run_log = new_log(run_dir / "logs", args.keep_logs, secrets)
        started = time.monotonic()
        scheduler = args.scheduler_url or "local scheduler"
        run_log.note(f"pid {os.getpid()}, max runtime {args.max_runtime:.0f} s, {scheduler}")
        code = supervise(_child_command(args), run_log, args.max_runtime, args.grace, lock_fd)
        took = time.monotonic() - started
        run_log.note(f"finished: exit {code} ({MEANING[code]}) after {took:.1f} s")
        run_log.close()
    finally:
        os.close(lock_fd)
    if code != EXIT_OK:
        print(f"cdc-run: {MEANING[code]} (exit {code}); log: {run_log.path}", file=sys.stderr)
    return code


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
        return assist(args.scheduler_url)
    return supervised_run(args)


if __name__ == "__main__":
    sys.exit(main())
