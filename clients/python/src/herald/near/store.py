"""The near cache's memory: entries with a tag index, fill tickets, a byte
bound, a maximum TTL and liveness — the same rules as Herald's Rust L1
(``crates/herald-core/src/l1/mod.rs``), checked by the shared vectors in
``clients/vectors/near-cache.json``.

How a reader uses it::

    entry = store.get(key)                 # a hit only while live
    with store.begin_fill() as ticket:     # before sending the request
        answer = call_herald()
        store.insert(ticket, key, answer.value, answer.tags, ttl)   # refused if raced

Guarantees:

* **Version-gated fills.** :meth:`NearStore.insert` refuses a value when any
  of its tags was invalidated, or the store flushed, after the ticket was
  taken: an answer that raced with an invalidation is never stored.
* **Live only.** Nothing is served or stored while not live; going down
  flushes everything and starts a new generation.
* **Bounded.** By bytes (least recently used go first) and by age.

Thread-safe: one lock guards everything; a hit holds it for a dict lookup.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from herald.near.tags import TagKey, indexed_tags

#: Bookkeeping bytes charged per entry on top of its key, value and tags.
ENTRY_OVERHEAD = 96
#: Prune the recent-invalidation map once it holds this many tags.
RECENT_PRUNE_AT = 4096
#: Past this many remembered tags or prefixes, every fill in flight is
#: refused and the memory dropped (as the Rust L1 does).
RECENT_MAX = 4 * RECENT_PRUNE_AT


@dataclass(frozen=True, slots=True)
class Entry:
    """What a hit returns: the value as Herald answered it, and whether it was found."""

    value: bytes
    found: bool = True


@dataclass(slots=True)
class _Held:
    entry: Entry
    tags: tuple[TagKey, ...]
    id: int
    expires_at: float
    weight: int


class FillTicket:
    """Taken before a request; spent by :meth:`NearStore.insert` or on leaving its ``with`` block."""

    __slots__ = ("_spent", "_store", "seq")

    def __init__(self, store: NearStore, seq: int) -> None:
        self.seq = seq
        self._store = store
        self._spent = False

    def release(self) -> None:
        """Ends the fill without storing (idempotent)."""
        if not self._spent:
            self._spent = True
            self._store._end_fill(self.seq)

    def __enter__(self) -> FillTicket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A ticket dropped without release must not pin the memory of recent
        # invalidations forever.
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.release()


@dataclass
class StoreStats:
    """Counters compatible with the Rust L1's ``herald_l1_*``."""

    hits: int = 0
    misses: int = 0
    bypassed: int = 0
    inserts: int = 0
    rejected_stale_fills: int = 0
    invalidated_entries: int = 0
    events_applied: int = 0
    flushes: int = 0


