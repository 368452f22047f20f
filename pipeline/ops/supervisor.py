"""The cron wrapper's parent: settings, lock, log file, time limit around one child run.

One run: load the settings; take an exclusive, non-blocking fcntl lock on
RUN_DIR/<database>/cdc-run.lock; open a new log file RUN_DIR/<database>/logs/cdc-run-<time>.log
(older ones beyond --keep-logs are deleted); run `python -m pipeline.ops.cron --once` as a child
in its own process group, its output redacted into the log; at --max-runtime send it SIGTERM,
after --grace SIGKILL. The child inherits the lock, so an orphaned child still blocks the next
run. Exit codes: see `pipeline.ops.cron`.
"""

from __future__ import annotations

import argparse
import configparser
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pipeline import runtime
from pipeline.core.errors import ConfigError
from pipeline.core.secrets import redact
from pipeline.ops import alerts
from pipeline.ops.audit import describe_error

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


def default_run_dir() -> Path:
    """CDC_RUN_DIR, else systemd's STATE_DIRECTORY, else ~/.local/state/cdc-pipeline."""
    for var in ("CDC_RUN_DIR", "STATE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "cdc-pipeline"


class RunLog:
    """One log file per run; the child's output and the wrapper's own lines, redacted."""

    def __init__(self, path: Path, secrets: set[str]) -> None:
        self.path = path
        self._secrets = secrets
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
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
    command = [sys.executable, "-m", "pipeline.ops.cron", "--once"]
    if args.scheduler_url:
        command += ["--scheduler-url", args.scheduler_url]
    if args.batch:
        command += ["--batch", args.batch]
    return command


def _prepare(args: argparse.Namespace) -> tuple[Path, set[str]]:
    """The deployment's run directory and secrets; raises on a configuration error."""
    cfg = runtime.settings()
    run_dir = (args.run_dir or default_run_dir()) / cfg.database
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, runtime.secrets()


def supervised_run(args: argparse.Namespace) -> int:
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
