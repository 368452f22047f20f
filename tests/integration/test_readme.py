"""The README's commands, run as written, in a shell, in a project directory after a demo run.

Each block marked `<!-- tested: NAME -->` in README.md is run by bash from a directory laid out
like a fresh clone after `make demo`: `.venv`, `luigi.cfg`, `sql/` and `setup/` of this checkout,
and `.stack/env` naming the session's servers, a luigid of its own and a chDB directory of its
own (chDB serves one directory per process, and this process holds the session's).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from setup import stack
from setup.generate_data import generate
from tests.support import ROOT, private_luigi_locks
from tests.support.readme import readme_blocks

EXAMPLE_BATCH = "20261201T000000000000Z"
FOREIGN = ("LUIGID_URL", "CDC_ALERT_WEBHOOK", "CDC_FAILPOINT", "CDC_RUN_DIR", "CDC_ENV_FILE")


class Project:
    """A directory shaped like the checkout after `make demo`, and a shell in it."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env

    def shell(self, script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        base = {
            k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith("CDC_")
        }
        locks = private_luigi_locks(self.path / "home")
        env = {**base, "HOME": str(self.path / "home"), **locks, **extra}
        return subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def run_ok(self, script: str, **extra: str) -> str:
        done = self.shell(script, **extra)
        assert done.returncode == 0, (
            f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
        return done.stdout


@pytest.fixture
def project(
    stack_env: dict[str, str], pg_dsn_factory: Callable[[], str], tmp_path: Path
) -> Iterator[Project]:
    luigid = stack.start_luigid(tmp_path / "luigid")
    path = tmp_path / "proj"
    (path / ".stack").mkdir(parents=True)
    (path / "home").mkdir()
    for name in (".venv", "luigi.cfg", "sql", "setup"):
        (path / name).symlink_to(ROOT / name)
    tag = uuid.uuid4().hex[:10]
    env = {
        **stack_env,
        **luigid.env,
        "CDC_MONGO_DB": f"readme_{tag}",
        "CDC_POSTGRES_DSN": pg_dsn_factory(),
        "CDC_STAGING_URL": f"s3://{stack.BUCKET}/readme-{tag}/",
        "CDC_WAREHOUSE_URL": f"chdb://{path / '.stack' / 'warehouse'}",
        "CDC_DATABASE": stack.DATABASE,
    }
    lines = [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
    (path / ".stack" / "env").write_text("\n".join(lines) + "\n")
    generate(env["CDC_MONGO_URI"], env["CDC_MONGO_DB"], env["CDC_POSTGRES_DSN"], 30, 5, 40, seed=3)
    yield Project(path, env)
    stack.stop(luigid)
    import pymongo

    with pymongo.MongoClient(env["CDC_MONGO_URI"]) as client:
        client.drop_database(env["CDC_MONGO_DB"])


def demo_run(project: Project) -> None:
    """What `make demo` runs after generating the data."""
    project.run_ok(
        "set -a; source .stack/env; set +a\n"
        '.venv/bin/luigi --module pipeline RunAll --scheduler-url "$LUIGID_URL"'
    )


def test_seed_cdc_check_as_written(project: Project) -> None:
    demo_run(project)
    out = project.run_ok(readme_blocks()["cdc-check"])
    rows = [line for line in out.splitlines() if line.startswith("(")]
    assert len(rows) == 2, out
    assert "'Senior Engineer'" in rows[1] and rows[1].endswith("None)")
    assert "'Senior Engineer'" not in rows[0] and not rows[0].endswith("None)")


def test_resume_of_a_failed_batch_as_written(project: Project) -> None:
    """Each documented spelling resumes a batch whose raw load failed after writing a part."""
    demo_run(project)
    resume = readme_blocks()["resume"].splitlines()
    assert resume[0].startswith("setup/cron/cdc-run --batch ") and "--RunAll-batch" in resume[1]
    for command in resume:
        failed = project.shell(
            "set -a; source .stack/env; set +a\n.venv/bin/luigi --module pipeline RunAll"
            " --local-scheduler",
            CDC_FAILPOINT="raw-after-part",
        )
        assert failed.returncode == 30, failed.stderr  # [retcode] task_failed
        status = json.loads(
            project.run_ok(
                "set -a; source .stack/env; set +a\n.venv/bin/python -m pipeline status --json"
            )
        )
        batch = status["unfinished_batch"]
        assert batch is not None
        project.run_ok(
            "set -a; source .stack/env; set +a\n" + command.replace(EXAMPLE_BATCH, batch)
        )
        after = json.loads(
            project.run_ok(
                "set -a; source .stack/env; set +a\n.venv/bin/python -m pipeline status --json"
            )
        )
        assert after["unfinished_batch"] is None
        finished = {r["stage"]: r for r in after["runs"] if r["entity"] == "users"}
        assert finished["snapshot"]["batch_id"] == batch
        assert finished["snapshot"]["status"] == "SUCCESS"


def test_short_batch_option_is_refused_by_luigi_as_documented(project: Project) -> None:
    done = project.shell(
        "set -a; source .stack/env; set +a\n"
        f".venv/bin/luigi --module pipeline RunAll --batch {EXAMPLE_BATCH} --local-scheduler"
    )
    assert done.returncode == 2 and "ambiguous option: --batch" in done.stderr


def test_status_and_report_as_written(project: Project) -> None:
    demo_run(project)
    out = project.run_ok(readme_blocks()["operations"])
    assert "Last runs" in out and "users_snapshot" in out
    report = (project.path / "report.html").read_text()
    assert "<svg" in report and "users_snapshot" in report


def test_luigi_runs_exit_zero_every_time(project: Project) -> None:
    """chDB's background threads once crashed a third of the processes at exit (SIGSEGV, 139)
    after every task had succeeded: cron saw failures that were not there."""
    codes = [
        project.shell(
            "set -a; source .stack/env; set +a\n"
            ".venv/bin/luigi --module pipeline RunAll --local-scheduler"
        ).returncode
        for _ in range(5)
    ]
    assert codes == [0] * 5
