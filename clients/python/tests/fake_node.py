"""A scripted stand-in for one cache-api node's ``Get`` and ``Watch`` (gRPC, in
this process), for the unit tests of the client's protocol handling: the test
decides every message the stream sends and when a ``Get`` answers. The real
node is exercised by tests/test_integration.py."""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from herald.v1 import cache_pb2 as pb
from herald.v1 import events_pb2

_END = object()


@dataclass
class _Stream:
    messages: queue.Queue[Any] = field(default_factory=queue.Queue)
    seq: int = 0
    peer: str = ""


class FakeNode:
    def __init__(self, node_id: str = "fake-a", generation: int = 1, heartbeat_s: float = 0.05) -> None:
        self.node_id = node_id
        self.generation = generation
        self.heartbeat_s = heartbeat_s
        self.heartbeats = threading.Event()
        self.heartbeats.set()
        #: The staleness every Ready and periodic heartbeat reports (None: none).
        self.staleness_ms: int | None = None
        self.values: dict[str, tuple[bytes, list[str]]] = {}
        self.gets = 0
        self.get_peers: list[str] = []
        #: When set, a Get waits for it (released by the test) before answering.
        self.hold_gets: threading.Event | None = None
        self.get_arrived = threading.Event()
        self.streams: list[_Stream] = []
        #: Watch streams opened so far.
        self.opened = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Get": grpc.unary_unary_rpc_method_handler(
                self._get, request_deserializer=pb.GetRequest.FromString, response_serializer=_ser
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self._watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=_ser
            ),
            # Not Herald's: what a test in another process asks this node.
            "FakeStats": grpc.unary_unary_rpc_method_handler(self._stats),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("herald.v1.Cache", handlers),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        self._server.stop(0)

    # -- what the test drives ----------------------------------------------------

    def current(self) -> _Stream:
        with self._lock:
            return self.streams[-1]

    def send_events(self, *events: events_pb2.InvalidationEvent, seq: int | None = None) -> None:
        s = self.current()
        with self._lock:
            s.seq = s.seq + 1 if seq is None else seq
            msg = pb.WatchMessage(events=pb.WatchMessage.Events(seq=s.seq, events=list(events)))
        s.messages.put(msg)

    def send_heartbeat(self, generation: int | None = None, seq: int | None = None) -> None:
        s = self.current()
        g = self.generation if generation is None else generation
        s.messages.put(
            pb.WatchMessage(
                heartbeat=pb.WatchMessage.Heartbeat(generation=g, seq=s.seq if seq is None else seq)
            )
        )

    def end_stream(self, code: grpc.StatusCode, details: str = "ended by the test") -> None:
        self.current().messages.put((_END, code, details))

    # -- the service ---------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.heartbeats.is_set():
                continue
            with self._lock:
                streams = list(self.streams)
            for s in streams:
                s.messages.put(
                    pb.WatchMessage(
                        heartbeat=pb.WatchMessage.Heartbeat(
                            generation=self.generation, seq=s.seq, position=self._position()
                        )
                    )
                )

    def _position(self) -> pb.WatchPosition:
        return pb.WatchPosition(staleness_ms=self.staleness_ms)

    def _watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchMessage]:
        stream = _Stream(peer=context.peer())
        with self._lock:
            self.streams.append(stream)
            self.opened += 1
        position = self._position()
        ready = pb.WatchMessage.Ready(node_id=self.node_id, generation=self.generation, position=position)
        yield pb.WatchMessage(ready=ready)
        try:
            while context.is_active():
                try:
                    msg = stream.messages.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(msg, tuple) and msg[0] is _END:
                    context.abort(msg[1], msg[2])
                yield msg
        finally:
            with self._lock:
                if stream in self.streams:
                    self.streams.remove(stream)

    def _stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            return json.dumps(
                {"gets": self.gets, "get_peers": self.get_peers, "opened": self.opened}
            ).encode()

    def _get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        with self._lock:
            self.gets += 1
            self.get_peers.append(context.peer())
        self.get_arrived.set()
        if self.hold_gets is not None:
            self.hold_gets.wait(10)
        key = request.key or f"{request.resource.resource}:{','.join(request.resource.params)}"
        found = self.values.get(key)
        if found is None:
            return pb.GetResponse(found=False, layer=pb.LAYER_NONE)
        value, tags = found
        return pb.GetResponse(
            found=True,
            value=value,
            layer=pb.LAYER_L1,
            tags=tags,
            node_id=self.node_id,
            generation=self.generation,
        )


def _ser(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def stats(target: str) -> dict[str, Any]:
    """A FakeNode's counters, from any process."""
    with grpc.insecure_channel(target) as ch:
        raw = ch.unary_unary("/herald.v1.Cache/FakeStats")(b"", timeout=5)
    result: dict[str, Any] = json.loads(raw)
    return result


if __name__ == "__main__":
    # python -m tests.fake_node: serves a node holding alice, prints its port.
    node = FakeNode()
    node.values["user_by_slug:alice"] = (b'{"name": "Alice"}', ["res_users.id=1", "@user_by_slug:alice"])
    print(node.port, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    node.stop()
