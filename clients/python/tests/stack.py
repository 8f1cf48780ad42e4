"""Real Herald services for the Python suite, as tests/src/process.rs starts
them for the Rust tests: a fresh Postgres database with the demo table, a
fresh Redis key namespace, and capture, broadcast and cache-api as OS
processes (binaries from the Cargo target directory, which ``make test``
builds first). Everything is removed at the end.

Binaries: ``HERALD_BIN_DIR``, else ``$CARGO_TARGET_DIR/debug``, else the
repository's ``target/debug``. Postgres and Redis: ``DATABASE_URL`` and
``REDIS_URL`` (local defaults), as for the Rust suite.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import redis

REPO = Path(__file__).resolve().parents[3]
ACME_TOKEN = "acme-token-0123456789"
GLOBEX_TOKEN = "globex-token-0123456789"
BACKEND_TOKEN = "backend-token-0123456789"

DEMO_TABLE = """
CREATE TABLE res_users (
    id           bigserial PRIMARY KEY,
    tenant_id    text NOT NULL,
    team_id      bigint,
    website_slug text,
    callsign     text,
    name         text,
    updated_at   timestamptz NOT NULL DEFAULT now()
)"""


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def bin_dir() -> Path:
    if os.environ.get("HERALD_BIN_DIR"):
        return Path(os.environ["HERALD_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else REPO / "target") / "debug"


def binary(name: str) -> str:
    path = bin_dir() / name
    if not path.exists():
        raise RuntimeError(
            f"{path} not found: build it first (make test runs cargo build --workspace --bins)"
        )
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin_url() -> str:
    return os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def database_url(admin: str, name: str) -> str:
    parts = urlsplit(admin)
    return urlunsplit(parts._replace(path=f"/{name}"))


# Quicker fault detection than a deployment's defaults, for the tests.
TEST_TIMINGS = """
[capture]
ops_addr = "127.0.0.1:0"
poll_interval_ms = 200
source = "{source}"
[broadcast]
ops_addr = "127.0.0.1:0"
claim_idle_ms = 500
block_ms = 200
heartbeat_ms = 100
[l1]
heartbeat_timeout_ms = 1000
"""

# A deployment's defaults, for the benchmark.
PRODUCTION_TIMINGS = """
[capture]
ops_addr = "127.0.0.1:0"
source = "{source}"
[broadcast]
ops_addr = "127.0.0.1:0"
"""


def config_toml(
    env: str, db_url: str, redis_url: str, grpc_port: int, http_port: int, source: str, production: bool
) -> str:
    timings = (PRODUCTION_TIMINGS if production else TEST_TIMINGS).format(source=source)
    return f"""
