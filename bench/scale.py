"""The scale run: the full-scan users path at 1M and 10M documents, on one ClickHouse server
with one worker and on a 2-shard cluster with two workers sharing one luigid.

    python -m bench.run --scale [--scale-sizes 1000000,10000000] [--root DIR] [--keep]

Not part of `make bench`: generating 10M documents alone takes SecantusDB about 17 minutes
here. Each size's users are generated once into a database of their own (kept under `--root`
and reused by a later run with the same root). Per size, in this order, on the same data:
the server's initial run, the cluster's initial run, a 1% change of the users, the server's
run, the cluster's run. A run is `Snapshot(users)` and what it needs (extract -> staging ->
raw -> snapshot), each worker a fresh process; the cluster's users are extracted in
`--scale-partitions` `_id` ranges, so both workers have extract tasks. Wall time is from the
first worker's start to the last one's exit; peak RSS is each process's own (VmHWM).
Results go to bench/results/scale-<time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIZES = (1_000_000, 10_000_000)
CHANGE = 0.01
CHANGE_MIX = {"updated": 0.8, "inserted": 0.15, "deleted": 0.05}
SHAPE = "cdc_sharded"
STEP_TIMEOUT = 7200.0


@dataclass
class Run:
    """One measured run: its processes' exits, peaks and tasks, and the wall time of all."""

    size: int
    target: str  # "server" or "cluster"
    phase: str  # "initial" or "change1"
    wall: float
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def per_million(self) -> float:
        return self.wall / (self.size / 1_000_000)


