"""The local stack without Docker: real servers on loopback, each under one root directory.

`python -m setup.stack up|down|status [--root .stack]` starts MongoDB (SecantusDB),
PostgreSQL, S3 (SeaweedFS), optionally a ClickHouse server or a ClickHouse cluster, and
luigid; it writes the CDC_* settings to `<root>/env` and the pids to `<root>/services.json` so
that `down` stops exactly what `up` started. The test fixtures use the same functions with
free ports.

`--warehouse cluster` is ZooKeeper (Debian's, run with java) and two clickhouse-server nodes
that serve both cluster shapes at once: `cdc_replicated` (1 shard x 2 replicas) and
`cdc_sharded` (2 shards x 1 replica); `--shape` says which one the env file names.

Only the standard library is imported here: the client libraries are imported by the probes
that need them, so `status` and `down` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

BUCKET = "cdc-staging"
S3_ACCESS_KEY = "cdc"
S3_SECRET_KEY = "cdcsecret"
DATABASE = "data_pipeline"
SOURCE_DB = "source"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
WAREHOUSES = ("chdb", "clickhouse", "cluster")
CORE = ("mongodb", "postgres", "s3")
CLICKHOUSE_CONFIG = Path("/etc/clickhouse-server/config.xml")
UNIX_SOCKET_PATH_MAX = 107

# SeaweedFS serves gRPC on each HTTP port + 10000, so its HTTP ports must stay below this.
SEAWEED_PORT_LIMIT = 55000
PORT_FLOOR = 11000
# SeaweedFS needs ~17 s to exit on SIGTERM (its filer waits 15 s for open gRPC streams); its
# writes are already on disk by then, so SIGKILL after 15 s loses nothing.
STOP_TIMEOUTS = {"s3": 15.0}
# SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to disconnect.
STOP_SIGNALS = {"postgres": signal.SIGINT}
# What a live process of each service has in its command line: a recorded pid that was
# reused by an unrelated process must never be signalled.
COMMAND_MARKERS = {
    "mongodb": "secantusd",
    "postgres": "postgres",
    "s3": "weed",
    "clickhouse": "clickhouse",
    "luigid": "luigid",
    "zookeeper": "org.apache.zookeeper.server.ZooKeeperServerMain",
    "node1": "clickhouse",
    "node2": "clickhouse",
}
# stopped after everything else: a ClickHouse node whose ZooKeeper is gone stalls its shutdown
STOP_LAST = ("zookeeper",)

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


class StackError(RuntimeError):
    """A service could not be started; the message names it and quotes its log."""


@dataclass(frozen=True)
class Service:
    """A running server: what to stop (pid), where clients connect (port), what they need (env)."""

    name: str
    pid: int
    port: int
    env: dict[str, str]


def _ephemeral_low() -> int:
    """Start of the kernel's ephemeral range: client sockets take ports from there on."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(below: int | None = None) -> int:
    """A free loopback port below the ephemeral range, never the same one twice in a process.

    Ports the kernel hands to outgoing connections (our own probes included) can never collide
    with these, which random bind-to-0 ports could.
    """
    import random

    high = min(below or _ephemeral_low(), _ephemeral_low())
    with _PORT_LOCK:
        for _ in range(1000):
            port = random.randrange(PORT_FLOOR, high)
            if port not in _HANDED_OUT and _port_free(port):
                _HANDED_OUT.add(port)
                return port
    raise StackError(f"no free port between {PORT_FLOOR} and {high}")


def _seaweed_port() -> int:
    """A free port whose gRPC twin (port + 10000) is free too."""
    while True:
        port = free_port(below=_ephemeral_low() - 10000)
        with _PORT_LOCK:
            if port + 10000 not in _HANDED_OUT and _port_free(port + 10000):
                _HANDED_OUT.add(port + 10000)
                return port


def _port_free(port: int) -> bool:
    """True if a server could listen on the port (SO_REUSEADDR ignores TIME_WAIT leftovers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _require_free(name: str, *ports: int) -> None:
    """Fail early: with a taken port the probe would reach someone else's server."""
    for port in ports:
        if not _port_free(port):
            raise StackError(f"{name}: port {port} on {HOST} is already in use")


