"""Operations against the real servers: cron wrapper, run audit, status, alerts, luigid, report.

Wrapper and CLI runs are subprocesses, as cron runs them. Each deployment has its own source
databases, staging prefix and warehouse database; on chDB also its own data directory, because
this process already holds the session's chDB directory and chDB serves one per process.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import luigi
import pymongo
import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import runtime
from pipeline.core.batch import new_batch_id
from pipeline.graph import RunAll, Snapshot
from pipeline.ops import audit, cron
from pipeline.ops.status import render as render_status
from setup import stack
from setup.generate_data import generate
from setup.simulate_cdc import simulate
from tests.support import ROOT, private_luigi_locks

CDC_RUN = ROOT / "setup" / "cron" / "cdc-run"
USERS, PRODUCTS, ORDERS = 40, 6, 80
ENTITIES = {"users", "products", "orders"}
# variables of the developer's shell that would change what a wrapper run does
LOCAL = ("--local-scheduler",)
FOREIGN = ("LUIGID_URL", "CDC_ALERT_WEBHOOK", "CDC_FAILPOINT", "CDC_RUN_DIR", "CDC_ENV_FILE")


@dataclass
class Deployment:
    """One isolated pipeline deployment, driven the way cron and an operator drive it."""

    values: dict[str, str]
    run_dir: Path

    @property
    def database(self) -> str:
        return self.values["CDC_DATABASE"]

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k not in FOREIGN}
        return {**base, **self.values, "CDC_VENV": sys.prefix, **extra}

    @contextmanager
    def in_this_process(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Point this process's settings, warehouse and store at the deployment, then back."""
        for key, value in self.values.items():
            monkeypatch.setenv(key, value)
        runtime.reset()
        try:
            yield
        finally:
            runtime.reset()

    def start_cdc_run(self, *args: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(CDC_RUN), *args],
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cdc_run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        proc = self.start_cdc_run(*args, **extra)
        stdout, stderr = proc.communicate(timeout=180)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    @property
    def logs(self) -> Path:
        return self.run_dir / self.database / "logs"

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logs.glob("cdc-run-*.log")))


@pytest.fixture
def deploy(
    stack_env: dict[str, str],
    pg_dsn_factory: Callable[[], str],
    tmp_path: Path,
) -> Iterator[Callable[..., Deployment]]:
    """Make deployments with source data; `warehouse_url=None` gives a chDB dir of its own."""
    made: list[Deployment] = []

    def make(warehouse_url: str | None = None, **overrides: str) -> Deployment:
        tag = uuid.uuid4().hex[:10]
        values = dict(stack_env)
        values.update(
            CDC_DATABASE=f"ops_{tag}",
            CDC_MONGO_DB=f"ops_{tag}",
            CDC_POSTGRES_DSN=pg_dsn_factory(),
            CDC_STAGING_URL=f"s3://{stack.BUCKET}/{tag}/",
            CDC_WAREHOUSE_URL=warehouse_url or f"chdb://{tmp_path / f'warehouse-{tag}'}",
        )
        generate(
            values["CDC_MONGO_URI"],
            values["CDC_MONGO_DB"],
            values["CDC_POSTGRES_DSN"],
            USERS,
            PRODUCTS,
            ORDERS,
            seed=11,
        )
        values.update(overrides)
        made.append(Deployment(values, tmp_path / f"run-{tag}"))
        return made[-1]

    yield make
    for deployment in made:
        with pymongo.MongoClient(stack_env["CDC_MONGO_URI"]) as client:
            client.drop_database(deployment.values["CDC_MONGO_DB"])
        url = deployment.values["CDC_WAREHOUSE_URL"]
        if url.startswith("clickhouse://"):
            from clickhouse_driver import Client

            parts = urllib.parse.urlsplit(url)
            client = Client(host=parts.hostname, port=parts.port)
            client.execute(f"DROP DATABASE IF EXISTS `{deployment.database}`")
            client.disconnect()


