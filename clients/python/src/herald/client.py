"""The client: Herald's cache API over gRPC, with a near cache in the process.

::

    from herald import Client, NearConfig

    herald = Client("127.0.0.1:50051", token=os.environ["HERALD_CACHE_TOKEN"],
                    near=NearConfig(tenants=["acme"]))
    user = herald.get_resource("user_by_slug", ["alice"], tenant="acme")   # dict, or None

Reads are served from RAM only while the near cache is live (its Watch
stream is up, heartbeats on time); otherwise they go to cache-api and nothing
is stored. Writes (set, delete, invalidations) pass through to cache-api and
drop the local copy at once. Every process — each forked gunicorn or Odoo
worker — gets its own channel, near cache and watcher, lazily, on first use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from herald._rpc import CacheStub, Metadata
from herald.errors import HeraldError, InvalidArgument, from_code
from herald.metrics import Metrics
from herald.near.flight import SingleFlight
from herald.near.protocol import SCOPE_TAG, Answer, NearState
from herald.near.store import Entry, NearStore
from herald.near.tags import TagKey
from herald.near.watcher import Watcher
from herald.process import PerProcess
from herald.v1 import cache_pb2 as pb

log = logging.getLogger("herald")

LAYERS = {pb.LAYER_L1: "l1", pb.LAYER_L2: "l2", pb.LAYER_DATABASE: "database", pb.LAYER_NONE: "none"}


@dataclass(frozen=True)
class NearConfig:
    """The near cache's bounds and what it watches.

    ``tenants``: the tenants to watch; ``["*"]`` for a token bound to every
    tenant; ``None`` to watch each tenant the process reads (the stream is
    reopened, and the cache flushed, when a new one appears — fine for a
    handful of tenants per worker, as Odoo's databases).
    """

    tenants: Sequence[str] | None = None
    max_bytes: int = 64 * 1024 * 1024
    max_ttl_s: float = 300.0
    #: No message for this long → flush and bypass. At least 3 times the node's
    #: cache.watch_heartbeat_ms (500 ms by default).
    heartbeat_timeout_s: float = 1.5
    #: The freshness bound, as cache-api's ``max_staleness_ms``: RAM answers only
    #: while the node's last reported staleness plus the time since it arrived is
    #: within it; otherwise reads go to the node (which applies its own bound).
    #: None: no bound (liveness alone decides).
    max_staleness_ms: int | None = None


#: The near cache's defaults: every tenant the process reads, 64 MiB, 5 minutes.
DEFAULT_NEAR = NearConfig()


@dataclass(frozen=True)
class Result:
    """One answer: ``value`` is the JSON-decoded resource value or the key's bytes."""

    found: bool
    value: Any
    layer: str
    #: On an explicit-key miss: pass to :meth:`Client.set` to make the fill version-gated.
    fill_token: str = ""


@dataclass
class _Runtime:
    """What belongs to one process: the channel and everything built on it."""

    channel: grpc.Channel
    stub: CacheStub
    near: NearState | None
    watcher: Watcher | None
    flights: SingleFlight[Result] = field(default_factory=SingleFlight)
    tenants: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Client:
    """A Herald cache client. Safe to create at import time and to share between
    threads; each process (after fork) builds its own connection and near cache."""

    def __init__(
        self,
        target: str,
        token: str,
        *,
        near: NearConfig | None = DEFAULT_NEAR,
        timeout_s: float = 2.0,
        metrics: Metrics | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._metadata: Metadata = (("authorization", f"Bearer {token}"),)
        self.near_config = near
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics(None)
        self._channel_options = [
            # A half-open connection is found by the heartbeat timeout too;
            # keepalive closes it at the transport.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            *channel_options,
        ]
        self._process: PerProcess[_Runtime] = PerProcess(self._build)

    # -- per process ---------------------------------------------------------------

    def _build(self) -> _Runtime:
        channel = grpc.insecure_channel(self.target, options=self._channel_options)
        stub = CacheStub(channel)
        cfg = self.near_config
        if cfg is None:
            return _Runtime(channel, stub, None, None)
        bound_s = None if cfg.max_staleness_ms is None else cfg.max_staleness_ms / 1000
        store = NearStore(cfg.max_bytes, cfg.max_ttl_s)
        state = NearState(store, cfg.heartbeat_timeout_s, max_staleness_s=bound_s)
        runtime = _Runtime(channel, stub, state, None)
        if cfg.tenants is not None:
            runtime.tenants.update(cfg.tenants)
        runtime.watcher = Watcher(stub, state, self._metadata, lambda: sorted(runtime.tenants))
        runtime.watcher.start()
        self.metrics.attach(state)
        return runtime

    def _rt(self) -> _Runtime:
        return self._process.get()

    @property
    def near(self) -> NearState | None:
        """This process's near cache state (built on first use)."""
        return self._rt().near

    def close(self) -> None:
        """Stops this process's watcher and closes its channel (tests, shutdown)."""
        rt = self._process.peek()
        if rt is None:
            return
        if rt.watcher is not None:
            rt.watcher.stop()
        rt.channel.close()

    def _near_for(self, rt: _Runtime, tenant: str) -> NearState | None:
        """The near cache if it may serve ``tenant`` (watching it, starting to if allowed)."""
        near = rt.near
        if near is None:
            return None
        if tenant in rt.tenants or "*" in rt.tenants:
            return near
        cfg = self.near_config
        if cfg is not None and cfg.tenants is None:
            with rt.lock:
                if tenant not in rt.tenants:
                    rt.tenants.add(tenant)
                    if rt.watcher is not None:
                        rt.watcher.restart()
        return None

    # -- reads ---------------------------------------------------------------------

    def get_resource(
        self, resource: str, params: Sequence[Any] = (), *, tenant: str, min_commit_lsn: int = 0
    ) -> Any:
        """A configured resource's value (decoded JSON), or ``None`` when no row matched."""
        r = self.get_resource_result(resource, params, tenant=tenant, min_commit_lsn=min_commit_lsn)
        return r.value if r.found else None

    def get_resource_result(
        self, resource: str, params: Sequence[Any] = (), *, tenant: str, min_commit_lsn: int = 0
    ) -> Result:
        strs = [_param(p) for p in params]
        key = "r\x1f" + resource + "\x1f" + "\x1f".join(strs)
        request = pb.GetRequest(
            tenant=tenant,
            resource=pb.ResourceRef(resource=resource, params=strs),
            min_commit_lsn=min_commit_lsn,
        )
        return self._get(tenant, key, request, min_commit_lsn, _decode_json)

    def get_key(self, key: str, *, tenant: str) -> bytes | None:
        """An explicit key's bytes, or ``None`` when nothing is cached under it."""
        r = self.get_key_result(key, tenant=tenant)
        return r.value if r.found else None

    def get_key_result(self, key: str, *, tenant: str) -> Result:
        request = pb.GetRequest(tenant=tenant, key=key)
        return self._get(tenant, "k\x1f" + key, request, 0, bytes)

    def _get(
        self, tenant: str, key: str, request: pb.GetRequest, min_lsn: int, decode: Callable[[bytes], Any]
    ) -> Result:
        rt = self._rt()
        near = self._near_for(rt, tenant)
        local = tenant + "\x1f" + key
        if near is not None and (min_lsn == 0 or near.applied_lsn >= min_lsn):
            entry = near.get(local)
            if entry is not None:
                return Result(entry.found, decode(entry.value) if entry.found else None, "near")
            # Single-flighted: concurrent misses of one key send one request.
            return rt.flights.run(local, lambda: self._fill(rt, near, tenant, local, request, decode))
        return _result(self._call_get(rt, request), decode)

    def _fill(
        self,
        rt: _Runtime,
        near: NearState,
        tenant: str,
        local: str,
        request: pb.GetRequest,
        decode: Callable[[bytes], Any],
    ) -> Result:
        ticket = near.begin_fill()
        try:
            response = self._call_get(rt, request)
        except BaseException:
            ticket.release()
            raise
        stored = near.fill(ticket, local, tenant, _answer(response))
        self.metrics.filled(stored)
        return _result(response, decode)

    def _call_get(self, rt: _Runtime, request: pb.GetRequest) -> pb.GetResponse:
        started = time.perf_counter()
        try:
            return rt.stub.get(request, self._metadata, self.timeout_s)
        except HeraldError as e:
            self.metrics.error(e.code)
            raise
        finally:
            self.metrics.request_seconds(time.perf_counter() - started)

    def get_many(self, items: Sequence[Mapping[str, Any]], *, tenant: str) -> list[Result | HeraldError]:
        """Several lookups of one tenant, each ``{"resource": name, "params": [...]}`` or
        ``{"key": k}``: one result or error per item, in order. Near-cache hits are
        answered from RAM; the rest go in one GetMany."""
        rt = self._rt()
        near = self._near_for(rt, tenant)
        out: list[Result | HeraldError | None] = [None] * len(items)
        pending: list[tuple[int, str, pb.GetItem, Callable[[bytes], Any]]] = []
        for i, item in enumerate(items):
            decode: Callable[[bytes], Any]
            if "key" in item:
                local, decode = tenant + "\x1fk\x1f" + item["key"], bytes
                get_item = pb.GetItem(key=item["key"])
            else:
                params = [_param(p) for p in item.get("params", ())]
                local = tenant + "\x1fr\x1f" + item["resource"] + "\x1f" + "\x1f".join(params)
                decode = _decode_json
                get_item = pb.GetItem(resource=pb.ResourceRef(resource=item["resource"], params=params))
            entry = near.get(local) if near is not None else None
            if entry is not None:
                out[i] = Result(entry.found, decode(entry.value) if entry.found else None, "near")
            else:
                pending.append((i, local, get_item, decode))
        if pending:
            ticket = near.begin_fill() if near is not None else None
            try:
                request = pb.GetManyRequest(tenant=tenant, items=[p[2] for p in pending])
                response = rt.stub.get_many(request, self._metadata, self.timeout_s)
                for (i, local, _, decode), r in zip(pending, response.results, strict=True):
                    if r.code != 0:
                        out[i] = from_code(_code_name(r.code), r.error)
                        continue
                    if near is not None and ticket is not None:
                        # One ticket per answer, all as old as the batch's,
                        # which is held until every answer was offered.
                        near.fill(near.store.ticket_at(ticket.seq), local, tenant, _answer(r.response))
                    out[i] = _result(r.response, decode)
            finally:
                if ticket is not None:
                    ticket.release()
        return [r for r in out if r is not None]

    # -- writes --------------------------------------------------------------------

    def set(
        self,
        key: str,
        value: bytes,
        *,
        tenant: str,
        ttl_s: float | None = None,
        tags: Iterable[str] = (),
        fill_token: str = "",
    ) -> bool:
        """Stores an explicit key; with the ``fill_token`` of the miss that started this
        fill, the store is refused (False) when one of its tags was invalidated since."""
        rt = self._rt()
        self._drop_key(rt, tenant, key)
        request = pb.SetRequest(
            tenant=tenant, key=key, value=value, ttl_ms=_ttl_ms(ttl_s), tags=list(tags), fill_token=fill_token
        )
        return bool(rt.stub.set(request, self._metadata, self.timeout_s).stored)

    def add(
        self, key: str, value: bytes, *, tenant: str, ttl_s: float | None = None, tags: Iterable[str] = ()
    ) -> bool:
        """Stores an explicit key only when nothing is cached under it (atomic across nodes)."""
        rt = self._rt()
        request = pb.AddRequest(tenant=tenant, key=key, value=value, ttl_ms=_ttl_ms(ttl_s), tags=list(tags))
        stored = bool(rt.stub.add(request, self._metadata, self.timeout_s).stored)
        if stored:
            self._drop_key(rt, tenant, key)
        return stored

    def incr(self, key: str, delta: int = 1, *, tenant: str) -> int | None:
        """Adds ``delta`` to a key holding a decimal integer, atomically across nodes;
        the new value, or ``None`` when nothing is cached under the key."""
        rt = self._rt()
        response = rt.stub.incr(
            pb.IncrRequest(tenant=tenant, key=key, delta=delta), self._metadata, self.timeout_s
        )
        self._drop_key(rt, tenant, key)
        return int(response.value) if response.found else None

    def delete(self, key: str, *, tenant: str) -> int:
        """Drops an explicit key on every node (and here at once)."""
        rt = self._rt()
        self._drop_key(rt, tenant, key)
        request = pb.DeleteRequest(tenant=tenant, key=key)
        return int(rt.stub.delete(request, self._metadata, self.timeout_s).deleted)

    def delete_resource(self, resource: str, params: Sequence[Any] = (), *, tenant: str) -> int:
        """Drops one resource entry on every node (and here at once)."""
        rt = self._rt()
        strs = [_param(p) for p in params]
        if rt.near is not None:
            rt.near.store.discard(tenant + "\x1fr\x1f" + resource + "\x1f" + "\x1f".join(strs))
        request = pb.DeleteRequest(tenant=tenant, resource=pb.ResourceRef(resource=resource, params=strs))
        return int(rt.stub.delete(request, self._metadata, self.timeout_s).deleted)

    def invalidate_tags(self, tags: Iterable[str], *, tenant: str) -> int:
        """Drops every entry of the tenant holding one of ``tags``, on every node."""
        rt = self._rt()
        tags = list(tags)
        if rt.near is not None:
            rt.near.store.invalidate([TagKey(tenant, t) for t in tags])
        request = pb.InvalidateTagsRequest(tenant=tenant, tags=tags)
        return int(rt.stub.invalidate_tags(request, self._metadata, self.timeout_s).deleted)

    def invalidate_prefix(
        self, *, tenant: str, resource: str = "", key_prefix: str = "", all: bool = False
    ) -> int:
        """Drops a whole resource, explicit keys by prefix, or everything of the tenant."""
        if (bool(resource), bool(key_prefix), all).count(True) != 1:
            raise InvalidArgument("give exactly one of resource, key_prefix and all")
        rt = self._rt()
        if rt.near is not None:
            rt.near.store.invalidate([TagKey(tenant, SCOPE_TAG)])
        request = pb.InvalidatePrefixRequest(tenant=tenant, resource=resource, key_prefix=key_prefix, all=all)
        return int(rt.stub.invalidate_prefix(request, self._metadata, self.timeout_s).deleted)

    def drop_local(self, tenant: str, tags: Iterable[str]) -> int:
        """Drops this process's near-cache entries holding ``tags`` (no call to Herald):
        a worker's own writes, at post-commit, before the invalidation comes back."""
        rt = self._process.peek()
        if rt is None or rt.near is None:
            return 0
        return rt.near.store.invalidate([TagKey(tenant, t) for t in tags])

    def _drop_key(self, rt: _Runtime, tenant: str, key: str) -> None:
        if rt.near is not None:
            rt.near.store.discard(tenant + "\x1fk\x1f" + key)

    # -- liveness ------------------------------------------------------------------

    def live(self, tenant: str | None = None) -> bool:
        """Whether this process's near cache serves from RAM now (for ``tenant``)."""
        rt = self._rt()
        if rt.near is None:
            return False
        if tenant is not None and self._near_for(rt, tenant) is None:
            return False
        return rt.near.live

    def wait_live(self, timeout_s: float = 10.0, tenant: str | None = None) -> bool:
        """Waits until the near cache is live (tests, warm-up); false on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.live(tenant):
                return True
            time.sleep(0.01)
        return False


def _param(p: Any) -> str:
    return p if isinstance(p, str) else json.dumps(p) if isinstance(p, bool) else str(p)


def _ttl_ms(ttl_s: float | None) -> int:
    if ttl_s is None:
        return 0
    if ttl_s <= 0:
        raise InvalidArgument("ttl_s must be positive (None: the node's default)")
    return max(1, int(ttl_s * 1000))


def _decode_json(value: bytes) -> Any:
    return json.loads(value) if value else None


def _result(r: pb.GetResponse, decode: Callable[[bytes], Any]) -> Result:
    value = decode(r.value) if r.found else None
    return Result(r.found, value, LAYERS.get(r.layer, "none"), r.fill_token)


def _answer(r: pb.GetResponse) -> Answer:
    return Answer(
        value=r.value,
        found=r.found,
        tags=list(r.tags),
        node_id=r.node_id,
        generation=r.generation,
        expires_at_ms=r.expires_at_ms,
        global_scope=bool(getattr(r, "global")),
    )


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return "UNKNOWN"


__all__ = ["Client", "Entry", "NearConfig", "Result"]