def _setup_module(name: str) -> Any:
    """A script of setup/ (a folder of scripts, not a package), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "setup" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_users(uri: str, database: str, size: int) -> float:
    """Generate `size` users once; seconds spent (0 when the database already holds them)."""
    import pymongo

    with pymongo.MongoClient(uri) as client:
        if client[database]["users"].estimated_document_count() == size:
            return 0.0
    generate = _setup_module("generate_data")
    rng = random.Random(size)
    began = time.perf_counter()
    docs = (generate.make_user(rng, n) for n in range(1, size + 1))
    generate.load_users(uri, database, docs)
    return time.perf_counter() - began


def change_users(uri: str, database: str, size: int, seed: int) -> dict[str, int]:
    """Change 1% of the users by `_id` (reproducible from the user number, so no full scan):
    checked-column updates, deletions and sign-ups, every update a real change."""
    import pymongo

    generate = _setup_module("generate_data")
    rng = random.Random(seed)
    counts = {kind: round(size * CHANGE * share) for kind, share in CHANGE_MIX.items()}
    picked = rng.sample(range(1, size + 1), counts["updated"] + counts["deleted"])
    updated, deleted = picked[: counts["updated"]], picked[counts["updated"] :]
    with pymongo.MongoClient(uri) as client:
        users = client[database]["users"]
        # one point lookup per user: SecantusDB answers `_id: {$in: [...]}` by a collection
        # scan that tests every id (80K ids over 10M users ran for over 20 minutes)
        found = (
            users.find_one({"_id": generate.user_object_id(n)}, {"occupation": 1}) for n in updated
        )
        current = {d["_id"]: d.get("occupation") for d in found if d is not None}
        ops: list[Any] = [
            pymongo.UpdateOne(
                {"_id": _id},
                {"$set": {"occupation": rng.choice([o for o in generate.OCCUPATIONS if o != job])}},
            )
            for _id, job in current.items()
        ]
        ops += [pymongo.DeleteOne({"_id": generate.user_object_id(n)}) for n in deleted]
        users.bulk_write(ops, ordered=False)
        new = range(size + 1, size + 1 + counts["inserted"])
        users.insert_many([generate.make_user(rng, n) for n in new])
    return counts


def launch(env: dict[str, str], out: Path, log: Path, batch: str, url: str | None) -> Any:
    cmd = [sys.executable, "-m", "bench.scale", "worker", "--out", str(out), "--batch", batch]
    if url:
        cmd += ["--scheduler-url", url]
    with log.open("wb") as sink:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=sink)


def measure(
    root: Path, name: str, env: dict[str, str], batch: str, workers: int, url: str | None
) -> tuple[float, list[dict[str, Any]]]:
    """Start `workers` processes on one batch; wall time until the last exits, their reports."""
    (root / "out").mkdir(parents=True, exist_ok=True)
    outs = [root / "out" / f"{name}-{n}.json" for n in range(workers)]
    began = time.perf_counter()
    procs = [launch(env, o, o.with_suffix(".log"), batch, url) for o in outs]
    reports = []
    for proc, out in zip(procs, outs, strict=True):
        _, status, usage = os.wait4(proc.pid, 0)
        report = json.loads(out.read_text()) if out.exists() else {"ok": False}
        report["exit"] = os.waitstatus_to_exitcode(status)
        report.setdefault("peak_kb", usage.ru_maxrss)
        reports.append(report)
    wall = time.perf_counter() - began
    failed = [r for r in reports if r["exit"] != 0 or not r.get("ok")]
    if failed:
        raise RuntimeError(f"{name}: a worker failed; logs under {root / 'out'}: {failed}")
    print(
        f"  {name:<28} {wall:8.1f} s  peaks "
        + ", ".join(f"{r['peak_kb'] / 1024:.0f} MB" for r in reports),
        flush=True,
    )
    return wall, reports


def deployments(
    base: dict[str, str], root: Path, tag: str, size: int, cluster: Any, partitions: int
) -> dict[str, dict[str, str]]:
    """The server's and the cluster's settings for one size (own database and staging)."""
    config = root / f"cluster-{partitions}.cfg"
    # an idle worker asks luigid for work every 0.5 s (Luigi's default: 1 s plus up to 5 s)
    config.write_text(
        f"[entity.users]\npartitions = {partitions}\n[worker]\nwait_interval = 0.5\n"
        "wait_jitter = 0.5\n"
    )
    common = {**os.environ, **base, "PYTHONUNBUFFERED": "1", "CDC_MONGO_DB": f"scale_{size}"}
    for key in ("CDC_CLUSTER", "CDC_REPLICATED_PATH_PREFIX", "LUIGI_CONFIG_PATH"):
        common.pop(key, None)
    server = {**common, "CDC_DATABASE": f"scale_{tag}_{size}_server"}
    server["CDC_STAGING_URL"] = f"s3://cdc-staging/scale-{tag}/{size}/server/"
    on_cluster = {**common, **cluster.env(SHAPE), "LUIGI_CONFIG_PATH": str(config)}
    on_cluster["CDC_DATABASE"] = f"scale_{tag}_{size}_cluster"
    on_cluster["CDC_STAGING_URL"] = f"s3://cdc-staging/scale-{tag}/{size}/cluster/"
    return {"server": server, "cluster": on_cluster}


def run_size(
    root: Path, size: int, envs: dict[str, dict[str, str]], url: str, save: Any
) -> tuple[list[Run], dict[str, int]]:
    """Both targets, initial then 1% change; a failed run is reported and skips its target's
    next phase (it would meet a history the first did not finish)."""
    runs, changed, failed = [], {}, set()
    for phase in ("initial", "change1"):
        if phase == "change1":
            env = envs["server"]
            changed = change_users(env["CDC_MONGO_URI"], env["CDC_MONGO_DB"], size, seed=size)
        batch = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        for target, workers, scheduler in (("server", 1, None), ("cluster", 2, url)):
            if target in failed:
                continue
            name = f"{size}-{target}-{phase}"
            try:
                wall, reports = measure(root, name, envs[target], batch, workers, scheduler)
            except RuntimeError as exc:
                print(f"  {name}: FAILED {exc}", flush=True)
                failed.add(target)
                runs.append(Run(size, target, phase, float("nan"), [{"failed": str(exc)}]))
            else:
                runs.append(Run(size, target, phase, wall, reports))
            save(runs)
    return runs, changed


def render(runs: list[Run]) -> str:
    lines = [
        "| users | target | phase | wall s | s per 1M | peak RSS per process | tasks per process |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r.wall != r.wall:  # NaN: the run failed
            lines.append(f"| {r.size:,} | {r.target} | {r.phase} | failed | | | |")
            continue
        peaks = " / ".join(f"{w['peak_kb'] / 1024:.0f} MB" for w in r.workers)
        tasks = " / ".join(str(len(w.get("ran", []))) for w in r.workers)
        lines.append(
            f"| {r.size:,} | {r.target} | {r.phase} | {r.wall:.1f} | {r.per_million:.1f}"
            f" | {peaks} | {tasks} |"
        )
    by = {(r.size, r.target, r.phase): r for r in runs}
    sizes = sorted({r.size for r in runs})
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        for target in ("server", "cluster"):
            for phase in ("initial", "change1"):
                a, b = by.get((small, target, phase)), by.get((big, target, phase))
                if a and b and a.wall == a.wall and b.wall == b.wall:
                    lines.append(
                        f"\n{target} {phase}: {b.per_million:.1f} s per 1M at {big:,} against"
                        f" {a.per_million:.1f} at {small:,} ({b.per_million / a.per_million:.2f}x)"
                    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run --scale")
    parser.add_argument("--scale-sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--scale-partitions", type=int, default=2)
    parser.add_argument("--root", type=Path, help="services, data and scratch (kept)")
    parser.add_argument("--keep", action="store_true", help="keep the warehouse databases")
    args, _ = parser.parse_known_args(argv)
    from setup import stack

    sizes = [int(s) for s in args.scale_sizes.split(",")]
    root = (args.root or Path("/tmp/cdc-scale")).resolve()
    tag = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    services: dict[str, Any] = {}
    cluster = None
    runs: list[Run] = []
    meta: dict[str, Any] = {"started": tag, "sizes": sizes, "cpus": os.cpu_count(), "setup": {}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale-{tag}.json"
    try:
        services = stack.start_services(root / "stack", ["mongodb", "s3", "clickhouse", "luigid"])
        cluster = stack.start_cluster(root / "stack" / "cluster")
        base: dict[str, str] = {"CDC_MONGO_DB": stack.SOURCE_DB}
        for service in services.values():
            base.update(service.env)
        url = base.pop("LUIGID_URL")
        meta["partitions"] = args.scale_partitions

        def save(more: list[Run]) -> None:  # after every run: a failure keeps what was measured
            done = [asdict(r) for r in [*runs, *more]]
            out.write_text(json.dumps({"meta": meta, "runs": done}, indent=1) + "\n")

        for size in sizes:
            uri = base["CDC_MONGO_URI"]
            meta["setup"][f"generate_{size}_s"] = ensure_users(uri, f"scale_{size}", size)
            print(f"scale: {size:,} users ready", flush=True)
            envs = deployments(base, root, tag, size, cluster, args.scale_partitions)
            size_runs, changed = run_size(root, size, envs, url, save)
            runs += size_runs
            meta[f"change_{size}"] = changed
            save([])
            if not args.keep:
                _drop(envs)
    finally:
        if cluster is not None:
            stack.stop_cluster(cluster)
        stack.stop_all(services.values())
    print("\n" + render(runs) + f"\n\nresults: {out.relative_to(ROOT)}")
    return 1 if any(r.wall != r.wall for r in runs) else 0


def _drop(envs: dict[str, dict[str, str]]) -> None:
    """Free the disk a size's databases take before the next size."""
    from pipeline.warehouse import connect

    for env in envs.values():
        on = f" ON CLUSTER {env['CDC_CLUSTER']}" if "CDC_CLUSTER" in env else ""
        with connect(env["CDC_WAREHOUSE_URL"]) as wh:
            wh.execute(f"DROP DATABASE IF EXISTS `{env['CDC_DATABASE']}`{on}")


