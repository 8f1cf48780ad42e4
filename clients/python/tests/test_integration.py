"""Four forked worker processes (as gunicorn or Odoo prefork them) each keep
``user_by_slug`` in their near cache, against real Postgres, Redis, capture,
broadcast and cache-api processes:

* a plain-SQL UPDATE (no ORM, no Herald call) → every worker misses, then
  serves the new value;
* cache-api SIGKILLed → every worker bypasses (serves nothing from RAM), and
  after the restart recovers and serves what Postgres holds;
* 0 stale after quiesce, in each case;
* tenant isolation: a tenant-bound token can neither read nor watch another
  tenant, and one tenant's change leaves the other's entries alone.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from herald import Client, HeraldError, NearConfig, PermissionDenied
from tests.stack import ACME_TOKEN, GLOBEX_TOKEN, Stack

WORKERS = 4


def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def worker(client: Client, conn: Connection) -> None:
    """A forked worker: answers the test's commands about its own near cache."""
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "stop":
                client.close()
                conn.send(None)
                return
            if cmd == "read":
                r = client.get_resource_result("user_by_slug", [args[0]], tenant="acme")
                conn.send(("ok", r.value["name"] if r.found else None, r.layer))
            elif cmd == "live":
                conn.send(("ok", client.live("acme"), len(client.near.store) if client.near else -1))
            elif cmd == "dropped":
                conn.send(("ok", client.near.store.stats.invalidated_entries if client.near else -1))
        except HeraldError as e:
            conn.send(("error", e.code, str(e)))
        except Exception:
            conn.send(("error", "CRASH", traceback.format_exc()))


class Workers:
    def __init__(self, client: Client) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(WORKERS):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=worker, args=(client, theirs), daemon=True)
            p.start()
            self.pipes.append(ours)
            self.procs.append(p)

    def ask(self, *cmd: Any) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(cmd)
        out = []
        for pipe in self.pipes:
            if not pipe.poll(30):
                raise AssertionError(f"a worker did not answer {cmd} (deadlock?)")
            out.append(pipe.recv())
        return out

    def stop(self) -> None:
        for pipe in self.pipes:
            pipe.send(("stop",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.fixture
def workers(stack: Stack) -> Iterator[tuple[Client, Workers]]:
    client = Client(stack.target, ACME_TOKEN, near=NearConfig(tenants=["acme"]))
    assert client.wait_live()
    stack.sql("DELETE FROM res_users WHERE website_slug IN ('alice', 'bob')")
    stack.sql(
        "INSERT INTO res_users (tenant_id, website_slug, name) VALUES "
        "('acme', 'alice', 'Alice v0'), ('globex', 'alice', 'Globex Alice'), ('acme', 'bob', 'Bob')"
    )
    # Quiesced before the workers fork: no event of the fixture's own changes
    # is still on its way to them.
    stack.quiesce(client, "acme")
    # The parent uses the client before forking, as a preloading app server does.
    client.get_resource("user_by_slug", ["alice"], tenant="acme")
    w = Workers(client)
    try:
        yield client, w
    finally:
        w.stop()
        client.close()


def all_serve(w: Workers, slug: str, name: str, layer: str | None = None) -> bool:
    answers = w.ask("read", slug)
    return all(a[0] == "ok" and a[1] == name and (layer is None or a[2] == layer) for a in answers)


def test_plain_sql_update_reaches_every_worker(stack: Stack, workers: tuple[Client, Workers]) -> None:
    _, w = workers
    eventually(lambda: all(a[1] for a in w.ask("live")), "every worker's near cache became live")
    first = w.ask("read", "alice")
    assert all(a[:2] == ("ok", "Alice v0") for a in first), first
    assert all(a[2] != "near" for a in first), "a child served an entry it did not fill"
    eventually(lambda: all_serve(w, "alice", "Alice v0", "near"), "every worker serves alice from RAM")

    stack.sql("UPDATE res_users SET name = 'Alice v1' WHERE tenant_id = 'acme' AND website_slug = 'alice'")
    # Each worker misses (the event dropped its entry) and then serves the new
    # value; no worker keeps the old one.
    eventually(lambda: all_serve(w, "alice", "Alice v1"), "every worker sees the update")
    # Quiesced: every read of every worker, from RAM or not, is current.
    for _ in range(3):
        answers = w.ask("read", "alice")
        assert all(a[1] == "Alice v1" for a in answers), f"stale after quiesce: {answers}"
    eventually(lambda: all_serve(w, "alice", "Alice v1", "near"), "every worker refilled from RAM")


def test_cache_api_killed_every_worker_bypasses_then_recovers(
    stack: Stack, workers: tuple[Client, Workers]
) -> None:
    _, w = workers
    eventually(lambda: all_serve(w, "bob", "Bob", "near"), "every worker serves bob from RAM")
    stack.kill("herald-cache-api")
    try:
        # Not live, nothing held: reads go to cache-api (and fail while it is
        # down) instead of serving a value that may have been invalidated.
        eventually(lambda: all(not a[1] and a[2] == 0 for a in w.ask("live")), "every worker bypasses")
        answers = w.ask("read", "bob")
        assert all(a[0] == "error" and a[1] == "UNAVAILABLE" for a in answers), answers
        stack.sql("UPDATE res_users SET name = 'Bob v1' WHERE tenant_id = 'acme' AND website_slug = 'bob'")
    finally:
        stack.spawn("herald-cache-api")
        stack.wait_ready()
    eventually(lambda: all(a[1] for a in w.ask("live")), "every worker is live again")
    eventually(
        lambda: all_serve(w, "bob", "Bob v1"), "every worker serves the value committed during the outage"
    )
    for _ in range(3):
        answers = w.ask("read", "bob")
        assert all(a[1] == "Bob v1" for a in answers), f"stale after quiesce: {answers}"


def test_tenants_are_isolated(stack: Stack, workers: tuple[Client, Workers]) -> None:
    acme, w = workers
    with pytest.raises(PermissionDenied):
        acme.get_resource("user_by_slug", ["alice"], tenant="globex")
    # A watcher of another tenant, or of every tenant, is refused: the near
    # cache stays off (reads of its own tenant still work through cache-api).
    for tenants in (["globex"], ["*"]):
        sneaky = Client(stack.target, ACME_TOKEN, near=NearConfig(tenants=tenants))
        try:
            assert not sneaky.wait_live(1.5), f"an acme token watched {tenants}"
        finally:
            sneaky.close()
    globex = Client(stack.target, GLOBEX_TOKEN, near=NearConfig(tenants=["globex"]))
    try:
        assert globex.wait_live()
        assert globex.get_resource("user_by_slug", ["alice"], tenant="globex")["name"] == "Globex Alice"
        eventually(lambda: all_serve(w, "alice", "Alice v0", "near"), "acme's workers serve alice from RAM")
        dropped = w.ask("dropped")
        stack.sql("UPDATE res_users SET name = 'Globex Alice v1' WHERE tenant_id = 'globex'")
        eventually(
            lambda: (
                globex.get_resource("user_by_slug", ["alice"], tenant="globex")["name"] == "Globex Alice v1"
            ),
            "globex saw its own change",
        )
        # acme's entries, keyed by the same slug, were not touched.
        assert w.ask("dropped") == dropped, "a globex change dropped acme entries"
        assert all(a[1] == "Alice v0" for a in w.ask("read", "alice"))
    finally:
        globex.close()
