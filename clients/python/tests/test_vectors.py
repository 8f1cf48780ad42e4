"""The shared near-cache vectors (clients/vectors/near-cache.json), run against
the Python client's protocol state with a virtual clock: one pytest case per
vector case, by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from herald.near.protocol import Answer, NearState
from herald.near.store import FillTicket, NearStore
from herald.v1 import events_pb2

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "near-cache.json"
DOC = json.loads(VECTORS.read_text())
OPERATIONS = {
    "insert": events_pb2.OPERATION_INSERT,
    "update": events_pb2.OPERATION_UPDATE,
    "delete": events_pb2.OPERATION_DELETE,
    "truncate": events_pb2.OPERATION_TRUNCATE,
}


def event(spec: dict[str, Any]) -> events_pb2.InvalidationEvent:
    return events_pb2.InvalidationEvent(
        tenant=spec.get("tenant", ""),
        table=spec.get("table", ""),
        operation=OPERATIONS.get(spec.get("operation", ""), events_pb2.OPERATION_UNSPECIFIED),
        tags=spec.get("tags", []),
        widened=spec.get("widened", False),
        all_tenants=spec.get("all_tenants", False),
        key_prefixes=spec.get("key_prefixes", []),
    )


class Runner:
    def __init__(self, max_staleness_ms: int | None = None) -> None:
        self.now = 0.0
        self.state = NearState(
            NearStore(max_bytes=1 << 20, max_ttl_s=3600, clock=lambda: self.now),
            heartbeat_timeout_s=DOC["heartbeat_timeout_ms"] / 1000,
            clock=lambda: self.now,
            max_staleness_s=None if max_staleness_ms is None else max_staleness_ms / 1000,
        )
        self.tickets: dict[str, FillTicket] = {}

    def step(self, s: dict[str, Any]) -> None:
        st, op = self.state, s["op"]
        if op == "ready":
            st.on_ready(s["node_id"], s["generation"], staleness_ms=s.get("staleness_ms"))
        elif op == "events":
            st.on_events(s["seq"], [event(e) for e in s["events"]])
        elif op == "heartbeat":
            st.on_heartbeat(s["generation"], s["seq"], staleness_ms=s.get("staleness_ms"))
        elif op == "end":
            st.on_end(s["code"])
        elif op == "advance":
            self.now += s["ms"] / 1000
            st.check_deadline()
        elif op == "ticket":
            self.tickets[s["id"]] = st.begin_fill()
        elif op == "answer":
            answer = Answer(
                value=s["value"].encode(),
                found=True,
                tags=s["tags"],
                node_id=s["node_id"],
                generation=s["generation"],
                global_scope=s.get("global", False),
            )
            stored = st.fill(self.tickets.pop(s["ticket"]), s["key"], s["tenant"], answer)
            assert ("stored" if stored else "not_stored") == s["expect"], s
        elif op == "get":
            live, stale = st.live, st.stale_cause() is not None
            entry = st.get(s["key"])
            outcome = "bypass" if not live else "stale" if stale else ("hit" if entry is not None else "miss")
            assert outcome == s["expect"], s
            if outcome == "hit":
                assert entry is not None and entry.value == s["value"].encode(), s
        elif op == "expect":
            if "live" in s:
                assert st.live == s["live"], s
            if "entries" in s:
                assert len(st.store) == s["entries"], s
        else:
            raise AssertionError(f"unknown op {op!r}: update the runner")


def test_the_vectors_are_format_1() -> None:
    assert DOC["format"] == 1
    assert len(DOC["cases"]) >= 25


@pytest.mark.parametrize("case", DOC["cases"], ids=[c["name"] for c in DOC["cases"]])
def test_vector(case: dict[str, Any]) -> None:
    runner = Runner(case.get("max_staleness_ms"))
    for i, step in enumerate(case["steps"]):
        try:
            runner.step(step)
        except AssertionError as e:
            raise AssertionError(f"{case['name']} step {i}: {e}\n{case['description']}") from None
