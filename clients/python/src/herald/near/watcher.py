"""The watcher: one thread per process that keeps a Watch v2 stream open and
feeds it to the :class:`~herald.near.protocol.NearState`, plus a timer thread
that flushes on heartbeat silence and cancels a stream that went quiet (a
half-open connection sends nothing and never ends).

Reconnects with jittered exponential backoff; after a flush the cache refills
on demand, single-flighted per key by the client, so a reconnect is not a
stampede. Configuration errors (PERMISSION_DENIED, UNAUTHENTICATED,
INVALID_ARGUMENT) are logged and retried at the longest backoff: the cache
keeps bypassing meanwhile.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from herald._rpc import CacheStub, Metadata
from herald.near.protocol import NearState
from herald.process import GATE
from herald.v1 import cache_pb2 as pb

log = logging.getLogger("herald.near")

MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0
_CONFIG_ERRORS = {"PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"}


class Watcher:
    """Runs until :meth:`stop`; restarts its stream when :meth:`restart` is called
    (the watched tenants changed)."""

    def __init__(
        self,
        stub: CacheStub,
        state: NearState,
        metadata: Metadata,
        tenants: Callable[[], Sequence[str]],
    ) -> None:
        self._stub = stub
        self._state = state
        self._metadata = metadata
        self._tenants = tenants
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self.streams_opened = 0
        state.on_doubt = self._on_doubt
        GATE.on_fork(self)
        self._reader = threading.Thread(target=self._run, name="herald-watch", daemon=True)
        self._timer = threading.Thread(target=self._watch_deadline, name="herald-watch-timer", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._cancel()

    def restart(self) -> None:
        """Ends the current stream (flushing) and watches again at once."""
        self._wake.set()
        self._cancel()

    def _cancel(self) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def cancel_for_fork(self) -> None:
        """Leaves gRPC before a fork (the stream is opened again after it)."""
        self._cancel()

    def _on_doubt(self, why: str) -> None:
        # Any doubt ends the stream too: the next one starts with a Ready.
        self._cancel()

    def _watch_deadline(self) -> None:
        period = max(self._state.heartbeat_timeout_s / 4, 0.01)
        while not self._stop.wait(period):
            self._state.check_deadline()

    def _run(self) -> None:
        backoff = MIN_BACKOFF_S
        while not self._stop.is_set():
            tenants = list(self._tenants())
            if not tenants:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            code = self._stream(tenants)
            if self._stop.is_set():
                return
            if code == "READY_SEEN":
                backoff = MIN_BACKOFF_S
            elif code in _CONFIG_ERRORS:
                log.error("herald watch refused (%s): near cache bypassed; check the token and tenants", code)
                backoff = MAX_BACKOFF_S
            else:
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            self._stop.wait(random.uniform(backoff / 2, backoff))

    def _stream(self, tenants: list[str]) -> str:
        """One stream until it ends; its end status, or READY_SEEN when it had been live."""
        with GATE.call():
            return self._read(self._stub.watch.open(pb.WatchRequest(tenants=tenants), self._metadata))

    def _read(self, call: Any) -> str:
        with self._lock:
            self._call = call
        if GATE.forking:
            call.cancel()  # opened just as a fork began: leave gRPC at once
        self.streams_opened += 1
        state, ready_seen, code = self._state, False, "OK"
        try:
            for message in call:
                body = message.WhichOneof("body")
                if body == "events":
                    state.on_events(message.events.seq, message.events.events)
                elif body == "heartbeat":
                    hb = message.heartbeat
                    state.on_heartbeat(hb.generation, hb.seq, hb.position.commit_lsn, _staleness(hb.position))
                elif body == "ready":
                    r = message.ready
                    state.on_ready(r.node_id, r.generation, r.position.commit_lsn, _staleness(r.position))
                    ready_seen = True
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
        except Exception:
            log.exception("herald watch failed")
            code = "INTERNAL"
        finally:
            with self._lock:
                self._call = None
            state.on_end(code)
        return "READY_SEEN" if ready_seen and code not in _CONFIG_ERRORS else code


def _staleness(position: pb.WatchPosition) -> int | None:
    """The node's reported staleness, None when it reported none."""
    return position.staleness_ms if position.HasField("staleness_ms") else None
