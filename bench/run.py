"""Benchmarks: our pipeline beside the physical floors and dlt, same machine, same data, same run.

    python -m bench.run [--users N] [--repeat K] [--no-peers] [--quick] [--big]
                        [--warehouse chdb|clickhouse] [--profile]

Starts its own MongoDB/PostgreSQL/S3 (and ClickHouse with --warehouse clickhouse), generates
data with setup/generate_data.py, and runs every measured step in a fresh process: wall time and
peak RSS are that process's, imports and Luigi start-up included. Prints one table and writes
bench/results/<time>.json. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import changestream, envs, log_capture
from bench.report import render, summarise

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIDE = ROOT / ".bench"
BUCKET = "cdc-staging"
STEP_TIMEOUT = 1800.0
BIG_USERS = 1_000_000
# a "1% change" of the users collection: mostly checked-column updates, some sign-ups, some
# closed accounts (hard_deletes = invalidate retires those)
USER_CHANGE_MIX = {"users_updated": 0.8, "users_inserted": 0.15, "users_deleted": 0.05}
ORDER_CHANGE_MIX = {"orders_updated": 0.8, "orders_inserted": 0.2}


class BenchError(RuntimeError):
    """A measured step failed; the message names it and its log."""


@dataclass
class Sample:
    """One measured process."""

    wall: float
    rss_mb: float
    inside: float | None = None
    import_s: float | None = None
    rows: int | None = None
    stages: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _load_setup(name: str) -> ModuleType:
    """setup/ is a folder of scripts, not a package: load one by path (as the tests do)."""
    setup_dir = str(ROOT / "setup")
    if setup_dir not in sys.path:
        sys.path.insert(0, setup_dir)
    spec = importlib.util.spec_from_file_location(name, ROOT / "setup" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def batch_id() -> str:
    """Same format as pipeline.core.batch.new_batch_id, without importing the package here."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


