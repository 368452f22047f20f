"""The marts' Luigi task: one `sql/<name>.sql`, built after what it reads, then tested."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import luigi

from pipeline import runtime
from pipeline.core.names import mart_marker
from pipeline.marts.build import build
from pipeline.marts.data_tests import run_tests
from pipeline.marts.project import Mart, load_project
from pipeline.snapshot.tasks import Snapshot
from pipeline.state import StageResult
from pipeline.task import MarkerTarget, PipelineTask
from pipeline.warehouse.cluster import user_sql

log = logging.getLogger("pipeline")

SQL_DIR = Path(__file__).resolve().parent.parent.parent / "sql"


def sql_dir() -> Path:
    """The marts' directory: `CDC_SQL_DIR`, else `sql/` of the project."""
    return Path(os.environ.get("CDC_SQL_DIR", SQL_DIR))


def project() -> dict[str, Mart]:
    """The validated mart project of this deployment (sources and snapshots are known)."""
    cfg = runtime.settings()
    known = {e.snapshot_table for e in cfg.entities} | {e.raw_table for e in cfg.entities}
    return load_project(sql_dir(), cfg.database, known)


class BuildMart(PipelineTask):
    """One sql/<name>.sql, built atomically after what it reads, then its data tests."""

    stage = "mart"
    name: str = luigi.Parameter()
    batch: str = luigi.Parameter()

    @property
    def subject(self) -> str:
        return mart_marker(self.name)

    def requires(self) -> list[luigi.Task]:
        cfg = runtime.settings()
        mart = project()[self.name]
        tables = {e.snapshot_table: e.name for e in cfg.entities}
        tables |= {e.raw_table: e.name for e in cfg.entities}
        deps: list[luigi.Task] = []
        for table in sorted(mart.depends_on):
            if table in tables:
                deps.append(Snapshot(entity=tables[table], batch=self.batch))
            else:
                deps.append(BuildMart(name=table, batch=self.batch))
        return deps

    def output(self) -> luigi.Target:
        return MarkerTarget(self.subject, self.stage, self.batch)

    def execute(self) -> None:
        cfg, wh = runtime.settings(), runtime.warehouse()
        mart = project()[self.name]
        self.set_status_message(f"building {mart.name}")
        rows = build(wh, cfg.database, mart)
        self.set_status_message(f"built {rows} rows; running tests")
        with user_sql(wh):  # on a cluster: tests may join tables sharded differently
            results = run_tests(wh, cfg.database, mart)
        for result in results:
            log.info("mart %s test %s", mart.name, result)
        self.record(StageResult(rows_out=rows))