env = "{env}"
[postgres]
url = "{db_url}"
pool_size = 4
[redis]
url = "{redis_url}"
{timings}
[cache]
grpc_addr = "127.0.0.1:{grpc_port}"
http_addr = "127.0.0.1:{http_port}"
ops_addr = "127.0.0.1:0"
max_value_bytes = 65536
[[cache.tokens]]
name = "acme-app"
token = "{ACME_TOKEN}"
tenants = ["acme"]
[[cache.tokens]]
name = "globex-app"
token = "{GLOBEX_TOKEN}"
tenants = ["globex"]
[[cache.tokens]]
name = "backend"
token = "{BACKEND_TOKEN}"
tenants = ["*"]
[[cache.resources]]
name = "user_by_slug"
sql = "SELECT id, website_slug, name FROM res_users WHERE tenant_id = $tenant AND website_slug = $1"
params = ["slug"]
shape = "row"
tags = ["res_users.website_slug=$1", "res_users.id={{id}}"]
ttl_ms = 60000
negative_ttl_ms = 60000
[[tables]]
name = "res_users"
id_column = "id"
key_columns = ["website_slug", "callsign"]
tenant_column = "tenant_id"
team_column = "team_id"
watch_columns = ["name"]
"""


@dataclass
class Stack:
    env: str
    admin: str
    db_name: str
    db_url: str
    redis_url: str
    grpc_port: int
    config_path: Path
    source: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @classmethod
    def start(cls, admin: str | None = None, source: str = "outbox", production: bool = False) -> Stack:
        """Services on the Postgres at ``admin`` (default ``DATABASE_URL``),
        capturing from ``source`` (``outbox`` or ``wal``, which needs a server
        with ``wal_level = logical``), with the tests' quick fault timings
        or, with ``production``, a deployment's defaults."""
        admin = admin or admin_url()
        env = "py" + secrets.token_hex(5)
        db_name = "herald_py_" + secrets.token_hex(5)
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {db_name}")
        conn.close()
        db_url = database_url(admin, db_name)
        with psycopg2.connect(db_url) as c, c.cursor() as cur:
            cur.execute(DEMO_TABLE)
        redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
        grpc_port, http_port = free_port(), free_port()
        fd, path = tempfile.mkstemp(prefix=f"{env}-", suffix=".toml")
        os.close(fd)
        config = Path(path)
        config.write_text(config_toml(env, db_url, redis_url, grpc_port, http_port, source, production))
        stack = cls(env, admin, db_name, db_url, redis_url, grpc_port, config, source)
        subprocess.run(
            [binary("herald-capture"), "--config", str(config), "install"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        stack.spawn("herald-capture")
        stack.spawn("herald-broadcast")
        stack.spawn("herald-cache-api")
        stack.wait_ready()
        return stack

    def spawn(self, name: str) -> None:
        env = {**os.environ, "HERALD_LOG": os.environ.get("HERALD_LOG", "warn")}
        self.procs[name] = subprocess.Popen(
            [binary(name), "--config", str(self.config_path), "run"], env=env, stdin=subprocess.DEVNULL
        )

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown code runs."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until cache-api answers a Get over gRPC (its L1 live)."""
        import grpc

        from herald.v1 import cache_pb2 as pb

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with grpc.insecure_channel(self.target) as ch:
                    get = ch.unary_unary(
                        "/herald.v1.Cache/Get",
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=pb.GetResponse.FromString,
                    )
                    get(
                        pb.GetRequest(tenant="acme", key="ready-probe"),
                        timeout=1,
                        metadata=(("authorization", f"Bearer {ACME_TOKEN}"),),
                    )
                return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("cache-api never answered")
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
            time.sleep(0.05)

    def sql(self, statement: str, *args: object) -> None:
        with psycopg2.connect(self.db_url) as c, c.cursor() as cur:
            cur.execute(statement, args)

    def quiesce(self, client: Any, tenant: str) -> None:
        """Until every change committed so far has reached ``client``'s near cache:
        capture drained the outbox (or the slot), broadcast acknowledged (so published) every
        event, and then a barrier invalidation published after them came through
        the client's stream (one pub/sub channel keeps them in order)."""
        r = redis.Redis.from_url(self.redis_url)
        stream = f"herald:{self.env}:events"

        def drained() -> bool:
            with psycopg2.connect(self.db_url) as c, c.cursor() as cur:
                if self.source == "wal":
                    cur.execute(
                        "SELECT bool_and(confirmed_flush_lsn >= pg_current_wal_insert_lsn()) "
                        "FROM pg_replication_slots WHERE database = current_database()"
                    )
                    if not cur.fetchone()[0]:
                        return False
                else:
                    cur.execute("SELECT count(*) FROM herald.outbox")
                    if cur.fetchone()[0] != 0:
                        return False
            groups = r.xinfo_groups(stream) if r.exists(stream) else []
            return all(g["pending"] == 0 and not g.get("lag") for g in groups)

        wait_for(drained, "capture and broadcast drained")
        near = client.near
        barrier = "barrier-" + secrets.token_hex(6)
        seen = threading.Event()

        def listener(event: Any) -> None:
            if barrier in event.tags:
                seen.set()

        near.listeners.append(listener)
        try:
            client.invalidate_tags([barrier], tenant=tenant)
            if not seen.wait(20):
                raise AssertionError("the barrier invalidation never reached the near cache")
        finally:
            near.listeners.remove(listener)

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        r = redis.Redis.from_url(self.redis_url)
        keys = list(r.scan_iter(match=f"herald:{self.env}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])
        conn = psycopg2.connect(self.admin)
        conn.autocommit = True
        with conn.cursor() as cur:
            if self.source == "wal":
                # A logical slot keeps its database from being dropped; its
                # walsender may still be exiting after capture was killed.
                wait_for(lambda: self._drop_slots(cur), "the replication slot dropped", 10)
            cur.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
        conn.close()
        self.config_path.unlink(missing_ok=True)

    def _drop_slots(self, cur: Any) -> bool:
        try:
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                (self.db_name,),
            )
            return True
        except psycopg2.errors.ObjectInUse:
            return False


def ops_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
        return str(r.read().decode())
