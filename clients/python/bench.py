"""Benchmark of the Python near cache (``make bench`` runs it).

Starts its own Herald services (capture, broadcast, cache-api from
``HERALD_BIN_DIR``, default the release target dir; a deployment's default
timings) in a fresh database and Redis namespace (``REDIS_URL``), then
measures, in one run on the same machine:

* a near-cache hit (``Client.get_key`` of a 100-byte value, answered from RAM);
* a redis-py ``GET`` of a same-sized value (the baseline the target compares to);
* a gRPC ``Get`` through the client with the near cache off;
* commit → all four forked worker processes dropped the entry, at a fixed
  commit rate (``--commits-per-s``, default 200), p50/p99.

``--source wal`` (the default) captures from the WAL of a throwaway
``wal_level = logical`` cluster that flushes its WAL like a production
server (the shared server runs ``wal_level = replica``), as ``herald-bench``
does; ``--source outbox`` captures from the outbox on ``DATABASE_URL``.

Prints a table, then one JSON line with ``py_near_hit_p50_us``,
``py_near_hit_p99_us``, ``redis_py_get_p50_us``, ``grpc_get_p50_us``,
``py_near_vs_redis`` (redis p50 / near-hit p50), ``commit_to_workers_p50_ms``,
``commit_to_workers_p99_ms``, ``commits``, ``commits_missed``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg2
import redis

from herald import Client, NearConfig
from herald.v1 import events_pb2
from tests.pg_logical import LogicalCluster
from tests.stack import ACME_TOKEN, REPO, Stack

WORKERS = 4
VALUE = b"v" * 100


def quantile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def time_calls(fn: Any, n: int) -> list[float]:
    """Per-call latency in microseconds."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


def worker(client: Client, rows: int, conn: Connection) -> None:
    """A forked worker: fills every row's entry, records when each row's
    invalidation reaches its near cache, and refills."""
    assert client.wait_live(30)
    near = client.near
    assert near is not None
    slugs = [f"u{i}" for i in range(rows)]
    applied: list[tuple[int, float]] = []
    lock = threading.Lock()

    def on_event(event: events_pb2.InvalidationEvent) -> None:
        now = time.time()
        for tag in event.tags:
            if tag.startswith("res_users.id="):
                with lock:
                    applied.append((int(tag.split("=", 1)[1]), now))

    near.listeners.append(on_event)
    for s in slugs:
        client.get_resource("user_by_slug", [s], tenant="acme")
    conn.send("ready")
    stop = threading.Event()

    def refill() -> None:
        while not stop.is_set():
            for s in slugs:
                client.get_resource("user_by_slug", [s], tenant="acme")
            time.sleep(0.05)

    t = threading.Thread(target=refill, daemon=True)
    t.start()
    conn.recv()  # the writer is done
    time.sleep(0.5)  # the last invalidations arrive
    stop.set()
    with lock:
        conn.send(applied)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits-per-s", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hits", type=int, default=200_000)
    parser.add_argument("--source", choices=["wal", "outbox"], default="wal")
    args = parser.parse_args()
    os.environ.setdefault(
        "HERALD_BIN_DIR", str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release")
    )
    cluster = LogicalCluster() if args.source == "wal" else None
    try:
        admin = cluster.admin_url if cluster else None
        stack = Stack.start(admin, source=args.source, production=True)
        try:
            run(stack, args)
        finally:
            stack.stop()
    finally:
        if cluster:
            cluster.stop()


