"""The ``herald.v1.Cache`` methods over one gRPC channel, typed, with every
``grpc.RpcError`` turned into a :class:`herald.errors.HeraldError`."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import grpc

from herald.errors import from_rpc_error
from herald.process import GATE
from herald.v1 import cache_pb2 as pb

Req = TypeVar("Req")
Resp = TypeVar("Resp")

Metadata = tuple[tuple[str, str], ...]


class Unary(Generic[Req, Resp]):
    def __init__(self, channel: grpc.Channel, name: str, response: Any) -> None:
        self._call = channel.unary_unary(
            f"/herald.v1.Cache/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def __call__(self, request: Req, metadata: Metadata, timeout: float | None) -> Resp:
        try:
            with GATE.call():
                response: Resp = self._call(request, metadata=metadata, timeout=timeout)
            return response
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class Streaming(Generic[Req, Resp]):
    def __init__(self, channel: grpc.Channel, name: str, response: Any) -> None:
        self._call = channel.unary_stream(
            f"/herald.v1.Cache/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def open(self, request: Req, metadata: Metadata) -> Any:
        """The call: an iterator of responses that ``cancel()`` ends from any thread.
        Open and read it inside ``GATE.call()``."""
        return self._call(request, metadata=metadata)


class CacheStub:
    """One process's stub over one channel (never shared across fork)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.get: Unary[pb.GetRequest, pb.GetResponse] = Unary(channel, "Get", pb.GetResponse)
        self.get_many: Unary[pb.GetManyRequest, pb.GetManyResponse] = Unary(
            channel, "GetMany", pb.GetManyResponse
        )
        self.set: Unary[pb.SetRequest, pb.SetResponse] = Unary(channel, "Set", pb.SetResponse)
        self.add: Unary[pb.AddRequest, pb.AddResponse] = Unary(channel, "Add", pb.AddResponse)
        self.incr: Unary[pb.IncrRequest, pb.IncrResponse] = Unary(channel, "Incr", pb.IncrResponse)
        self.delete: Unary[pb.DeleteRequest, pb.DeleteResponse] = Unary(channel, "Delete", pb.DeleteResponse)
        self.invalidate_tags: Unary[pb.InvalidateTagsRequest, pb.InvalidateResponse] = Unary(
            channel, "InvalidateTags", pb.InvalidateResponse
        )
        self.invalidate_prefix: Unary[pb.InvalidatePrefixRequest, pb.InvalidateResponse] = Unary(
            channel, "InvalidatePrefix", pb.InvalidateResponse
        )
        self.watch: Streaming[pb.WatchRequest, pb.WatchMessage] = Streaming(channel, "Watch", pb.WatchMessage)