class Bench:
    """Runs measured processes and keeps their samples under figure names."""

    def __init__(self, args: argparse.Namespace, root: Path, env: dict[str, str]) -> None:
        self.args = args
        self.root = root
        self.env = env
        self.tag = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        self.samples: dict[str, list[Sample]] = {}
        self.failures: dict[str, str] = {}
        self.notes: list[str] = []
        self.floors_python: Path | None = None
        self.dlt_python: Path | None = None
        self.warehouse_url: str | None = None
        self._n = 0

    # -- processes ---------------------------------------------------------------------------

    def measure(
        self, name: str, cmd: list[str], env: dict[str, str], profile: Path | None = None
    ) -> Sample:
        """Run one step in a fresh process; the wall clock is taken from outside.

        Peak RSS is the child's own VmHWM (see `peak_rss_kb` in the workers); `wait4`'s
        figure is only a fallback, as it can carry this process's peak over `exec`.
        """
        self._n += 1
        out = self.root / "out" / f"{self._n:03d}.json"
        log = self.root / "logs" / f"{self._n:03d}-{name.replace('/', '_')}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        full = [*cmd, "--out", str(out)]
        if profile is not None:
            py_spy = self.py_spy()
            full = [str(py_spy), "record", "--idle", "--threads", "--nonblocking", "-r", "100"]
            full += ["-f", "raw"]
            full += ["-o", str(profile), "--", *cmd, "--out", str(out)]
        with log.open("wb") as sink:
            begin = time.perf_counter()
            proc = subprocess.Popen(
                full, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
            )
            timer = threading.Timer(STEP_TIMEOUT, proc.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            wall = time.perf_counter() - begin
        proc.returncode = os.waitstatus_to_exitcode(status)
        data = json.loads(out.read_text()) if out.exists() else {}
        if proc.returncode != 0 or not data or data.get("ok") is False:
            detail = data.get("error", "") if data else ""
            raise BenchError(f"{name} failed (exit {proc.returncode}); log: {log}\n{detail}")
        wall -= data.get("count_s") or 0.0  # the bench's own counting after the run
        sample = Sample(
            wall=wall,
            rss_mb=(data.get("peak_kb") or usage.ru_maxrss) / 1024,
            inside=data.get("inside"),
            import_s=data.get("import_s"),
            rows=data.get("rows"),
            stages=data.get("stages", {}),
            extra={k: v for k, v in data.items() if k in ("entities", "extra", "open_s")},
        )
        print(
            f"  {name:<34} {wall:7.2f} s  {sample.rss_mb:7.0f} MB  rows {sample.rows}",
            flush=True,
        )
        return sample

    def record(self, name: str, sample: Sample) -> Sample:
        self.samples.setdefault(name, []).append(sample)
        return sample

    def attempt(
        self, name: str, fn: Any, *args: Any, phase: str | None = None, **kwargs: Any
    ) -> Sample | None:
        """Measure and record; a failure is recorded and reported, and the run goes on."""
        try:
            sample = fn(name, *args, **kwargs)
            if phase is not None:
                sample.extra["phase"] = phase
            return self.record(name, sample)
        except BenchError as exc:
            self.failures.setdefault(name, str(exc))
            print(f"  {name}: FAILED\n{exc}", file=sys.stderr, flush=True)
            return None

    # -- environments ------------------------------------------------------------------------

    def py_spy(self) -> str:
        """py-spy from the floors venv (it installs there), this venv, or PATH."""
        places = [Path(sys.executable).parent]
        if self.floors_python is not None:
            places.insert(0, self.floors_python.parent)
        for place in places:
            if (place / "py-spy").exists():
                return str(place / "py-spy")
        found = shutil.which("py-spy")
        if found is None:
            raise BenchError("--profile needs py-spy (pip install py-spy)")
        return found

    def pipeline_env(self, seq: str) -> dict[str, str]:
        """An isolated deployment: own warehouse (fresh chDB dir or database) and staging prefix."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        if self.args.warehouse == "chdb":
            env["CDC_WAREHOUSE_URL"] = f"chdb://{self.root / 'warehouse' / seq}"
            env["CDC_DATABASE"] = "data_pipeline"
        else:
            assert self.warehouse_url
            env["CDC_WAREHOUSE_URL"] = self.warehouse_url
            env["CDC_DATABASE"] = f"bench_{self.tag}_{seq}".replace("-", "_")
        env["CDC_STAGING_URL"] = f"s3://{BUCKET}/bench-{self.tag}/{seq}/"
        return env

    # -- steps -------------------------------------------------------------------------------

    def ours(
        self,
        name: str,
        seq: str,
        entities: list[str],
        until: str = "snapshot",
        batch: str | None = None,
        profile: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Sample:
        cmd = [sys.executable, "-m", "bench.worker", "--batch", batch or batch_id()]
        cmd += [arg for e in entities for arg in ("--entity", e)] or ["--runall"]
        cmd += ["--until", until]
        return self.measure(name, cmd, {**self.pipeline_env(seq), **(env or {})}, profile)

    def floor(self, name: str, method: str, *options: str) -> Sample:
        if self.floors_python is None:
            raise BenchError(f"{name}: no floors virtualenv")
        cmd = [str(self.floors_python), str(ROOT / "bench" / "floors.py"), method, *options]
        cmd += ["--s3-bucket", BUCKET, "--s3-prefix", f"bench-{self.tag}/"]
        return self.measure(name, cmd, {**os.environ, **self.env})

    def dlt(self, name: str, work: Path) -> Sample:
        if self.dlt_python is None:
            raise BenchError(f"{name}: no dlt virtualenv")
        cmd = [str(self.dlt_python), str(ROOT / "bench" / "peers" / "dlt_scd2.py")]
        cmd += ["--mongo-uri", self.env["CDC_MONGO_URI"], "--mongo-db", self.env["CDC_MONGO_DB"]]
        cmd += ["--work", str(work)]
        return self.measure(name, cmd, {**os.environ, **self.env})


# -- source data -----------------------------------------------------------------------------


def change_users(env: dict[str, str], fraction: float, seed: int) -> dict[str, int]:
    """Change `fraction` of the users: checked-column updates, sign-ups and deletions.

    Same kinds of change as setup/simulate_cdc.py, but addressed by `_id`: the simulator
    matches on `user_id`, which SecantusDB has no index for, and takes minutes at 150K.
    """
    import pymongo

    generate = _load_setup("generate_data")
    rng = random.Random(seed)
    with pymongo.MongoClient(env["CDC_MONGO_URI"]) as client:
        users = client[env["CDC_MONGO_DB"]]["users"]
        docs = list(users.find({}, {"user_id": 1, "occupation": 1, "state": 1}))
        counts = {k: max(1, round(len(docs) * fraction * s)) for k, s in USER_CHANGE_MIX.items()}
        picked = rng.sample(docs, counts["users_updated"] + counts["users_deleted"])
        ops: list[Any] = []
        for doc in picked[: counts["users_updated"]]:
            change = {}
            field = rng.choice(("occupation", "state", "both"))
            if field in ("occupation", "both"):
                change["occupation"] = _other(rng, generate.OCCUPATIONS, doc.get("occupation"))
            if field in ("state", "both"):
                change["state"] = _other(rng, generate.STATES, doc.get("state"))
            ops.append(pymongo.UpdateOne({"_id": doc["_id"]}, {"$set": change}))
        ops += [pymongo.DeleteOne({"_id": d["_id"]}) for d in picked[counts["users_updated"] :]]
        users.bulk_write(ops, ordered=False)
        first = max(int(d["user_id"].removeprefix("USER")) for d in docs) + 1
        new = range(first, first + counts["users_inserted"])
        users.insert_many([generate.make_user(rng, n) for n in new])
    return counts


def _other(rng: random.Random, choices: tuple[str, ...], current: Any) -> str:
    """A different value, so that every update is a real change."""
    return rng.choice([c for c in choices if c != current])


def change_orders(env: dict[str, str], fraction: float, seed: int) -> dict[str, int]:
    """Move `fraction` of the orders along (updated_at = now()) and add new ones."""
    import psycopg2

    simulate = _load_setup("simulate_cdc")
    conn = psycopg2.connect(env["CDC_POSTGRES_DSN"])
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM public.orders")
            total = cur.fetchone()[0]
            counts = {k: round(total * fraction * s) for k, s in ORDER_CHANGE_MIX.items()}
            counts |= {"orders_deleted": 0, "products_updated": 0}
            done: dict[str, list[str]] = {}
            simulate.change_postgres(cur, random.Random(seed), counts, ["USER00000001"], done)
    finally:
        conn.close()
    return {k: len(v) for k, v in done.items()}


def load_users(env: dict[str, str], users: int, seed: int) -> None:
    generate = _load_setup("generate_data")
    rng = random.Random(seed)
    docs = (generate.make_user(rng, n) for n in range(1, users + 1))
    generate.load_users(env["CDC_MONGO_URI"], env["CDC_MONGO_DB"], docs)


# -- scenarios -------------------------------------------------------------------------------


READ_FLOORS = ("mongo_pylist", "mongo_pymongoarrow")
PHASES = ("initial", "nochange", "change1")


def floors_mongo(bench: Bench, scale: str) -> None:
    """The floors measured once per run: the bare scan (reference) and the staging write."""
    bench.attempt(f"{scale}/floor/mongo_list", bench.floor, "mongo_list")
    bench.attempt(f"{scale}/floor/parquet_s3", bench.floor, "parquet_s3")


def users_path(bench: Bench, scale: str, rep: int, peers: bool, ten: bool = False) -> None:
    """Initial, no-change and 1%-change runs of the read floors, ours and dlt, on the same data;
    each of ours is followed by the change-stream deployment's (bench/changestream.py), and
    with `ten` a 10% change is read by the floors and both of ours at the end.

    Within a phase the three run back to back, in an order rotated from phase to phase and
    run to run: the machine is shared and SecantusDB's speed drifts, so each of our runs is
    compared with the floor and the peer measured right beside it (see report._ratio).
    """
    seq = f"{scale}-users-{rep}"
    work = bench.root / "peer" / seq
    ours_ok = True
    for index, phase in enumerate(PHASES):
        if phase == "change1":
            changed = change_users(bench.env, 0.01, seed=1000 + rep)
            bench.notes.append(f"{scale} run {rep}: users change {changed}")

        def floors(phase: str = phase) -> None:
            for method in READ_FLOORS:
                bench.attempt(f"{scale}/floor/{method}", bench.floor, method, phase=phase)

        def ours(phase: str = phase) -> None:
            nonlocal ours_ok
            if ours_ok:
                name = f"{scale}/ours/users_{phase}"
                ours_ok = bench.attempt(name, bench.ours, seq, ["users"], phase=phase) is not None
            changestream.ours(bench, scale, rep, phase)

        def dlt(phase: str = phase) -> None:
            if peers:
                bench.attempt(f"{scale}/dlt/{phase}", bench.dlt, work, phase=phase)

        steps = [floors, ours, dlt]
        shift = (rep + index) % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step()
    if ten:
        changestream.change10(bench, scale, rep)


def orders_path(bench: Bench, scale: str, rep: int) -> None:
    """Orders initial, then a 1% change read incrementally; floors read the same windows."""
    seq = f"{scale}-orders-{rep}"
    initial = bench.attempt(f"{scale}/ours/orders_initial", bench.ours, seq, ["orders"])
    if initial is not None:
        _window_floors(bench, f"{scale}/floor/pg_all", initial)
    slot = log_capture.before_change(bench, scale, rep) if bench.args.log else None
    change_orders(bench.env, 0.01, seed=2000 + rep)
    if initial is None:
        return
    incr = bench.attempt(f"{scale}/ours/orders_incr1", bench.ours, seq, ["orders"])
    if incr is not None:
        _window_floors(bench, f"{scale}/floor/pg_window", incr)
    if slot is not None:
        log_capture.after_change(bench, scale, rep, slot)


def _window_floors(bench: Bench, prefix: str, ours: Sample) -> None:
    window = ours.extra.get("entities", {}).get("orders", {}).get("window") or {}
    if not window.get("upper"):
        bench.failures.setdefault(prefix, "our run reported no window")
        return
    options = ["--upper", window["upper"]]
    if window.get("lower"):
        options += ["--lower", window["lower"]]
    for method in ("pg_cursor", "pg_copy", "pg_adbc", "pg_parquet_s3"):
        bench.attempt(f"{prefix}/{method}", bench.floor, method, *options)


def memory_breakdown(bench: Bench, scale: str) -> None:
    """Each stage of an initial users run in its own process: whose peak RSS is it?"""
    seq = f"{scale}-stages"
    batch = batch_id()
    for stage in ("extract", "load", "snapshot"):
        name = f"{scale}/ours/users_stage_{stage}"
        if bench.attempt(name, bench.ours, seq, ["users"], until=stage, batch=batch) is None:
            return


def profile_users(bench: Bench, scale: str) -> dict[str, Any]:
    """py-spy over an initial and a no-change users run (not counted in the figures)."""
    from bench.profile import summarise_profile

    seq = f"{scale}-profile"
    found: dict[str, Any] = {}
    for run in ("initial", "nochange"):
        raw = RESULTS / f"profile-{bench.tag}-users-{run}.txt"
        try:
            bench.ours(f"{scale}/profile/users_{run}", seq, ["users"], profile=raw)
        except BenchError as exc:
            bench.failures.setdefault(f"{scale}/profile/users_{run}", str(exc))
            return found
        found[run] = {"raw": str(raw.relative_to(ROOT)), **summarise_profile(raw)}
    return found


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--users", type=int, default=150_000)
    parser.add_argument("--orders", type=int, help="default: as many as users")
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--no-peers", action="store_true", help="skip dlt")
    parser.add_argument("--quick", action="store_true", help="20K users, one run, a smoke test")
    parser.add_argument("--big", action="store_true", help=f"also {BIG_USERS:,} users (slow)")
    parser.add_argument("--big-users", type=int, default=BIG_USERS)
    parser.add_argument("--big-repeat", type=int, default=1)
    parser.add_argument("--no-runall", action="store_true", help="skip RunAll end to end")
    parser.add_argument(
        "--no-changestream",
        dest="changestream",
        action="store_false",
        help="skip the users path in mode = changestream",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the users runs")
    parser.add_argument("--log", action="store_true", help="also orders in mode = log")
    parser.add_argument("--log-changes", type=int, default=1_000_000, help="with --log")
    parser.add_argument("--warehouse", choices=("chdb", "clickhouse"), default="chdb")
    parser.add_argument("--root", type=Path, help="services + scratch (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the scale run instead (1M and 10M users, one server against a 2-shard cluster"
        " with 2 workers; options --scale-sizes, --scale-partitions; see bench/scale.py)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.users = min(args.users, 20_000)
        args.repeat = 1
    args.orders = args.users if args.orders is None else args.orders
    return args


def scale_name(users: int) -> str:
    return f"{users // 1_000_000}M" if users % 1_000_000 == 0 else f"{users // 1000}K"


def code_version() -> dict[str, Any]:
    """The commit measured, and which pipeline files differ from it (others edit concurrently)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "pipeline", "sql", "luigi.cfg").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": changed}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "--scale" in given:
        from bench import scale

        return scale.main([a for a in given if a != "--scale"])
    args = parse_args(argv)
    # background jobs start with SIGINT ignored, and SIGTERM would skip `finally`: both must
    # still stop the services this run started
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    from setup import stack

    started = time.perf_counter()
    load_before = os.getloadavg()
    code_before = code_version()
    root = args.root or Path(
        subprocess.check_output(["mktemp", "-d", "/tmp/cdc-bench.XXXXXX"], text=True).strip()
    )
    root = root.resolve()
    print(f"bench: scratch under {root}", flush=True)
    services: dict[str, Any] = {}
    bench: Bench | None = None
    profile: dict[str, Any] = {}
    setup: dict[str, float] = {}
    try:
        begin = time.perf_counter()
        names = [*stack.CORE, *(["clickhouse"] if args.warehouse == "clickhouse" else [])]
        services = stack.start_services(root / "stack", names)
        env: dict[str, str] = {"CDC_MONGO_DB": stack.SOURCE_DB}
        for service in services.values():
            env.update(service.env)
        bench = Bench(args, root, env)
        bench.warehouse_url = env.pop("CDC_WAREHOUSE_URL", None)
        setup["services_s"] = time.perf_counter() - begin

        begin = time.perf_counter()
        try:
            bench.floors_python = envs.ensure(
                SIDE / "floors", envs.floors_requirements(), root / "logs" / "venv-floors.log"
            )
        except RuntimeError as exc:
            bench.notes.append(f"floors venv unavailable, floors skipped: {exc}")
        else:
            pyarrow = envs.floors_pyarrow()
            if "<" in pyarrow:
                bench.notes.append(f"floors run {pyarrow}: pymongoarrow cannot take ours")
        peers = not args.no_peers
        if peers:
            try:
                bench.dlt_python = envs.ensure(
                    SIDE / "dlt", envs.dlt_requirements(), root / "logs" / "venv-dlt.log"
                )
            except RuntimeError as exc:
                bench.notes.append(f"dlt venv unavailable, peers skipped: {exc}")
                peers = False
        setup["venvs_s"] = time.perf_counter() - begin

        scale = scale_name(args.users)
        begin = time.perf_counter()
        generate = _load_setup("generate_data")
        generate.generate(
            env["CDC_MONGO_URI"],
            env["CDC_MONGO_DB"],
            env["CDC_POSTGRES_DSN"],
            users=args.users,
            products=args.products,
            orders=args.orders,
            seed=42,
        )
        setup[f"generate_{scale}_s"] = time.perf_counter() - begin
        print(f"bench: generated {args.users} users, {args.orders} orders", flush=True)

        for rep in range(args.repeat):
            print(f"bench: {scale} run {rep + 1}/{args.repeat}", flush=True)
            floors_mongo(bench, scale)
            users_path(bench, scale, rep, peers, ten=True)
            orders_path(bench, scale, rep)
            if not args.no_runall:
                bench.attempt(f"{scale}/ours/runall", bench.ours, f"{scale}-runall-{rep}", [])
        if args.log and args.log_changes:
            print(f"bench: {args.log_changes} changes through mode = log", flush=True)
            log_capture.million(bench, scale, args.log_changes)
        if args.profile:
            print("bench: profiling (py-spy)", flush=True)
            profile = profile_users(bench, scale)

        if args.big:
            big = scale_name(args.big_users)
            begin = time.perf_counter()
            load_users(env, args.big_users, seed=43)
            setup[f"generate_{big}_s"] = time.perf_counter() - begin
            print(f"bench: generated {args.big_users} users", flush=True)
            for rep in range(args.big_repeat):
                print(f"bench: {big} run {rep + 1}/{args.big_repeat}", flush=True)
                floors_mongo(bench, big)
                users_path(bench, big, rep, peers)
            memory_breakdown(bench, big)
    finally:
        stack.stop_all(services.values())
    assert bench is not None
    total = time.perf_counter() - started
    meta = {
        "started": bench.tag,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "code": {"before": code_before, "after": code_version()},
        "setup_s": setup,
        "total_s": total,
        "notes": bench.notes,
        "failures": bench.failures,
    }
    figures = {
        name: {
            "runs": [asdict(s) for s in runs],
            "median_wall": statistics.median(s.wall for s in runs),
        }
        for name, runs in bench.samples.items()
    }
    summary = summarise(bench.samples, args)
    log_summary = log_capture.summarise(bench.samples, scale_name(args.users)) if args.log else {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{bench.tag}.json"
    payload = {"meta": meta, "summary": summary, "profile": profile, "figures": figures}
    if log_summary:
        payload["log"] = log_summary
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print()
    print(render(summary, meta, profile))
    if log_summary:
        print(log_capture.render(log_summary))
    print(f"\nresults: {out.relative_to(ROOT)}   total bench wall time {total:.0f} s")
    if not args.keep and args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