def run(stack: Stack, args: argparse.Namespace) -> None:
    rows = 100
    with psycopg2.connect(stack.db_url) as c, c.cursor() as cur:
        cur.execute(
            "INSERT INTO res_users (tenant_id, website_slug, name) SELECT 'acme', 'u' || g, 'user ' || g "
            "FROM generate_series(0, %s) g",
            (rows - 1,),
        )
        cur.execute("SELECT id FROM res_users WHERE tenant_id = 'acme' ORDER BY id")
        ids = [r[0] for r in cur.fetchall()]

    # Hits, redis-py, gRPC without the near cache.
    client = Client(stack.target, ACME_TOKEN, near=NearConfig(tenants=["acme"]))
    assert client.wait_live(30), "near cache never became live"
    client.set("bench-key", VALUE, tenant="acme", ttl_s=600)
    deadline = time.monotonic() + 10
    while client.get_key_result("bench-key", tenant="acme").layer != "near":
        assert time.monotonic() < deadline, "the key never reached the near cache"
    hits = time_calls(lambda: client.get_key("bench-key", tenant="acme"), args.hits)
    r = redis.Redis.from_url(stack.redis_url)
    r.set(f"herald:{stack.env}:bench-baseline", VALUE)
    redis_gets = time_calls(lambda: r.get(f"herald:{stack.env}:bench-baseline"), 20_000)
    plain = Client(stack.target, ACME_TOKEN, near=None)
    grpc_gets = time_calls(lambda: plain.get_key("bench-key", tenant="acme"), 5_000)
    plain.close()

    # Commit → every worker dropped the entry.
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for _ in range(WORKERS):
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=worker, args=(client, rows, theirs), daemon=True)
        p.start()
        pipes.append(ours)
        procs.append(p)
    for pipe in pipes:
        assert pipe.poll(60) and pipe.recv() == "ready", "a worker never got ready"
    conn = psycopg2.connect(stack.db_url)
    conn.autocommit = True
    commits: list[tuple[int, float]] = []
    n = int(args.commits_per_s * args.seconds)
    interval = 1 / args.commits_per_s
    start = time.monotonic()
    with conn.cursor() as cur:
        for k in range(n):
            wait = start + k * interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            row = ids[k % rows]
            cur.execute("UPDATE res_users SET name = %s WHERE id = %s", (f"v{k}", row))
            commits.append((row, time.time()))
    elapsed = time.monotonic() - start
    conn.close()
    for pipe in pipes:
        pipe.send("done")
    applied = [pipe.recv() for pipe in pipes]
    for p in procs:
        p.join(10)
    latencies, missed = [], 0
    next_same_row: dict[int, float] = {}
    for row, at in reversed(commits):
        until = next_same_row.get(row, float("inf"))
        next_same_row[row] = at
        per_worker = []
        for events in applied:
            times = [t for r_, t in events if r_ == row and at <= t < until + 1.0]
            if times:
                per_worker.append(min(times) - at)
        if len(per_worker) == WORKERS:
            latencies.append(max(per_worker) * 1000)
        else:
            missed += 1
    client.close()

    near_p50, near_p99 = quantile(hits, 0.5), quantile(hits, 0.99)
    redis_p50 = quantile(redis_gets, 0.5)
    grpc_p50 = quantile(grpc_gets, 0.5)
    print(f"{'measure':<44} {'p50':>10} {'p99':>10}")
    print(f"{'near-cache hit (get_key, 100 B), µs':<44} {near_p50:>10.2f} {near_p99:>10.2f}")
    print(f"{'redis-py GET (100 B), µs':<44} {redis_p50:>10.2f} {quantile(redis_gets, 0.99):>10.2f}")
    grpc_p99 = quantile(grpc_gets, 0.99)
    print(f"{'gRPC Get through the client, no near, µs':<44} {grpc_p50:>10.2f} {grpc_p99:>10.2f}")
    if latencies:
        print(
            f"{'commit → all 4 workers dropped it, ms':<44} {quantile(latencies, 0.5):>10.2f} "
            f"{quantile(latencies, 0.99):>10.2f}"
        )
    rate = len(commits) / elapsed
    print(f"commits: {len(commits)} at {rate:.0f}/s; not seen by every worker: {missed}; hits: {len(hits)}")
    print(
        json.dumps(
            {
                "py_near_hit_p50_us": round(near_p50, 3),
                "py_near_hit_p99_us": round(near_p99, 3),
                "redis_py_get_p50_us": round(redis_p50, 3),
                "grpc_get_p50_us": round(grpc_p50, 3),
                "py_near_vs_redis": round(redis_p50 / near_p50, 2),
                "commit_to_workers_p50_ms": round(quantile(latencies, 0.5), 3) if latencies else None,
                "commit_to_workers_p99_ms": round(quantile(latencies, 0.99), 3) if latencies else None,
                "commits": len(commits),
                "commit_rate_per_s": round(rate, 1),
                "commits_missed": missed,
                "source": stack.source,
                "hit_mean_us": round(statistics.fmean(hits), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
