"""Fork safety: a forked worker (gunicorn, Odoo prefork) opens its own channel
and watch stream, never serves the parent's entries, and does not deadlock
even when the parent was busy reading while it forked."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from herald import Client, NearConfig
from tests.fake_node import stats


@pytest.fixture
def node() -> Iterator[str]:
    """A scripted node in its own process: this one then holds only the
    client's gRPC state, as an app server does when it forks workers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_node"],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    port = proc.stdout.readline().strip()
    yield f"127.0.0.1:{port}"
    proc.stdin.close()
    proc.wait(10)


def child(client: Client, conn: Connection) -> None:
    near = client.near
    held_at_start = len(near.store) if near is not None else -1
    first = client.get_resource_result("user_by_slug", ["alice"], tenant="acme").layer
    live = client.wait_live(10)
    client.get_resource_result("user_by_slug", ["alice"], tenant="acme")
    second = client.get_resource_result("user_by_slug", ["alice"], tenant="acme").layer
    conn.send((held_at_start, first, live, second))
    client.close()


def test_a_forked_child_builds_its_own_channel_and_never_serves_the_parents_entries(node: str) -> None:
    client = Client(node, "token-0123456789abcdef", near=NearConfig(tenants=["acme"]))
    try:
        assert client.wait_live()
        client.get_resource("user_by_slug", ["alice"], tenant="acme")
        assert client.get_resource_result("user_by_slug", ["alice"], tenant="acme").layer == "near"
        parent_peers = set(stats(node)["get_peers"])

        # Fork while another thread keeps reading (holding the store's lock
        # now and then): the child must not inherit a held lock.
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                client.get_resource("user_by_slug", ["alice"], tenant="acme")

        reader = threading.Thread(target=busy)
        reader.start()
        ctx = multiprocessing.get_context("fork")
        results = []
        try:
            for _ in range(3):
                ours, theirs = ctx.Pipe()
                p = ctx.Process(target=child, args=(client, theirs))
                p.start()
                p.join(30)
                if p.is_alive():
                    p.kill()
                    pytest.fail("a forked child deadlocked")
                assert p.exitcode == 0
                results.append(ours.recv())
        finally:
            stop.set()
            reader.join()
        for held_at_start, first, live, second in results:
            assert held_at_start == 0, "the child saw the parent's entries"
            assert first != "near", "the child served a parent's entry"
            assert live and second == "near", "the child's own near cache never worked"
        child_peers = set(stats(node)["get_peers"]) - parent_peers
        assert len(child_peers) == 3, f"each child must connect on its own: {child_peers}"
        # The parent left gRPC for each fork (its stream ended, so it
        # flushed), then watched again and serves from RAM again.
        assert client.wait_live()
        client.get_resource("user_by_slug", ["alice"], tenant="acme")
        assert client.get_resource_result("user_by_slug", ["alice"], tenant="acme").layer == "near"
    finally:
        client.close()
