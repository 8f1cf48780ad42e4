"""Optional Prometheus metrics (``pip install herald-client[metrics]``), named as
every Herald L1 holder's: ``herald_l1_hits_total``, ``_misses``, ``_bypassed``,
``_rejected_stale_fills``, ``_flushes``, ``_live``, ``_entries``, ``_bytes``, plus the
client's own ``herald_client_errors_total{code}`` and request latency.

``Metrics(registry)`` with a ``prometheus_client`` registry (or
``Metrics.default()`` for the global one) registers them; ``Metrics(None)``
counts nothing. The near cache's own counters are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from herald.near.protocol import NearState


class Metrics:
    def __init__(self, registry: Any) -> None:
        self._states: list[NearState] = []
        self._enabled = registry is not None
        if not self._enabled:
            return
        from prometheus_client import Counter, Histogram

        self._errors = Counter(
            "herald_client_errors", "calls to Herald that failed, by gRPC status", ["code"], registry=registry
        )
        self._latency = Histogram(
            "herald_client_request_seconds",
            "calls to Herald (near-cache misses and bypasses)",
            registry=registry,
        )
        self._fills = Counter(
            "herald_client_fills",
            "near-cache fills by outcome (stored, refused)",
            ["outcome"],
            registry=registry,
        )
        registry.register(_Collector(self._states))

    @classmethod
    def default(cls) -> Metrics:
        from prometheus_client import REGISTRY

        return cls(REGISTRY)

    def attach(self, state: NearState) -> None:
        # One per process (the parent's is dropped in a forked child).
        self._states[:] = [state]

    def filled(self, stored: bool) -> None:
        if self._enabled:
            self._fills.labels("stored" if stored else "refused").inc()

    def error(self, code: str) -> None:
        if self._enabled:
            self._errors.labels(code).inc()

    def request_seconds(self, seconds: float) -> None:
        if self._enabled:
            self._latency.observe(seconds)


class _Collector:
    """The near cache's counters, read at scrape time (nothing on the hit path)."""

    def __init__(self, states: list[NearState]) -> None:
        self._states = states

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if not self._states:
            return
        state = self._states[0]
        s = state.store.stats
        for name, doc, value in [
            ("hits", "near-cache lookups answered from RAM", s.hits),
            ("misses", "near-cache lookups not found while live", s.misses),
            ("bypassed", "near-cache lookups skipped because it was not live", s.bypassed),
            ("inserts", "values stored in the near cache", s.inserts),
            (
                "rejected_stale_fills",
                "fills refused because a tag was invalidated during the fill",
                s.rejected_stale_fills,
            ),
            ("invalidated_entries", "entries dropped by invalidations", s.invalidated_entries),
            ("flushes", "full flushes (stream ended, gap, generation change, heartbeat silence)", s.flushes),
        ]:
            yield CounterMetricFamily(f"herald_l1_{name}", doc, value=value)
        stale = CounterMetricFamily(
            "herald_near_bypassed",
            "near-cache reads sent to Herald: the cache could not vouch for max_staleness_ms, by cause",
            labels=["cause"],
        )
        for cause, n in state.stale_bypassed.items():
            stale.add_metric([cause], n)
        yield stale
        yield GaugeMetricFamily(
            "herald_l1_live", "1 while the Watch stream is up and heartbeats arrive", value=int(state.live)
        )
        yield GaugeMetricFamily("herald_l1_entries", "entries held", value=len(state.store))
        yield GaugeMetricFamily(
            "herald_l1_bytes", "bytes held (keys, values, tags, overhead)", value=state.store.bytes_held
        )