def worker(argv: list[str]) -> int:
    """One measured worker process: `Snapshot(users)` of a batch, its own peak and tasks."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale worker")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--scheduler-url")
    args = parser.parse_args(argv)
    import luigi
    from luigi.execution_summary import LuigiStatusCode

    import pipeline
    from bench.worker import peak_rss_kb
    from pipeline.graph import Snapshot

    pipeline.runtime.without_pandas()
    ran: list[str] = []
    seconds: dict[str, float] = {}

    @luigi.Task.event_handler(luigi.Event.SUCCESS)
    def _ran(task: luigi.Task) -> None:
        ran.append(task.task_id)

    @luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
    def _timed(task: luigi.Task, spent: float) -> None:
        seconds[task.get_task_family()] = seconds.get(task.get_task_family(), 0.0) + spent

    where: dict[str, Any] = {"local_scheduler": True}
    if args.scheduler_url:
        where = {"scheduler_url": args.scheduler_url}
    began = time.perf_counter()
    result = luigi.build(
        [Snapshot(entity="users", batch=args.batch)],
        workers=1,
        log_level="WARNING",
        detailed_summary=True,
        **where,
    )
    report = {
        "ok": result.status in (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY),
        "status": result.status.name,
        "inside": time.perf_counter() - began,
        "ran": ran,
        "seconds": seconds,
        "pid": os.getpid(),
        "peak_kb": peak_rss_kb(),
    }
    args.out.write_text(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        raise SystemExit(worker(sys.argv[2:]))
    raise SystemExit(main(sys.argv[1:]))