@pytest.fixture
def server_url(clickhouse: stack.Service) -> str:
    return clickhouse.env["CDC_WAREHOUSE_URL"]


@pytest.fixture
def server(server_url: str) -> Iterator[Any]:
    """The ClickHouse server, read directly from this process (chDB dirs cannot be)."""
    from pipeline.warehouse import connect

    wh = connect(server_url)
    yield wh
    wh.close()


@dataclass
class Webhook:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """A real HTTP server on a free loopback port that keeps every JSON body POSTed to it."""
    port = stack.free_port()
    hook = Webhook(f"http://{stack.HOST}:{port}/hooks/cdc")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.raw.append(body)
            hook.received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    httpd = ThreadingHTTPServer((stack.HOST, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield hook
    httpd.shutdown()
    httpd.server_close()


def _runs(wh: Any, database: str, where: str = "1", params: dict[str, Any] | None = None) -> list:
    """Audit rows in run order (ClickHouse 18.16 keeps whole seconds: ties go by batch id)."""
    return wh.query_arrow(
        f"SELECT * FROM `{database}`.`{audit.RUNS}` WHERE {where} ORDER BY finished_at, batch_id",
        params,
    ).to_pylist()


# --- the wrapper ---------------------------------------------------------------------------


def test_second_concurrent_run_skips_and_status_reports_the_first(
    deploy: Callable[..., Deployment],
) -> None:
    """Two wrapper runs at once on one chDB deployment: one runs, the other exits 75 at once."""
    d = deploy()
    first = d.start_cdc_run("--run-dir", str(d.run_dir))
    lock = d.run_dir / d.database / "cdc-run.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and lock.read_text().startswith("pid")):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    started = time.monotonic()
    second = d.cdc_run("--run-dir", str(d.run_dir))
    assert second.returncode == cron.EXIT_LOCKED == 75
    assert time.monotonic() - started < 10
    reason = second.stderr.strip().splitlines()
    assert len(reason) == 1 and "skipped" in reason[0] and str(lock) in reason[0], second.stderr
    assert f"(pid {first.pid} since " in reason[0]  # the script execs cdc-run: same pid
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err + d.log_text()[-3000:]
    assert out == "" and err == ""  # cron mails any output: a good run is silent
    assert len(list(d.logs.glob("cdc-run-*.log"))) == 1  # the skipped run wrote no log
    assert (d.logs / "latest.log").resolve() == next(d.logs.glob("cdc-run-*.log")).resolve()

    text = d.cli("status")
    assert text.returncode == 0, text.stderr
    for expected in ("Last runs", "Lag per source", "users_snapshot", "SUCCESS", "full scan"):
        assert expected in text.stdout
    data = json.loads(d.cli("status", "--json").stdout)
    assert data["unfinished_batch"] is None and data["failures"] == []
    runs = {(r["entity"], r["stage"]): r for r in data["runs"]}
    assert runs[("users", "snapshot")]["status"] == "SUCCESS"
    assert runs[("users", "snapshot")]["versions_opened"] == USERS
    assert runs[("orders", "raw")]["rows_out"] == ORDERS
    assert runs[("", "run")]["status"] == "SUCCESS"
    lag = {r["entity"]: r for r in data["lag"]}
    assert lag["users"]["basis"] == "full scan" and lag["orders"]["basis"] == "watermark"
    assert all(0 <= r["lag_s"] < 600 for r in lag.values())
    sizes = {r["table"]: r for r in data["snapshots"]}
    assert sizes["users_snapshot"]["current"] == USERS
    assert sizes["orders_snapshot"]["versions"] == ORDERS
    assert sizes["orders_snapshot"]["bytes"] > 0


def test_failed_batch_is_resumed_by_the_next_run(
    deploy: Callable[..., Deployment], server_url: str, server: Any, webhook: Webhook
) -> None:
    """A run that fails after Snapshot wrote versions; the next wrapper run resumes that batch."""
    d = deploy(server_url, CDC_ALERT_WEBHOOK=webhook.url)
    failed = d.cdc_run("--run-dir", str(d.run_dir), CDC_FAILPOINT="snapshot-after-open")
    assert failed.returncode == cron.EXIT_FAILED, failed.stderr
    assert "failed (exit 1)" in failed.stderr and "log:" in failed.stderr
    failures = _runs(server, d.database, "status = 'FAILURE'")
    (batch,) = {r["batch_id"] for r in failures}
    assert {(r["task"], r["entity"]) for r in failures} == {("Snapshot", e) for e in ENTITIES}
    assert all("failpoint snapshot-after-open" in r["error"] for r in failures)
    assert all(r["duration_s"] > 0 and r["host"] and r["pid"] for r in failures)
    loads = {r["entity"]: r for r in _runs(server, d.database, "stage = 'raw'")}
    assert loads["users"]["status"] == "SUCCESS" and loads["users"]["rows_out"] == USERS
    assert loads["orders"]["window_upper"] and loads["orders"]["window_lower"] is None
    assert {a["task"].split("(")[0] for a in webhook.received} == {"Snapshot"}
    assert len(webhook.received) == 3
    assert all(a["batch"] == batch and "failpoint" in a["error"] for a in webhook.received)
    assert all(batch in a["text"] for a in webhook.received)

    status = json.loads(d.cli("status", "--json").stdout)
    assert status["unfinished_batch"] == batch
    assert {f["entity"] for f in status["failures"]} == ENTITIES
    text = render_status(status)
    assert f"unfinished batch: {batch}" in text and "failpoint snapshot-after-open" in text

    resumed = d.cdc_run("--run-dir", str(d.run_dir))
    assert resumed.returncode == 0, resumed.stderr + d.log_text()[-3000:]
    assert f"resuming unfinished batch {batch}" in d.log_text()
    done = _runs(server, d.database, "task = 'RunAll' AND status = 'SUCCESS'")
    assert [r["batch_id"] for r in done] == [batch, done[1]["batch_id"]]
    assert done[1]["batch_id"] > batch  # then a new batch
    snapshot = _runs(
        server,
        d.database,
        "batch_id = %(b)s AND task = 'Snapshot' AND status = 'SUCCESS'",
        {"b": batch},
    )
    assert {r["entity"] for r in snapshot} == ENTITIES
    current = server.scalar(
        f"SELECT count() FROM `{d.database}`.users_snapshot WHERE dbt_valid_to IS NULL"
    )
    assert current == USERS
    assert len(webhook.received) == 3  # success sends nothing


def test_time_limit_and_config_error_have_their_own_codes(
    deploy: Callable[..., Deployment],
) -> None:
    d = deploy()
    stopped = d.cdc_run("--run-dir", str(d.run_dir), "--max-runtime", "0.5", "--grace", "5")
    assert stopped.returncode == cron.EXIT_TIMEOUT == 124, stopped.stderr
    assert "time limit" in d.log_text()
    broken = d.cdc_run("--run-dir", str(d.run_dir), CDC_DATABASE="not-a-name!")
    assert broken.returncode == cron.EXIT_CONFIG == 78
    assert (
        broken.stderr.startswith("cdc-run: configuration error") and "CDC_DATABASE" in broken.stderr
    )
    assert len(broken.stderr.strip().splitlines()) == 1


def test_interrupted_task_is_audited_as_failure(
    deploy: Callable[..., Deployment], server_url: str, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task cut off by the time limit fires no Luigi event; the wrapper's child records it."""
    d = deploy(server_url)
    with d.in_this_process(monkeypatch):
        task = Snapshot(entity="users", batch=new_batch_id())
        task.trigger_event(luigi.Event.START, task)
        (record,) = audit.record_interrupted("stopped by SIGTERM (cdc-run's time limit)")
        (row,) = _runs(server, d.database, "run_id = %(r)s", {"r": record.run_id})
        assert row["status"] == "FAILURE" and row["stage"] == "snapshot"
        assert row["entity"] == "users" and "time limit" in row["error"]
        assert audit.record_interrupted("again") == []


# --- secrets, luigid, metrics ----------------------------------------------------------------


@pytest.fixture
def luigid(tmp_path: Path) -> Iterator[tuple[stack.Service, Path]]:
    """A real luigid configured as docs/operations.md says: task history and Prometheus."""
    root = tmp_path / "scheduler"
    home = root / "luigid"
    home.mkdir(parents=True)
    history = home / "history.db"
    (home / "luigi.cfg").write_text(
        "[scheduler]\nrecord_task_history = True\nmetrics_collector = prometheus\n\n"
        f"[task_history]\ndb_connection = sqlite:///{history}\n"
    )
    service = stack.start_luigid(root)
    yield service, history
    stack.stop(service, timeout=5)


def _api(url: str, method: str, **data: str) -> str:
    query = urllib.parse.quote(json.dumps(data))
    with urllib.request.urlopen(f"{url}/api/{method}?data={query}", timeout=10) as reply:
        return reply.read().decode()


def test_secrets_stay_out_of_logs_luigid_and_audit_while_luigid_records_and_exports(
    deploy: Callable[..., Deployment],
    server_url: str,
    server: Any,
    webhook: Webhook,
    luigid: tuple[stack.Service, Path],
) -> None:
    service, history = luigid
    url = service.env["LUIGID_URL"]
    s3_secret = f"s3-{uuid.uuid4().hex}"
    pg_password = f"pg-{uuid.uuid4().hex}"
    d = deploy(server_url, CDC_ALERT_WEBHOOK=webhook.url, CDC_S3_SECRET_KEY=s3_secret)
    dsn = urllib.parse.urlsplit(d.values["CDC_POSTGRES_DSN"])
    d.values["CDC_POSTGRES_DSN"] = dsn._replace(
        netloc=f"postgres:{pg_password}@{dsn.hostname}:{dsn.port}"
    ).geturl()
    ok = d.cdc_run("--run-dir", str(d.run_dir), "--scheduler-url", url)
    assert ok.returncode == 0, ok.stderr + d.log_text()[-3000:]

    unreachable = f"postgresql://postgres:{pg_password}@{stack.HOST}:{stack.free_port()}/x"
    failed = d.cdc_run(
        "--run-dir", str(d.run_dir), "--scheduler-url", url, CDC_POSTGRES_DSN=unreachable
    )
    assert failed.returncode == 1
    errors = [r["error"] for r in _runs(server, d.database, "status = 'FAILURE'")]
    assert errors and all("postgres:***@" in e for e in errors), errors
    assert webhook.received and all("postgres:***@" in a["error"] for a in webhook.received)

    done, failed_tasks = (
        _api(url, "task_list", status="DONE"),
        _api(url, "task_list", status="FAILED"),
    )
    assert "Snapshot" in done and "Extract" in failed_tasks
    tracebacks = [_api(url, "fetch_error", task_id=t) for t in json.loads(failed_tasks)["response"]]
    assert len(tracebacks) == 2 and all("postgres:***@" in t for t in tracebacks)
    exposed = {
        "logs": d.log_text() + ok.stderr + failed.stderr,
        "luigid task list": done + failed_tasks + "".join(tracebacks),
        "luigid logs": "".join(p.read_text() for p in (history.parent).glob("*.log")),
        "audit table": json.dumps(_runs(server, d.database), default=str),
        "alerts": b"".join(webhook.raw).decode(),
    }
    for where, text in exposed.items():
        assert text, where
        for secret in (s3_secret, pg_password):
            assert secret not in text, f"a secret is shown in the {where}"

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        metrics = reply.read().decode()
    assert 'luigi_task_done_total{family="RunAll"} 1.0' in metrics
    assert 'luigi_task_failed_total{family="Extract"} 2.0' in metrics
    assert 'luigi_task_execution_time_seconds{family="Snapshot"}' in metrics
    with sqlite3.connect(history) as db:
        events = db.execute(
            "SELECT t.name, e.event_name, count(*) FROM tasks t"
            " JOIN task_events e ON e.task_id = t.id GROUP BY t.name, e.event_name"
        ).fetchall()
    recorded = {(name, event): count for name, event, count in events}
    assert recorded[("RunAll", "DONE")] == 1 and recorded[("Extract", "FAILED")] == 2
    assert recorded[("Snapshot", "DONE")] == 4  # three in the first batch, users in the second


def test_key_value_dsn_secrets_stay_out_of_luigi_output_the_log_and_the_audit(
    deploy: Callable[..., Deployment], server_url: str, server: Any
) -> None:
    """A libpq key=value DSN against a dead port or a missing database once printed its
    password in the message and in luigi's worker log lines."""
    d = deploy(server_url)
    password, ssl_password = f"pg-{uuid.uuid4().hex}", f"ssl-{uuid.uuid4().hex}"
    port = urllib.parse.urlsplit(d.values["CDC_POSTGRES_DSN"]).port
    dsns = (
        f"host={stack.HOST} port={stack.free_port()} dbname=source user=postgres"
        f" password={password}",
        f"host={stack.HOST} port={port} dbname=no_such_db user=postgres password='{password}'"
        f" sslpassword={ssl_password}",
    )
    for dsn in dsns:
        run = subprocess.run(
            [str(Path(sys.prefix) / "bin" / "luigi"), "--module", "pipeline", "RunAll", *LOCAL],
            cwd=ROOT,
            env=d.env(CDC_POSTGRES_DSN=dsn, **private_luigi_locks(d.run_dir)),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 30, run.stderr[-2000:]
        shown = run.stdout + run.stderr
        assert "(CDC_POSTGRES_DSN) is unreachable" in shown and "password=***" in shown
        assert password not in shown and ssl_password not in shown
        wrapped = d.cdc_run("--run-dir", str(d.run_dir), CDC_POSTGRES_DSN=dsn)
        assert wrapped.returncode == 1
        assert "password=***" in d.log_text()
        assert password not in d.log_text() + wrapped.stderr
    errors = [r["error"] for r in _runs(server, d.database, "status = 'FAILURE'")]
    assert len(errors) == 8 and all("password=***" in e for e in errors), errors
    assert not any(password in e or ssl_password in e for e in errors)


def test_wrapper_finds_cdc_run_of_cdc_venv_then_project_venv_then_path(
    deploy: Callable[..., Deployment], tmp_path: Path
) -> None:
    """Installed with `pip install -e .` outside <project>/.venv, the wrapper exited 78."""
    d = deploy()
    project = tmp_path / "elsewhere"
    (project / "setup" / "cron").mkdir(parents=True)
    shutil.copy(CDC_RUN, project / "setup" / "cron" / "cdc-run")
    for name in ("luigi.cfg", "sql"):
        (project / name).symlink_to(ROOT / name)
    wrapper = str(project / "setup" / "cron" / "cdc-run")
    env = {k: v for k, v in d.env().items() if k != "CDC_VENV"}
    on_path = {**env, "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin"}
    ran = subprocess.run(
        [wrapper, "--run-dir", str(d.run_dir)], env=on_path, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr + d.log_text()[-2000:]
    assert "finished: exit 0" in d.log_text()
    for broken in ({**on_path, "CDC_VENV": str(tmp_path / "no-venv")}, {**env, "PATH": "/bin"}):
        refused = subprocess.run([wrapper], env=broken, capture_output=True, text=True)
        assert refused.returncode == 78
        assert "CDC_VENV" in refused.stderr and "configuration error" in refused.stderr


def test_cdc_run_batch_runs_that_batch_alone(deploy: Callable[..., Deployment]) -> None:
    d = deploy()
    bad = d.cdc_run("--run-dir", str(d.run_dir), "--batch", "yesterday")
    assert bad.returncode == 78 and "--batch" in bad.stderr and "YYYYMMDD" in bad.stderr
    batch = new_batch_id()
    ran = d.cdc_run("--run-dir", str(d.run_dir), "--batch", batch)
    assert ran.returncode == 0, ran.stderr + d.log_text()[-2000:]
    assert f"running batch {batch}" in d.log_text() and "starting batch" not in d.log_text()
    again = d.cdc_run("--run-dir", str(d.run_dir), "--batch", batch)
    assert again.returncode == 0
    assert d.log_text().count(f"batch {batch}: complete") == 2


def test_assistant_on_another_process_shares_the_batch_through_luigid(
    deploy: Callable[..., Deployment],
    server_url: str,
    server: Any,
    luigid: tuple[stack.Service, Path],
    tmp_path: Path,
) -> None:
    """The scale-out path: an assistant worker takes tasks of the wrapper's batch from luigid."""
    url = luigid[0].env["LUIGID_URL"]
    d = deploy(server_url)
    fast = tmp_path / "poll.cfg"
    fast.write_text("[worker]\nwait_interval = 0.1\nwait_jitter = 0.1\n")
    with (tmp_path / "assistant.log").open("wb") as out:
        assistant = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cron", "--assistant", "--scheduler-url", url],
            cwd=ROOT,
            env=d.env(LUIGI_CONFIG_PATH=str(fast)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while json.loads(_api(url, "worker_list"))["response"] == []:
            assert assistant.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        run = d.cdc_run("--run-dir", str(d.run_dir), "--scheduler-url", url)
        assert run.returncode == 0, run.stderr + d.log_text()[-3000:]
        while len(_runs(server, d.database, "status = 'SUCCESS'")) < 13:
            assert time.monotonic() < deadline + 60  # the assistant's last audit row is due
            time.sleep(0.1)
    finally:
        assistant.terminate()
        try:
            stopped = assistant.wait(timeout=30)
        except subprocess.TimeoutExpired:
            assistant.kill()
            stopped = assistant.wait()
    assert stopped == 0, (tmp_path / "assistant.log").read_text()[-3000:]
    rows = _runs(server, d.database, "status = 'SUCCESS'")
    assert len(rows) == 13 and len({r["pid"] for r in rows}) == 2
    assert server.scalar(f"SELECT count() FROM `{d.database}`.dim_users") == USERS


# --- the report ------------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("Debian's chromium is needed: apt-get install -y chromium")
    return found


def _headless(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_headless_chromium(
    deploy: Callable[..., Deployment],
    server_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    d = deploy(server_url)
    with d.in_this_process(monkeypatch):
        for seed in range(3):
            if seed:
                v = d.values
                simulate(v["CDC_MONGO_URI"], v["CDC_MONGO_DB"], v["CDC_POSTGRES_DSN"], 12, seed)
            built = luigi.build(
                [RunAll(batch=new_batch_id())], local_scheduler=True, detailed_summary=True
            )
            assert built.status == LuigiStatusCode.SUCCESS
    page = tmp_path / "report.html"
    written = d.cli("report", "--output", str(page))
    assert written.returncode == 0, written.stderr
    html = page.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<script" not in html

    dom = _headless(tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<svg id="lineage"') == 1
    for name in ("src:users", "raw_orders", "users_snapshot", "dim_users", "fct_orders"):
        assert f'data-id="{name}"' in dom.stdout
    assert dom.stdout.count('class="edge"') >= 9
    assert dom.stdout.count('<svg class="chart"') == 3
    assert dom.stdout.count('data-batches="3"') == 3
    assert dom.stdout.count('class="bar opened"') == 9

    # the README's picture: refresh it with CDC_REPORT_SCREENSHOT=docs/report.png
    shot = Path(os.environ.get("CDC_REPORT_SCREENSHOT", tmp_path / "report.png")).resolve()
    shot.parent.mkdir(exist_ok=True)
    taken = _headless(
        tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri()
    )
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
