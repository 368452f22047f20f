"""Luigi workers in several processes against one luigid: each task runs once, every process
exits 0 when the batch is complete, and the result equals one worker's. chDB refuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline.core.batch import new_batch_id
from setup import stack
from tests.conftest import Env
from tests.integration.cluster.conftest import Deployments, Node, deployment
from tests.integration.cluster.test_pipeline import read_all
from tests.support import ROOT

LUIGI = str(Path(sys.executable).parent / "luigi")
# users extracted in three `_id` ranges: more tasks to spread over the workers
RANGES = "[entity.users]\npartitions = 3\n"
TASKS = 17  # PlanRanges, 3 ExtractRange, 3 x (Extract, LoadRaw, Snapshot), 3 marts, RunAll
ONE_PROCESS = "chDB is embedded in one process"


@pytest.fixture
def luigid(tmp_path: Path) -> Iterator[stack.Service]:
    service = stack.start_luigid(tmp_path / "luigid")
    yield service
    stack.stop(service, timeout=5)


def worker(env: Env, config: Path, *args: str) -> subprocess.Popen[str]:
    """`luigi --module pipeline RunAll ...` in a process of its own, as on another machine."""
    settings = {**os.environ, **env.values, "LUIGI_CONFIG_PATH": str(config)}
    return subprocess.Popen(
        [LUIGI, "--module", "pipeline", "RunAll", *args],
        cwd=ROOT,
        env=settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_workers_on_one_luigid_run_each_task_once(
    on_cluster: Env,
    luigid: stack.Service,
    deployments: Deployments,
    node2: Node,
    tmp_path: Path,
) -> None:
    on_cluster.generate(users=400, products=20, orders=400)
    config = tmp_path / "luigi.cfg"
    config.write_text(RANGES)
    batch = new_batch_id()
    args = ("--RunAll-batch", batch, "--scheduler-url", luigid.env["LUIGID_URL"])
    # two machines: each has its own pid lock (luigi refuses a second equal command on one)
    machines = [str(tmp_path / f"machine{n}") for n in (1, 2)]
    workers = [worker(on_cluster, config, *args, "--lock-pid-dir", m) for m in machines]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    db = on_cluster.database
    runs = node2.rows(
        f"SELECT task_id, status, pid FROM `{db}`._cdc_runs WHERE batch_id = %(b)s", {"b": batch}
    )
    task_ids = [task_id for task_id, _, _ in runs]
    assert len(task_ids) == len(set(task_ids)) == TASKS  # each task ran once
    assert {status for _, status, _ in runs} == {"SUCCESS"}
    assert len({pid for _, _, pid in runs}) == 2  # both processes ran some
    assert any("ExtractRange" in t for t in task_ids)

    alone = deployment({**on_cluster.values})  # the same sources, one worker, one extract range
    try:
        with deployments.use(alone) as env:
            _, status = env.run(batch)
            assert status == LuigiStatusCode.SUCCESS
            expected = read_all(env.rows, env.database)
        assert read_all(node2.rows, db) == expected
    finally:
        with deployments.use(alone) as env:
            env.wh.execute(
                f"DROP DATABASE IF EXISTS `{env.database}` ON CLUSTER {env.values['CDC_CLUSTER']}"
            )


@pytest.fixture
def on_chdb(sources: dict[str, str], tmp_path: Path) -> Env:
    """A chDB warehouse of its own (the test session's chDB stays with the test process)."""
    env = deployment(sources, CDC_WAREHOUSE_URL=f"chdb://{tmp_path / 'warehouse'}")
    env.generate(users=30, products=5, orders=30)
    return env


def test_chdb_refuses_a_forked_second_worker(on_chdb: Env, tmp_path: Path) -> None:
    config = tmp_path / "luigi.cfg"
    config.write_text("")
    run = worker(on_chdb, config, "--workers", "2", "--local-scheduler")
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 30, output[-3000:]
    assert ONE_PROCESS in output and "was forked from process" in output


def test_chdb_refuses_a_second_process(on_chdb: Env, tmp_path: Path) -> None:
    config = tmp_path / "luigi.cfg"
    config.write_text("")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.warehouse import connect;"
            " connect(sys.argv[1]).scalar('SELECT 1'); print('open', flush=True); time.sleep(120)",
            on_chdb.values["CDC_WAREHOUSE_URL"],
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        run = worker(on_chdb, config, "--local-scheduler")
        output = run.communicate(timeout=300)[0]
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode != 0
    assert ONE_PROCESS in output and "another process probably has it open" in output
