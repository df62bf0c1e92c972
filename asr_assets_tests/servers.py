"""Servers for the distributed tests, each on 127.0.0.1 (a free port), started and stopped by the
test itself: moto's S3 server, PostgreSQL, Redis and ``dagster-celery`` workers.

Every start waits a bounded time (``timeout_s``) and raises with the server's log tail; every
stop is in a ``finally`` (the context managers), so a failing test leaves no process behind.
A missing binary is an error naming its Debian package (README block 2 installs them), never a
skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

def _pg_bin_folders() -> tuple[Path, ...]:
    """Debian's server binaries, newest major version first (``/usr/lib/postgresql/N/bin``)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    return tuple(sorted(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str, package: str, folders: tuple[Path, ...] = ()) -> str:
    """Absolute path of executable ``name`` (``folders`` first, then ``PATH``).

    Raises:
        RuntimeError: not installed — "``name`` not found: apt-get install ``package``".
    """
    for folder in folders:
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: apt-get install {package} (README block 2 installs it)")
    return found


def _wait(what: str, ready, timeout_s: float, log: Path | None = None, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else f"not ready after {timeout_s:g} s"
    raise RuntimeError(f"{what} {state}; log tail:\n{tail}")


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0, group: bool = False) -> None:
    """SIGTERM (the process group with ``group``), then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            send(signal.SIGKILL)
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- S3 (moto)


class RequestCounter(logging.Handler):
    """Counts the S3 requests moto logs (werkzeug's access log: ``"GET /b/k?... HTTP/1.1" 200``)."""

    def __init__(self):
        super().__init__()
        self.requests: list[tuple[str, str, int]] = []

    def emit(self, record):
        try:
            method, target = re.sub(r"\x1b\[[0-9;]*m", "", str(record.args[0])).split(" ")[:2]
            self.requests.append((method, target, int(record.args[1])))
        except (IndexError, ValueError, AttributeError, TypeError):
            pass

    def count(self, method: str | None = None, contains: str = "") -> int:
        time.sleep(0.05)  # the server logs a request after answering it
        return sum(1 for m, t, _ in self.requests if (method is None or m == method) and contains in t)


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server (thread of this process) on 127.0.0.1; yields ``(endpoint, RequestCounter)``."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    counter = RequestCounter()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(counter)
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    try:
        yield f"http://127.0.0.1:{port}", counter
    finally:
        werkzeug.removeHandler(counter)
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard botocore variables pointing at ``endpoint`` (test credentials)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


# ----------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """A running PostgreSQL server: ``env`` holds the ``DAGSTER_PG_*`` variables of
    ``deploy/dagster-postgres.yaml``."""

    port: int
    db: str
    user: str
    password: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def connect(self, db: str | None = None):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, dbname=db or self.db, user=self.user,
                                password=self.password, connect_timeout=5)


@contextlib.contextmanager
def postgres(timeout_s: float = 60.0):
    """PostgreSQL (Debian's, e.g. 15 under /usr/lib/postgresql/15/bin) in a temp data dir (fsync off), TCP on 127.0.0.1 only, its unix socket in the
    temp dir, database ``dagster`` owned by user ``dagster`` (trust auth). As root, ``initdb`` and
    the server run as the ``postgres`` OS user (``runuser``): initdb refuses root.

    Raises:
        RuntimeError: a binary is missing ("apt-get install postgresql"), or the server did not
            come up within ``timeout_s`` (with its log tail).
    """
    folders = _pg_bin_folders()
    initdb = require_binary("initdb", "postgresql", folders)
    server = require_binary("postgres", "postgresql", folders)
    pg_ctl = require_binary("pg_ctl", "postgresql", folders)
    root = Path(tempfile.mkdtemp(prefix="asr-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("OS user 'postgres' missing: apt-get install postgresql") from None
        os.chown(root, owner.pw_uid, owner.pw_gid)
        prefix = [require_binary("runuser", "util-linux"), "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = free_port()
    proc = None
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-U", "dagster", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        with open(log, "wb") as out:
            proc = subprocess.Popen([*prefix, server, "-D", str(data), "-p", str(port), "-k", str(root),
                                     "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                     "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                                     "-c", "max_connections=200"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        pg = Postgres(port=port, db="dagster", user="dagster", password="dagster", root=root)
        _wait("postgres", lambda: pg.connect("postgres").close() is None, timeout_s, log, proc)
        conn = pg.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE dagster OWNER dagster")
        conn.close()
        pg.env = {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_DB": pg.db,
                  "DAGSTER_PG_USERNAME": pg.user, "DAGSTER_PG_PASSWORD": pg.password}
        yield pg
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([*prefix, pg_ctl, "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "20"],
                               capture_output=True, timeout=30)
            _stop(proc, 10, group=True)
        shutil.rmtree(root, ignore_errors=True)


def dagster_home(path: Path, env: dict[str, str]) -> Path:
    """``path`` as a ``DAGSTER_HOME`` with ``deploy/dagster-postgres.yaml`` as its dagster.yaml,
    and the instance's tables created once (so concurrent first users do not race on DDL)."""
    repo = Path(__file__).resolve().parents[1]
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "deploy" / "dagster-postgres.yaml", path / "dagster.yaml")
    code = "import dagster as dg; i = dg.DagsterInstance.get(); i.get_runs(limit=1); print(type(i._run_storage).__name__)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "DAGSTER_HOME": str(path)},
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or "PostgresRunStorage" not in out.stdout:
        raise RuntimeError(f"DAGSTER_HOME {path} did not open on Postgres: {out.stdout}{out.stderr[-3000:]}")
    return path


# ----------------------------------------------------------------------------- Redis


@contextlib.contextmanager
def redis(timeout_s: float = 30.0):
    """``redis-server`` on 127.0.0.1 (free port, no persistence, temp dir); yields its URL base
    ``redis://127.0.0.1:PORT``.

    Raises:
        RuntimeError: "redis-server not found: apt-get install redis-server", or not up in time.
    """
    binary = require_binary("redis-server", "redis-server")
    root = Path(tempfile.mkdtemp(prefix="asr-redis-"))
    port = free_port()
    log = root / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
                                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import redis as redis_client

        url = f"redis://127.0.0.1:{port}"
        _wait("redis-server", lambda: redis_client.Redis.from_url(url, socket_timeout=2).ping(), timeout_s, log, proc)
        yield url
    finally:
        _stop(proc, 10)
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- Celery workers


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the worker's process group (``dagster-celery`` and its ``celery`` child): as a
        machine that dies — no acknowledgement, no cleanup."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tasks_received(self) -> int:
        return self.log.read_text(errors="replace").count("Task execute_plan[") if self.log.exists() else 0


def worker_config(path: Path, visibility_timeout_s: float | None = None, restore_interval_s: float | None = None) -> Path:
    """``deploy/celery-worker.yaml`` copied to ``path``, with a shorter Redis visibility timeout
    and restore sweep when given (so a killed worker's task comes back within a test)."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "deploy" / "celery-worker.yaml").read_text())
    options = config["execution"]["config"]["config_source"]["broker_transport_options"]
    if visibility_timeout_s is not None:
        options["visibility_timeout"] = visibility_timeout_s
    if restore_interval_s is not None:
        options["unacked_restore_interval"] = restore_interval_s
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def celery_workers(count: int, config_yaml: Path, env: dict[str, str], logs: Path, timeout_s: float = 180.0):
    """``count`` workers ``dagster-celery worker start -A dagster_celery.app -y config_yaml -n wN
    -- --pool solo --concurrency 1`` (one step at a time each, in its main process), each with
    its own content cache (as on separate machines); waits until every one logged "ready".
    Yields the :class:`Worker` list; stops them all (SIGTERM, then SIGKILL) at exit."""
    binary = str(Path(sys.executable).with_name("dagster-celery"))
    if not os.path.exists(binary):
        raise RuntimeError("dagster-celery not found: pip install -e '.[test]' (or '.[distributed]')")
    logs.mkdir(parents=True, exist_ok=True)
    workers: list[Worker] = []
    try:
        for i in range(1, count + 1):
            log = logs / f"w{i}.log"
            worker_env = {**os.environ, **env, "ASR_ASSETS_CACHE_DIR": str(logs / f"w{i}-content-cache"),
                          "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            with open(log, "wb") as out:
                proc = subprocess.Popen([binary, "worker", "start", "-A", "dagster_celery.app", "-y", str(config_yaml),
                                         "-n", f"w{i}", "--loglevel", "INFO", "--", "--pool", "solo", "--concurrency", "1",
                                         "--without-gossip", "--without-mingle"],
                                        stdout=out, stderr=subprocess.STDOUT, env=worker_env, start_new_session=True)
            workers.append(Worker(f"w{i}", proc, log))
        for w in workers:
            _wait(f"celery worker {w.name}", lambda w=w: " ready." in w.log.read_text(errors="replace"), timeout_s, w.log, w.proc)
        yield workers
    finally:
        for w in workers:
            _stop(w.proc, 20, group=True)
