"""The Watch v2 protocol state of one near cache (``docs/near-cache.md``): what
each stream message does to the store, when the cache is live, and the fill
rule. No I/O and no threads: the watcher feeds it messages, readers ask it to
store answers, and ``clients/vectors/near-cache.json`` drives it with a
virtual clock.

Live means: a ``Ready`` was received on the current stream, and no doubt
since — every ``Events.seq`` one more than the last, every heartbeat of the
ready's generation and last seq, no silence past the heartbeat timeout, the
stream not ended. Any doubt flushes everything and makes the cache not live
until the next ``Ready``.

With a freshness bound (``max_staleness_s``) a live cache answers from RAM only
while it can vouch for the bound: the staleness the node last reported
(``WatchPosition.staleness_ms``, a duration: no clock shared with the node)
plus the time since that message arrived is within it. Otherwise reads go to
the node, which applies its own bound; they are counted by cause in
``stale_bypassed`` (``no_watermark``, ``watermark_behind``, as cache-api's).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from herald.near.store import Entry, FillTicket, NearStore
from herald.near.tags import TagKey, event_tags
from herald.v1 import events_pb2

log = logging.getLogger("herald.near")

_TENANT = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
#: Every entry is also indexed under this tag of its scope, which a key-prefix
#: event (the cache API's InvalidatePrefix) drops: a near cache cannot map
#: Herald's key prefixes to its own keys, so it drops the whole scope. Real
#: tags never hold control characters, so it cannot collide with one.
SCOPE_TAG = "\x1f*"


@dataclass(frozen=True)
class Stream:
    """The ``Ready`` of the stream the cache is live on."""

    node_id: str
    generation: int


@dataclass(frozen=True)
class Answer:
    """What a node answered, as far as the fill rule needs it."""

    value: bytes
    found: bool
    tags: Sequence[str]
    node_id: str
    generation: int
    expires_at_ms: int = 0
    global_scope: bool = False


class NearState:
    """The store plus the stream state; thread-safe (the watcher and readers share it)."""

    def __init__(
        self,
        store: NearStore,
        heartbeat_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000,
        max_staleness_s: float | None = None,
    ) -> None:
        self.store = store
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_staleness_s = max_staleness_s
        #: The staleness the node last reported on this stream, in seconds, and
        #: when it arrived (our clock); None: none reported.
        self._fresh: tuple[float, float] | None = None
        #: Reads sent to the node because of the freshness bound, by cause.
        self.stale_bypassed: dict[str, int] = {"no_watermark": 0, "watermark_behind": 0}
        self._clock = clock
        self._wall_ms = wall_ms
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._last_seq = 0
        self._deadline = 0.0
        #: Highest commit LSN the node said it applied (read-your-writes).
        self.applied_lsn = 0
        self.on_doubt: Callable[[str], None] | None = None
        #: Called with each event after it was applied (observation: logs,
        #: measurements, tests). Keep them cheap: they run on the watcher thread.
        self.listeners: list[Callable[[events_pb2.InvalidationEvent], None]] = []

    # -- liveness --------------------------------------------------------------

    @property
    def live(self) -> bool:
        """Live, and the heartbeat deadline not passed (checked on every read)."""
        if self._stream is None:
            return False
        if self._clock() > self._deadline:
            self.doubt("no message within the heartbeat timeout")
            return False
        return True

    def check_deadline(self) -> bool:
        """Flushes when the heartbeat deadline passed; true when still live."""
        return self.live

    def doubt(self, why: str) -> None:
        """Flush everything and stop serving from RAM until the next ``Ready``."""
        with self._lock:
            was_live = self._stream is not None
            self._stream = None
            self._last_seq = 0
            self.store.set_live(False)
            if not was_live:
                # Not live already: still refuse every ticket taken before now.
                self.store.flush()
        if was_live:
            log.info("near cache flushed: %s", why)
            if self.on_doubt is not None:
                self.on_doubt(why)

    # -- stream messages ---------------------------------------------------------

    def on_ready(
        self, node_id: str, generation: int, commit_lsn: int = 0, staleness_ms: int | None = None
    ) -> None:
        with self._lock:
            self._stream = Stream(node_id, generation)
            self._last_seq = 0
            self._deadline = self._clock() + self.heartbeat_timeout_s
            self._fresh = self._reported(staleness_ms)
            self.applied_lsn = commit_lsn
            self.store.refuse_older_fills()
            self.store.set_live(True)

    def on_events(self, seq: int, events: Iterable[events_pb2.InvalidationEvent]) -> None:
        with self._lock:
            ok = self._stream is not None and seq == self._last_seq + 1
            if ok:
                self._last_seq = seq
                self._deadline = self._clock() + self.heartbeat_timeout_s
        if not ok:
            self.doubt(f"events seq {seq} after {self._last_seq}")
            return
        for event in events:
            self.apply(event)
            self.applied_lsn = max(self.applied_lsn, event.commit_lsn)
            self.store.stats.events_applied += 1
            for listener in self.listeners:
                listener(event)

    def on_heartbeat(
        self, generation: int, seq: int, commit_lsn: int = 0, staleness_ms: int | None = None
    ) -> None:
        with self._lock:
            stream = self._stream
            ok = stream is not None and stream.generation == generation and seq == self._last_seq
            if ok:
                self._deadline = self._clock() + self.heartbeat_timeout_s
                self.applied_lsn = max(self.applied_lsn, commit_lsn)
                self._fresh = self._reported(staleness_ms)
        if not ok:
            self.doubt(f"heartbeat of generation {generation} seq {seq}")

    def _reported(self, staleness_ms: int | None) -> tuple[float, float] | None:
        return None if staleness_ms is None else (staleness_ms / 1000, self._clock())

    def stale_cause(self) -> str | None:
        """Why a live cache may not answer from RAM now: ``no_watermark`` (the node
        reported no staleness on this stream), ``watermark_behind`` (the last report
        plus the time since is past the bound); None when it may, or without a bound."""
        bound = self.max_staleness_s
        if bound is None or self._stream is None:
            return None
        fresh = self._fresh
        if fresh is None:
            return "no_watermark"
        staleness_s, at = fresh
        # A little slack for float rounding of whole milliseconds.
        if staleness_s + (self._clock() - at) > bound + 1e-9:
            return "watermark_behind"
        return None

    def on_end(self, code: str) -> None:
        self.doubt(f"stream ended with {code}")

    def apply(self, event: events_pb2.InvalidationEvent) -> None:
        """Drops what ``event`` names in its scope (rule 3 of the vectors' README)."""
        store = self.store
        if event.all_tenants:
            store.flush()
            return
        scope = event.tenant
        if scope and not _TENANT.match(scope):
            log.warning("event %s with invalid tenant %r: flushing", event.event_id, scope)
            store.flush()
            return
        tags = [TagKey(scope, t) for t in event_tags(event)]
        if event.key_prefixes:
            tags.append(TagKey(scope, SCOPE_TAG))
        store.invalidate(tags)

    # -- fills -------------------------------------------------------------------

    @property
    def stream(self) -> Stream | None:
        """The ``Ready`` of the stream the cache is live on, if any."""
        return self._stream

    def wall_ms(self) -> float:
        return self._wall_ms()

    def begin_fill(self) -> FillTicket:
        return self.store.begin_fill()

    def fill(self, ticket: FillTicket, key: str, tenant: str, answer: Answer) -> bool:
        """Stores ``answer`` (to a request of ``tenant``) under ``key`` if the fill rule
        allows; spends ``ticket``."""
        stream = self._stream
        if (
            not answer.tags
            or stream is None
            or answer.node_id != stream.node_id
            or answer.generation != stream.generation
            or not self.live
        ):
            ticket.release()
            return False
        ttl_s: float | None = None
        if answer.expires_at_ms:
            ttl_s = (answer.expires_at_ms - self._wall_ms()) / 1000
            if ttl_s <= 0:
                ticket.release()
                return False
        scope = "" if answer.global_scope else tenant
        tags = [TagKey(scope, t) for t in answer.tags]
        tags.append(TagKey(scope, SCOPE_TAG))
        return self.store.insert(ticket, key, Entry(answer.value, answer.found), tags, ttl_s)

    def get(self, key: str) -> Entry | None:
        if not self.live:
            self.store.stats.bypassed += 1
            return None
        cause = self.stale_cause()
        if cause is not None:
            self.stale_bypassed[cause] += 1
            return None
        return self.store.get(key)