class NearStore:
    """A bounded in-process cache kept coherent by a watcher (see the module docs)."""

    def __init__(self, max_bytes: int, max_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or max_ttl_s <= 0:
            raise ValueError("max_bytes and max_ttl_s must be positive")
        self.max_bytes = max_bytes
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        # Reentrant: a ticket dropped unreleased is released by its __del__,
        # which the garbage collector may run while this thread holds the lock.
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Held] = OrderedDict()
        self._by_tag: dict[TagKey, dict[str, int]] = {}
        self._recent: dict[TagKey, int] = {}
        self._recent_prefixes: list[tuple[str, int]] = []
        self._in_flight: dict[int, int] = {}
        self._seq = 0
        self._flushed_at = 0
        self._next_id = 1
        self._bytes = 0
        self._live = False
        self.generation = 0
        self.stats = StoreStats()

    # -- reads ---------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry under ``key`` if held, unexpired and the store is live."""
        stats = self.stats
        if not self._live:
            stats.bypassed += 1
            return None
        with self._lock:
            held = self._entries.get(key)
            if held is not None and held.expires_at > self._clock():
                self._entries.move_to_end(key)
                stats.hits += 1
                return held.entry
            if held is not None:
                self._remove(key, held)
        stats.misses += 1
        return None

    @property
    def live(self) -> bool:
        return self._live

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    # -- fills ---------------------------------------------------------------

    def begin_fill(self) -> FillTicket:
        """Starts a fill. Take it before sending the request whose answer you will store."""
        with self._lock:
            seq = self._seq
            self._in_flight[seq] = self._in_flight.get(seq, 0) + 1
        return FillTicket(self, seq)

    def ticket_at(self, seq: int) -> FillTicket:
        """Another ticket as old as one still held (a batch request stores several answers)."""
        with self._lock:
            if self._in_flight.get(seq, 0) <= 0:
                raise ValueError("ticket_at needs a ticket of that age still held")
            self._in_flight[seq] += 1
        return FillTicket(self, seq)

    def _end_fill(self, seq: int) -> None:
        with self._lock:
            n = self._in_flight.get(seq, 0) - 1
            if n > 0:
                self._in_flight[seq] = n
            else:
                self._in_flight.pop(seq, None)
            if not self._in_flight:
                self._recent.clear()
                self._recent_prefixes.clear()
            elif len(self._recent) > RECENT_PRUNE_AT:
                oldest = min(self._in_flight)
                self._recent = {t: s for t, s in self._recent.items() if s > oldest}
                self._recent_prefixes = [(p, s) for p, s in self._recent_prefixes if s > oldest]

    def insert(
        self,
        ticket: FillTicket,
        key: str,
        entry: Entry,
        tags: Sequence[TagKey],
        ttl_s: float | None,
    ) -> bool:
        """Stores ``entry`` under ``key`` with ``tags`` for at most ``ttl_s`` (never past
        the store's max TTL) and spends ``ticket``. False, storing nothing, when not live
        or when a tag was invalidated (or the store flushed) since the ticket was taken."""
        ttl = self.max_ttl_s if ttl_s is None else min(ttl_s, self.max_ttl_s)
        all_tags = tuple(indexed_tags(tags))
        weight = len(key) + len(entry.value) + sum(len(t.tag) + 16 for t in all_tags) + ENTRY_OVERHEAD
        try:
            with self._lock:
                seq = ticket.seq
                stale = (
                    seq < self._flushed_at
                    or any(self._recent.get(t, -1) > seq for t in all_tags)
                    or any(s > seq and key.startswith(p) for p, s in self._recent_prefixes)
                )
                if stale:
                    self.stats.rejected_stale_fills += 1
                if stale or not self._live or ttl <= 0 or weight > self.max_bytes:
                    return False
                old = self._entries.get(key)
                if old is not None:
                    self._remove(key, old)
                entry_id = self._next_id
                self._next_id += 1
                for tag in all_tags:
                    self._by_tag.setdefault(tag, {})[key] = entry_id
                self._entries[key] = _Held(entry, all_tags, entry_id, self._clock() + ttl, weight)
                self._bytes += weight
                self.stats.inserts += 1
                while self._bytes > self.max_bytes:
                    victim, held = next(iter(self._entries.items()))
                    self._remove(victim, held)
                return True
        finally:
            ticket.release()

    # -- invalidation ---------------------------------------------------------

    def invalidate(self, tags: Iterable[TagKey]) -> int:
        """Drops every entry holding any of ``tags``; returns how many."""
        dropped = 0
        with self._lock:
            self._seq += 1
            seq = self._seq
            remember = bool(self._in_flight)
            for tag in tags:
                if remember:
                    self._recent[tag] = seq
                holders = self._by_tag.pop(tag, None)
                if not holders:
                    continue
                for key, entry_id in holders.items():
                    held = self._entries.get(key)
                    if held is not None and held.id == entry_id:
                        self._remove(key, held)
                        dropped += 1
            self._bound_recent(seq)
        self.stats.invalidated_entries += dropped
        return dropped

    def invalidate_prefix(self, prefix: str) -> int:
        """Drops every entry whose key starts with ``prefix``; walks the whole store."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self._in_flight:
                self._recent_prefixes.append((prefix, seq))
            doomed = [(k, h) for k, h in self._entries.items() if k.startswith(prefix)]
            for key, held in doomed:
                self._remove(key, held)
            self._bound_recent(seq)
        self.stats.invalidated_entries += len(doomed)
        return len(doomed)

    def discard(self, key: str) -> bool:
        """Drops ``key`` (a write of this process) and refuses fills of it in flight."""
        with self._lock:
            self._seq += 1
            if self._in_flight:
                self._recent_prefixes.append((key, self._seq))
            held = self._entries.get(key)
            if held is not None:
                self._remove(key, held)
            self._bound_recent(self._seq)
        return held is not None

    def flush(self) -> None:
        """Drops everything, refuses every fill that started before, starts a new generation."""
        with self._lock:
            self._seq += 1
            self._flushed_at = self._seq
            self._entries.clear()
            self._by_tag.clear()
            self._bytes = 0
            self.generation += 1
        self.stats.flushes += 1

    def refuse_older_fills(self) -> None:
        """Refuses every fill whose ticket was taken before now (a new stream's
        ``Ready``: what happened before it was never seen)."""
        with self._lock:
            self._seq += 1
            self._flushed_at = self._seq

    def set_live(self, live: bool) -> None:
        """Marks the store live or not; going down flushes everything."""
        was = self._live
        self._live = live
        if was and not live:
            self.flush()

    # -- internals -------------------------------------------------------------

    def _remove(self, key: str, held: _Held) -> None:
        """Removes ``key`` and its index memberships. Holds the lock."""
        del self._entries[key]
        self._bytes -= held.weight
        for tag in held.tags:
            keys = self._by_tag.get(tag)
            if keys is not None and keys.get(key) == held.id:
                del keys[key]
                if not keys:
                    del self._by_tag[tag]

    def _bound_recent(self, seq: int) -> None:
        if len(self._recent) > RECENT_MAX or len(self._recent_prefixes) > RECENT_MAX:
            self._recent.clear()
            self._recent_prefixes.clear()
            self._flushed_at = seq
