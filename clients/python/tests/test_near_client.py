"""The client's near cache against a scripted node (tests/fake_node.py): the
ticket race, and a flush on every kind of doubt — stream error, heartbeat
silence, seq gap, generation change — then recovery on the next Ready."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from herald import Client, NearConfig
from herald.v1 import events_pb2
from tests.fake_node import FakeNode

TAGS = ["res_users.id=1", "res_users.website_slug=alice", "@user_by_slug:alice"]


def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


@pytest.fixture
def node() -> Iterator[FakeNode]:
    n = FakeNode()
    n.values["user_by_slug:alice"] = (b'{"name": "Alice"}', TAGS)
    yield n
    n.stop()


@pytest.fixture
def client(node: FakeNode) -> Iterator[Client]:
    c = Client(
        node.target, "token-0123456789abcdef", near=NearConfig(tenants=["acme"], heartbeat_timeout_s=0.5)
    )
    assert c.wait_live(), "the client never became live"
    yield c
    c.close()


def read(client: Client) -> tuple[str, str]:
    r = client.get_resource_result("user_by_slug", ["alice"], tenant="acme")
    return r.value["name"], r.layer


def event(*tags: str, tenant: str = "acme") -> events_pb2.InvalidationEvent:
    return events_pb2.InvalidationEvent(tenant=tenant, table="res_users", tags=list(tags))


def test_a_fill_is_served_from_ram_until_an_event_names_its_tags(node: FakeNode, client: Client) -> None:
    assert read(client) == ("Alice", "l1")
    assert read(client) == ("Alice", "near")
    assert node.gets == 1
    node.send_events(event("res_users.id=2"))  # another row: kept
    node.values["user_by_slug:alice"] = (b'{"name": "Alicia"}', TAGS)
    node.send_events(event("res_users.id=1"))
    eventually(lambda: read(client) == ("Alicia", "l1"), "the event dropped the entry")


def test_an_event_between_ticket_and_answer_refuses_the_fill(node: FakeNode, client: Client) -> None:
    node.hold_gets = threading.Event()
    result: list[tuple[str, str]] = []
    reader = threading.Thread(target=lambda: result.append(read(client)))
    reader.start()
    assert node.get_arrived.wait(5)
    # The node answers with the old value, but the event reached the client
    # after its ticket: the answer is served, not stored.
    node.send_events(event("res_users.website_slug=alice"))
    eventually(
        lambda: client.near is not None and client.near.store.stats.events_applied == 1, "event applied"
    )
    node.hold_gets.set()
    reader.join(5)
    assert result == [("Alice", "l1")]
    assert client.near is not None and client.near.store.stats.rejected_stale_fills == 1
    node.hold_gets = None
    assert read(client)[1] == "l1", "a raced answer was stored"


@pytest.mark.parametrize(
    "doubt",
    ["stream_error", "data_loss", "ok_end", "seq_gap", "repeated_seq", "generation_change", "heartbeat_seq"],
)
def test_any_doubt_flushes_then_the_next_ready_makes_it_live_again(
    node: FakeNode, client: Client, doubt: str
) -> None:
    read(client)
    assert read(client)[1] == "near"
    near = client.near
    assert near is not None
    flushes, streams = near.store.stats.flushes, node.opened
    if doubt == "stream_error":
        node.end_stream(grpc.StatusCode.UNAVAILABLE)
    elif doubt == "data_loss":
        node.end_stream(grpc.StatusCode.DATA_LOSS)
    elif doubt == "ok_end":
        node.end_stream(grpc.StatusCode.OK)
    elif doubt == "seq_gap":
        node.send_events(event("unrelated"), seq=2)
    elif doubt == "repeated_seq":
        node.send_events(event("unrelated"))
        node.send_events(event("unrelated"), seq=1)
    elif doubt == "generation_change":
        node.send_heartbeat(generation=node.generation + 1)
    elif doubt == "heartbeat_seq":
        node.send_heartbeat(seq=5)
    eventually(lambda: near.store.stats.flushes > flushes, f"{doubt} flushed")
    assert len(near.store) == 0
    # A new stream (a fresh Ready) makes it live again, and it refills.
    eventually(lambda: client.live() and node.opened > streams, "live again on a new stream")
    assert read(client)[1] == "l1"
    assert read(client)[1] == "near"


def test_heartbeat_silence_flushes_and_bypasses(node: FakeNode, client: Client) -> None:
    read(client)
    assert read(client)[1] == "near"
    node.heartbeats.clear()  # a half-open connection: nothing arrives, nothing ends
    eventually(lambda: not client.live(), "silence past the heartbeat timeout made it not live")
    assert client.near is not None and len(client.near.store) == 0
    # Reads go through to the node meanwhile, and nothing is stored.
    gets = node.gets
    assert read(client)[1] == "l1"
    assert read(client)[1] in ("l1", "near")
    node.heartbeats.set()
    eventually(lambda: client.live(), "live again once messages flow")
    assert node.gets > gets


def test_a_bound_serves_from_ram_only_while_the_node_vouches_for_it(node: FakeNode) -> None:
    node.staleness_ms = 100
    near = NearConfig(tenants=["acme"], heartbeat_timeout_s=0.5, max_staleness_ms=500)
    bounded = Client(node.target, "token-0123456789abcdef", near=near)
    try:
        assert bounded.wait_live()
        eventually(lambda: read(bounded)[1] == "near", "a fresh stream answered from RAM")
        # The node's pipeline is behind: it still heartbeats, but reports a
        # staleness past the bound; the entry stays, reads go to the node.
        node.staleness_ms = 2_000
        eventually(lambda: read(bounded)[1] == "l1", "a stale stream kept answering from RAM")
        assert bounded.live() and bounded.near is not None and len(bounded.near.store) == 1
        assert bounded.near.stale_bypassed["watermark_behind"] >= 1
        # No report at all: no vouching either.
        node.staleness_ms = None
        state = bounded.near
        eventually(lambda: state.stale_cause() == "no_watermark", "the unreported staleness")
        assert read(bounded)[1] == "l1"
        node.staleness_ms = 100
        eventually(lambda: read(bounded)[1] == "near", "fresh again, RAM answered again")
    finally:
        bounded.close()


def test_concurrent_misses_of_one_key_send_one_request(node: FakeNode, client: Client) -> None:
    node.hold_gets = threading.Event()
    readers = [threading.Thread(target=lambda: read(client)) for _ in range(8)]
    for r in readers:
        r.start()
    assert node.get_arrived.wait(5)
    eventually(lambda: client._rt().flights.merged == 7, "the other readers joined the flight")
    node.hold_gets.set()
    for r in readers:
        r.join(5)
    assert node.gets == 1