def _tail(paths: Iterable[Path], lines: int = 20) -> str:
    """The last lines of each non-empty log, for error messages (logs can be large)."""
    parts = []
    for path in paths:
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as log:
                log.seek(max(0, path.stat().st_size - 16_384))
                text = log.read().decode(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last lines of {path} ---\n" + "\n".join(text))
    return "\n".join(parts) or "(no log output)"


def _executable(name: str) -> str:
    """A console script from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} not found: install the project's dependencies (pip install .)")
    return found


def _apt_install(*packages: str) -> None:
    """Install Debian packages on demand, so a fresh machine needs no manual step."""
    names = " ".join(packages)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StackError(f"{names} is not installed: run `sudo apt-get install -y {names}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        if subprocess.run(install, env=env, check=False).returncode != 0:
            raise StackError(f"apt-get install {names} failed")


def _spawn(cmd: Sequence[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session (Ctrl-C in the caller's shell must not reach it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def _alive(pid: int) -> bool:
    """Whether the process still runs (a zombie does not count)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _is_ours(service: Service) -> bool:
    """Alive and still the program we started (pids get reused after a reboot)."""
    if not _alive(service.pid):
        return False
    try:
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True
    return COMMAND_MARKERS.get(service.name, service.name) in cmdline


def _wait_ready(
    name: str,
    pid: int,
    port: int,
    probe: Callable[[], None],
    logs: Sequence[Path],
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll until the port accepts connections and the protocol answers, or fail loudly.

    The server is stopped on failure so that a failed start leaves nothing behind.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not _alive(pid):
            code = _CHILDREN[pid].returncode if pid in _CHILDREN else "?"
            raise StackError(f"{name} exited during start-up (code {code})\n{_tail(logs)}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                pass
            probe()
            return
        except Exception as exc:  # any failure means "not ready yet"
            last = exc
            time.sleep(0.2)
    stop_all([Service(name, pid, port, {})], timeout=5)
    raise StackError(
        f"{name} did not answer on {HOST}:{port} within {timeout:.0f} s ({last})\n{_tail(logs)}"
    )


def start_mongo(root: Path, port: int | None = None) -> Service:
    """SecantusDB speaks the MongoDB wire protocol and keeps its WiredTiger files on disk."""
    home = root.resolve() / "mongo"
    port = port or free_port()
    _require_free("mongodb", port)
    log = home / "mongodb.log"
    cmd = [_executable("secantusd-py"), "--host", HOST, "--port", str(port)]
    proc = _spawn([*cmd, "--storage-path", str(home / "data")], log, home)
    uri = f"mongodb://{HOST}:{port}"

    def probe() -> None:
        import pymongo

        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=1000) as client:
            client.admin.command("ping")

    _wait_ready("mongodb", proc.pid, port, probe, [log])
    return Service("mongodb", proc.pid, port, {"CDC_MONGO_URI": uri, "CDC_MONGO_DB": SOURCE_DB})


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory, installing Debian's if there is none."""

    def newest() -> Path | None:
        found = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
            key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        )
        return found[-1].parent if found else None

    bin_dir = newest()
    if bin_dir is None:
        _apt_install("postgresql")
        bin_dir = newest()
    if bin_dir is None:
        raise StackError("postgres: no pg_ctl under /usr/lib/postgresql/*/bin after install")
    return bin_dir


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: hand them to the postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _traversable(path: Path) -> None:
    """Let the postgres user reach `path` (adds only the o+x bit where it is missing)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _socket_dir(path: Path) -> str:
    """The -k value: our own directory, or none at all when the path is too long for a socket."""
    if len(f"{path}/.s.PGSQL.65535") > UNIX_SOCKET_PATH_MAX:
        return "''"
    return shlex.quote(str(path))


# Log-based capture (mode = log) reads a logical replication slot: the server must log enough
# to decode rows, and keep room for the tests' slots and their walsenders.
REPLICATION = "-c max_wal_senders=20 -c max_replication_slots=20"
REPLICATION_HBA = "host replication all 127.0.0.1/32 trust"


def _allow_replication(data: Path) -> None:
    """Let local TCP clients open replication connections (initdb's default has the line, but
    a data directory made another way may not)."""
    hba = data / "pg_hba.conf"
    lines = hba.read_text().splitlines()
    if not any(line.split() == REPLICATION_HBA.split() for line in lines):
        hba.write_text("\n".join([*lines, REPLICATION_HBA, ""]))


def start_postgres(root: Path, port: int | None = None, wal_level: str = "logical") -> Service:
    """Debian's PostgreSQL, initialised on first start, with the database `source` created
    (`wal_level` other than logical only for tests of what log-based capture refuses)."""
    home = root.resolve() / "postgres"
    port = port or free_port()
    _require_free("postgres", port)
    bin_dir = _pg_bin()
    data, sockets, log = home / "data", home / "socket", home / "postgres.log"
    sockets.mkdir(parents=True, exist_ok=True)
    _traversable(home)
    home.chmod(0o755)
    if os.geteuid() == 0:
        for path in (home, sockets):
            shutil.chown(path, "postgres", "postgres")
    if not (data / "PG_VERSION").exists():
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        _run("postgres", _as_postgres([*initdb, "-E", "UTF8", "--locale=C"]), home / "initdb.log")
    _allow_replication(data)
    options = f"-p {port} -c listen_addresses={HOST} -k {_socket_dir(sockets)}"
    options += f" -c wal_level={wal_level} {REPLICATION}"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60"]
    _run("postgres", _as_postgres([*pg_ctl, "-o", options, "start"]), home / "pg_ctl.log", log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    dsn = f"postgresql://postgres@{HOST}:{port}/{SOURCE_DB}"

    def probe() -> None:
        import psycopg2

        conn = psycopg2.connect(host=HOST, port=port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (SOURCE_DB,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{SOURCE_DB}"')
        finally:
            conn.close()

    _wait_ready("postgres", pid, port, probe, [log])
    return Service("postgres", pid, port, {"CDC_POSTGRES_DSN": dsn})


def _run(name: str, cmd: list[str], output: Path, *logs: Path) -> None:
    """Run a one-shot setup command; on failure quote its output and the server log."""
    with output.open("wb") as out:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        raise StackError(
            f"{name}: `{shlex.join(cmd)}` failed (code {done.returncode})\n"
            + _tail([output, *logs])
        )


def start_s3(root: Path, port: int | None = None, bucket: str = BUCKET) -> Service:
    """SeaweedFS with its S3 gateway; the bucket exists and accepts writes when this returns."""
    home = root.resolve() / "s3"
    s3_port = port or _seaweed_port()
    if s3_port >= SEAWEED_PORT_LIMIT:
        raise StackError(f"s3: port {s3_port} too high (its gRPC port is port + 10000)")
    master, volume, filer = _seaweed_port(), _seaweed_port(), _seaweed_port()
    http_ports = (master, volume, filer, s3_port)
    _require_free("s3", *http_ports, *(p + 10000 for p in http_ports))
    (home / "data").mkdir(parents=True, exist_ok=True)
    log = home / "weed.log"
    cmd = [
        _executable("weed"),
        "server",
        "-s3",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-dir={home / 'data'}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3_port}",
        # without these two it binds the fixed ports 8181 and 9101
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        "-metricsPort=0",
        # a restarted single master otherwise waits 10+ s to re-elect itself
        "-master.electionTimeout=1s",
        "-volume.preStopSeconds=0",
        "-master.telemetry=false",
    ]
    proc = _spawn(cmd, log, home)

    def probe() -> None:
        _make_bucket(f"{HOST}:{s3_port}", bucket)

    _wait_ready("s3", proc.pid, s3_port, probe, [log])
    env = {
        "CDC_STAGING_URL": f"s3://{bucket}/",
        "CDC_S3_ENDPOINT": f"{HOST}:{s3_port}",
        "CDC_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "CDC_S3_SECRET_KEY": S3_SECRET_KEY,
        "CDC_S3_SECURE": "false",
    }
    return Service("s3", proc.pid, s3_port, env)


def _make_bucket(endpoint: str, bucket: str) -> None:
    """Create the bucket if needed and prove a write works.

    The S3 port opens before the filer and volume server are ready, and the first write can
    wait ~5 s for the volume server to register; better here than in the first pipeline run.
    """
    import io

    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=1, read=15), retries=urllib3.Retry(total=0)
    )
    client = Minio(endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False, http_client=http)
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        client.put_object(bucket, ".stack-probe", io.BytesIO(b"ok"), 2)
        client.remove_object(bucket, ".stack-probe")
    finally:
        http.clear()


def _clickhouse_server() -> str:
    """Debian's clickhouse-server, installed on demand."""
    found = shutil.which("clickhouse-server") or shutil.which("clickhouse-server", path="/usr/sbin")
    if found is None:
        _apt_install("clickhouse-server")
        found = shutil.which("clickhouse-server", path="/usr/sbin:/usr/bin")
    if found is None or not CLICKHOUSE_CONFIG.exists():
        raise StackError(f"clickhouse: no clickhouse-server binary or {CLICKHOUSE_CONFIG}")
    return found


def start_clickhouse(root: Path, port: int | None = None) -> Service:
    """A ClickHouse server on the native port; every path it writes is moved under root."""
    home = root.resolve() / "clickhouse"
    data = home / "data"
    tcp = port or free_port()
    http, interserver = free_port(), free_port()
    _require_free("clickhouse", tcp, http, interserver)
    data.mkdir(parents=True, exist_ok=True)
    log, errors, stdout = home / "clickhouse.log", home / "clickhouse.err.log", home / "stdout.log"
    cmd = [
        _clickhouse_server(),
        f"--config-file={CLICKHOUSE_CONFIG}",
        "--",
        f"--path={data}/",
        f"--tmp_path={data}/tmp/",
        f"--user_files_path={data}/user_files/",
        f"--format_schema_path={data}/format_schemas/",
        f"--user_directories.local_directory.path={data}/access/",
        f"--tcp_port={tcp}",
        f"--http_port={http}",
        f"--interserver_http_port={interserver}",
        f"--listen_host={HOST}",
        f"--logger.log={log}",
        f"--logger.errorlog={errors}",
    ]
    proc = _spawn(cmd, stdout, home)

    def probe() -> None:
        from clickhouse_driver import Client

        client = Client(host=HOST, port=tcp, user="default", password="", connect_timeout=1)
        try:
            client.execute("SELECT 1")
        finally:
            client.disconnect()

    _wait_ready("clickhouse", proc.pid, tcp, probe, [stdout, errors])
    url = f"clickhouse://default:@{HOST}:{tcp}"
    return Service("clickhouse", proc.pid, tcp, {"CDC_WAREHOUSE_URL": url})


def start_luigid(root: Path, port: int | None = None) -> Service:
    """The Luigi scheduler and its UI; it runs in the foreground, so its pid is ours to stop."""
    home = root.resolve() / "luigid"
    port = port or free_port()
    _require_free("luigid", port)
    home.mkdir(parents=True, exist_ok=True)
    cmd = [_executable("luigid"), "--address", HOST, "--port", str(port)]
    cmd += ["--logdir", str(home), "--state-path", str(home / "state.pickle")]
    log = home / "stdout.log"
    proc = _spawn(cmd, log, home)
    url = f"http://{HOST}:{port}"

    def probe() -> None:
        with urllib.request.urlopen(f"{url}/api/task_list?data=%7B%7D", timeout=2) as reply:
            json.load(reply)

    _wait_ready("luigid", proc.pid, port, probe, [log, home / "luigi-server.log"])
    return Service("luigid", proc.pid, port, {"LUIGID_URL": url})


# --- a ClickHouse cluster on one machine ---------------------------------------------------

ZK_MAIN = COMMAND_MARKERS["zookeeper"]
# slf4j binding that logs to stderr (our log file): no log4j configuration needed
ZK_LOGGER_JAR = Path("/usr/share/java/slf4j-simple.jar")
# start-up time and memory matter here, peak throughput does not
ZK_JVM_FLAGS = ("-Xms32m", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
ZK_TICK_MS = 1000
# a killed node's session (and its replicas' is_active) lives this long; ZooKeeper grants
# 2-20 ticks
ZK_SESSION_TIMEOUT_MS = 10_000
USERS_XML = Path("/etc/clickhouse-server/users.xml")
DDL_QUEUE = "/clickhouse/task_queue/ddl"
NODE_NAMES = ("node1", "node2")
# both shapes over the same two nodes: the shard lists of each
SHAPES: dict[str, tuple[tuple[str, ...], ...]] = {
    "cdc_replicated": (NODE_NAMES,),
    "cdc_sharded": tuple((name,) for name in NODE_NAMES),
}
SHAPE_NAMES = {"replicated": "cdc_replicated", "sharded": "cdc_sharded"}


@dataclass(frozen=True)
class Node:
    """One clickhouse-server: its ports (the other node's config names them) and macros."""

    name: str
    home: Path
    tcp_port: int
    http_port: int
    interserver_port: int
    macros: dict[str, str]

    @property
    def config_file(self) -> Path:
        return self.home / "config.xml"

    @property
    def logs(self) -> list[Path]:
        return [self.home / "stdout.log", self.home / "clickhouse.err.log"]

    @property
    def url(self) -> str:
        return f"clickhouse://default:@{HOST}:{self.tcp_port}"


@dataclass
class LocalCluster:
    """ZooKeeper, the nodes, and the node processes running now (restarts change their pids)."""

    root: Path
    zookeeper: Service
    nodes: tuple[Node, ...]
    running: dict[str, Service] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def services(self) -> list[Service]:
        return [*self.running.values(), self.zookeeper]

    def env(self, shape: str) -> dict[str, str]:
        """The pipeline's settings for one shape, connected to node1."""
        return {
            "CDC_WAREHOUSE_URL": self.nodes[0].url,
            "CDC_CLUSTER": shape,
            "CDC_REPLICATED_PATH_PREFIX": path_prefix(shape),
        }


def path_prefix(shape: str) -> str:
    """The ZooKeeper prefix of a shape's replicated tables.

    The nodes serve both shapes, where a node's shard differs (one shard in `cdc_replicated`,
    two in `cdc_sharded`), so no `{shard}` macro fits both: each shape has its own, whose value
    names the shape too, and a bare `{shard}` fails loudly ("No macro shard in config").
    """
    return f"/clickhouse/tables/{{{shape}_shard}}"


def _zookeeper_classpath() -> list[str]:
    """The server jars, installing ZooKeeper and a JRE when missing.

    On Debian 12 `dpkg -L zookeeper` lists scripts only; the jars come from its dependency
    libzookeeper-java, whose manifests name their own dependencies (the JVM follows them);
    only an slf4j binding is added.
    """
    if shutil.which("java") is None or not _dpkg_installed("zookeeper"):
        _apt_install("zookeeper", "default-jre-headless")
    listed = subprocess.run(
        ["dpkg", "-L", "zookeeper", "libzookeeper-java"], capture_output=True, text=True
    ).stdout.split()
    jars = sorted(
        {p for p in listed if Path(p).name in ("zookeeper.jar", "zookeeper-jute.jar")},
        key=lambda p: Path(p).name != "zookeeper.jar",
    )
    if len(jars) != 2 or not ZK_LOGGER_JAR.exists():
        raise StackError(f"zookeeper: jars not found (dpkg lists {jars}, needs {ZK_LOGGER_JAR})")
    return [*jars, str(ZK_LOGGER_JAR)]


def _dpkg_installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return done.stdout.strip().endswith("installed")


def _zk_session(port: int) -> None:
    """Open and close one ZooKeeper session (the wire protocol's ConnectRequest).

    `ruok` answers `imok` a moment before sessions are accepted, and a clickhouse-server
    whose first sessions failed in that window was seen to crash (SIGSEGV) on its first
    ON CLUSTER statement.
    """
    import struct

    def exactly(sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise StackError("zookeeper: connection closed during the handshake")
            data += chunk
        return data

    connect = struct.pack(">iqiqi16s", 0, 0, ZK_SESSION_TIMEOUT_MS, 0, 16, b"\0" * 16)
    with socket.create_connection((HOST, port), timeout=2) as sock:
        sock.sendall(struct.pack(">i", len(connect)) + connect)
        reply = exactly(sock, struct.unpack(">i", exactly(sock, 4))[0])
        if struct.unpack(">iiq", reply[:16])[2] == 0:
            raise StackError("zookeeper: session refused")
        sock.sendall(struct.pack(">iii", 8, 1, -11))  # closeSession
        exactly(sock, struct.unpack(">i", exactly(sock, 4))[0])


def start_zookeeper(root: Path, port: int | None = None) -> Service:
    """A standalone ZooKeeper on loopback only, its admin server (port 8080) disabled."""
    home = root.resolve() / "zookeeper"
    port = port or free_port()
    _require_free("zookeeper", port)
    (home / "data").mkdir(parents=True, exist_ok=True)
    settings = {
        "tickTime": ZK_TICK_MS,
        "dataDir": home / "data",
        "clientPort": port,
        "clientPortAddress": HOST,
        "admin.enableServer": "false",
        "4lw.commands.whitelist": "ruok,srvr,mntr",
        "maxClientCnxns": 0,
        "autopurge.snapRetainCount": 3,
        "autopurge.purgeInterval": 1,
    }
    config = home / "zoo.cfg"
    config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    classpath = ":".join([str(home), *_zookeeper_classpath()])
    java = shutil.which("java") or "java"
    log = home / "zookeeper.log"
    proc = _spawn([java, *ZK_JVM_FLAGS, "-cp", classpath, ZK_MAIN, str(config)], log, home)
    _wait_ready("zookeeper", proc.pid, port, lambda: _zk_session(port), [log])
    return Service("zookeeper", proc.pid, port, {})


def _layout(root: Path) -> tuple[Node, ...]:
    """Ports and macros of each node: `{replica}` is its name, `{<shape>_shard}` its shard."""
    nodes = []
    for name in NODE_NAMES:
        macros = {"replica": name}
        for shape, shards in SHAPES.items():
            number = next(i for i, replicas in enumerate(shards, 1) if name in replicas)
            macros[f"{shape}_shard"] = f"{shape}-{number:02d}"
        ports = free_port(), free_port(), free_port()
        nodes.append(Node(name, root / name, *ports, macros))
    return tuple(nodes)


def _remote_servers(nodes: Sequence[Node]) -> str:
    """Both shapes. `internal_replication` lets replicated tables copy rows between replicas
    themselves, and 18.16 refuses ALTER ... ON CLUSTER of replicated tables without it."""
    port = {node.name: node.tcp_port for node in nodes}
    clusters = []
    for shape, shards in SHAPES.items():
        body = "".join(
            "<shard><internal_replication>true</internal_replication>"
            + "".join(f"<replica><host>{HOST}</host><port>{port[n]}</port></replica>" for n in s)
            + "</shard>"
            for s in shards
        )
        clusters.append(f"<{shape}>{body}</{shape}>")
    return f"<remote_servers>{''.join(clusters)}</remote_servers>"


def _node_config(node: Node, nodes: Sequence[Node], zookeeper_port: int) -> str:
    """A minimal config: every path under the node's home, loopback only."""
    data = node.home / "data"
    macros = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in node.macros.items())
    return f"""<?xml version="1.0"?>
<yandex>
    <logger><level>information</level><log>{node.home / "clickhouse.log"}</log>
        <errorlog>{node.home / "clickhouse.err.log"}</errorlog><size>100M</size><count>3</count>
    </logger>
    <listen_host>{HOST}</listen_host>
    <tcp_port>{node.tcp_port}</tcp_port>
    <http_port>{node.http_port}</http_port>
    <interserver_http_port>{node.interserver_port}</interserver_http_port>
    <interserver_http_host>{HOST}</interserver_http_host>
    <path>{data}/</path>
    <tmp_path>{data}/tmp/</tmp_path>
    <user_files_path>{data}/user_files/</user_files_path>
    <format_schema_path>{data}/format_schemas/</format_schema_path>
    <users_config>{USERS_XML}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <zookeeper>
        <node><host>{HOST}</host><port>{zookeeper_port}</port></node>
        <session_timeout_ms>{ZK_SESSION_TIMEOUT_MS}</session_timeout_ms>
    </zookeeper>
    <macros>{macros}</macros>
    <distributed_ddl><path>{DDL_QUEUE}</path></distributed_ddl>
    {_remote_servers(nodes)}
</yandex>
"""


def start_node(cluster: LocalCluster, name: str) -> Service:
    """Start (or restart) one node with its configuration and data.

    A node started while its previous process still exits fails ("Cannot lock file
    .../status"), so that process must be gone first.
    """
    node = cluster.node(name)
    previous = cluster.running.get(name)
    if previous is not None and _alive(previous.pid):
        raise StackError(f"{name}: previous process {previous.pid} still running; stop it first")
    _require_free(name, node.tcp_port, node.http_port, node.interserver_port)
    stdout = node.home / "stdout.log"
    proc = _spawn([_clickhouse_server(), f"--config-file={node.config_file}"], stdout, node.home)

    def probe() -> None:  # a read of system.zookeeper proves node -> ZooKeeper too
        from clickhouse_driver import Client

        client = Client(host=HOST, port=node.tcp_port, connect_timeout=1, send_receive_timeout=5)
        try:
            client.execute("SELECT count() FROM system.zookeeper WHERE path = '/'")
        finally:
            client.disconnect()

    _wait_ready(name, proc.pid, node.tcp_port, probe, node.logs)
    service = Service(name, proc.pid, node.tcp_port, {})
    cluster.running[name] = service
    return service


def stop_node(cluster: LocalCluster, name: str, timeout: float | None = None) -> None:
    """Stop one node and wait until its process has exited."""
    service = cluster.running.pop(name, None)
    if service is not None:
        stop_all([service], timeout)


def start_cluster(root: Path) -> LocalCluster:
    """ZooKeeper, then both nodes in parallel; all or nothing."""
    root = root.resolve()
    nodes = _layout(root)
    _clickhouse_server()  # install before anything starts, not in two threads at once
    cluster = LocalCluster(root, start_zookeeper(root), nodes)
    for node in nodes:
        (node.home / "data").mkdir(parents=True, exist_ok=True)
        node.config_file.write_text(_node_config(node, nodes, cluster.zookeeper.port))
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = [pool.submit(start_node, cluster, node.name) for node in nodes]
    failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        stop_cluster(cluster)
        raise StackError("\n\n".join(str(exc) for exc in failures))
    return cluster


def stop_cluster(cluster: LocalCluster, timeout: float | None = None) -> None:
    """The nodes first (in parallel), then ZooKeeper."""
    stop_all(list(cluster.running.values()), timeout)
    cluster.running.clear()
    stop_all([cluster.zookeeper], timeout)


STARTERS: dict[str, Callable[[Path], Service]] = {
    "mongodb": start_mongo,
    "postgres": start_postgres,
    "s3": start_s3,
    "clickhouse": start_clickhouse,
    "luigid": start_luigid,
}


def start_services(root: Path, names: Iterable[str]) -> dict[str, Service]:
    """Start several services in parallel (SeaweedFS alone takes ~3 s); all or none."""
    names = list(names)
    unknown = set(names) - STARTERS.keys()
    if unknown:
        raise StackError(f"unknown services {sorted(unknown)}; known: {sorted(STARTERS)}")
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
        futures = {name: pool.submit(STARTERS[name], root) for name in names}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    failures = [f.exception() for f in futures.values() if f.exception() is not None]
    if failures:
        stop_all(started.values())
        raise StackError("\n\n".join(str(exc) for exc in failures))
    return started


def stop_all(services: Iterable[Service], timeout: float | None = None) -> None:
    """Signal every service first, then wait for all: shutdowns overlap instead of adding up."""
    pending = [s for s in services if _alive(s.pid)]
    for service in pending:
        _send(service.pid, STOP_SIGNALS.get(service.name, signal.SIGTERM))
    for service in pending:
        limit = timeout if timeout is not None else STOP_TIMEOUTS.get(service.name, STOP_TIMEOUT)
        deadline = time.monotonic() + limit
        while _alive(service.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(service.pid):
            _send(service.pid, signal.SIGKILL)
        _killpg(service.pid)
        deadline = time.monotonic() + 5
        while _alive(service.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _CHILDREN.pop(service.pid, None)


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pid: int) -> None:
    """Kill helpers the server forked into its session (it was started as the group leader)."""
    try:
        if os.getpgid(pid) != pid:
            return
    except ProcessLookupError:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop(service: Service, timeout: float | None = None) -> None:
    """Stop one service: its polite signal, then SIGKILL when `timeout` (per service) runs out."""
    stop_all([service], timeout)


def _services_file(root: Path) -> Path:
    return root / "services.json"


def _load(root: Path) -> tuple[str, list[Service]]:
    """The warehouse kind and services recorded by the last `up` (none if there was none)."""
    path = _services_file(root)
    if not path.exists():
        return "", []
    record = json.loads(path.read_text())
    return record["warehouse"], [Service(**item) for item in record["services"]]


def read_env(path: Path) -> dict[str, str]:
    """Parse an env file written by `up` (lines `export NAME=value`)."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def _stack_env(root: Path, warehouse: str, services: Iterable[Service]) -> dict[str, str]:
    """Every setting the pipeline needs; the ClickHouse service brings its own warehouse URL."""
    env = {"CDC_DATABASE": DATABASE}
    if warehouse == "chdb":
        env["CDC_WAREHOUSE_URL"] = f"chdb://{root / 'warehouse'}"
    for service in services:
        env.update(service.env)
    return dict(sorted(env.items()))


def up(root: Path, warehouse: str = "chdb", shape: str = "sharded") -> dict[str, str]:
    """Start the whole stack under root (or reuse a running one) and write root/env.

    `shape` (`sharded` or `replicated`) is the cluster shape the env file names when the
    warehouse is `cluster`; both run on the same nodes.
    """
    if warehouse not in WAREHOUSES:
        raise StackError(f"warehouse must be one of {WAREHOUSES}, got {warehouse!r}")
    if shape not in SHAPE_NAMES:
        raise StackError(f"shape must be one of {tuple(SHAPE_NAMES)}, got {shape!r}")
    root = root.resolve()
    kind = f"cluster ({shape})" if warehouse == "cluster" else warehouse
    running_kind, recorded = _load(root)
    if recorded and running_kind == kind and all(_is_ours(s) for s in recorded):
        pids = ", ".join(f"{s.name} {s.pid}" for s in recorded)
        print(f"stack already running under {root} ({pids})", file=sys.stderr)
        return read_env(root / "env")
    if recorded:
        dead = [s.name for s in recorded if not _is_ours(s)]
        why = f"not running: {', '.join(dead)}" if dead else f"warehouse was {running_kind}"
        print(f"restarting the stack under {root} ({why})", file=sys.stderr)
        down(root)
    names = [*CORE, *(["clickhouse"] if warehouse == "clickhouse" else []), "luigid"]
    ordered, extra = _start_all(root, names, SHAPE_NAMES[shape] if warehouse == "cluster" else "")
    env = {**_stack_env(root, warehouse, ordered), **extra}
    record = {"warehouse": kind, "services": [asdict(s) for s in ordered]}
    _services_file(root).write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
    (root / "env").write_text("\n".join(lines) + "\n")
    return env


def _start_all(root: Path, names: list[str], shape: str) -> tuple[list[Service], dict[str, str]]:
    """The services, and the cluster beside them when `shape` names one; all or none."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        cluster = pool.submit(start_cluster, root / "cluster") if shape else None
        try:
            services = start_services(root, names)
        except StackError:
            if cluster is not None and cluster.exception() is None:
                stop_cluster(cluster.result())
            raise
    if cluster is None:
        return [services[name] for name in names], {}
    if cluster.exception() is not None:
        stop_all(services.values())
        raise StackError(f"cluster: {cluster.exception()}")
    local = cluster.result()
    return [*(services[n] for n in names), *local.services()], local.env(shape)


def down(root: Path) -> None:
    """Stop everything `up` recorded; pids that already died or were reused are skipped."""
    root = root.resolve()
    _, recorded = _load(root)
    ours = [s for s in recorded if _is_ours(s)]
    stop_all([s for s in ours if s.name not in STOP_LAST])
    stop_all([s for s in ours if s.name in STOP_LAST])
    _services_file(root).unlink(missing_ok=True)
    (root / "env").unlink(missing_ok=True)


def status(root: Path) -> list[tuple[str, int, bool]]:
    """(name, port, running) for each service recorded by `up`."""
    _, recorded = _load(root.resolve())
    return [(s.name, s.port, _is_ours(s)) for s in recorded]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m setup.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--root", type=Path, default=Path(".stack"), help="default: .stack")
    parser.add_argument(
        "--warehouse", choices=WAREHOUSES, help="default: the running stack's, else chdb"
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPE_NAMES),
        default="sharded",
        help="with --warehouse cluster: 2 shards x 1 replica (default) or 1 shard x 2 replicas",
    )
    args = parser.parse_args(argv)
    root: Path = args.root
    try:
        if args.command == "up":
            running = _load(root.resolve())[0].split(" ")[0]
            env = up(root, args.warehouse or running or "chdb", args.shape)
            print(f"stack up; settings in {root / 'env'} (source it to use them)")
            print(f"luigid UI: {env['LUIGID_URL']}")
        elif args.command == "down":
            down(root)
            print(f"stack under {root} stopped")
        else:
            rows = status(root)
            if not rows:
                print(f"no stack recorded under {root}")
            for name, port, running in rows:
                print(f"{name:<11} port {port:<6} {'up' if running else 'DOWN'}")
            return 0 if rows and all(running for _, _, running in rows) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
