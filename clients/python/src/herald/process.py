"""Fork safety: state that belongs to one process.

gunicorn and Odoo fork their workers after the application was imported (and
sometimes used), and a gRPC channel or a thread does not survive ``fork()``.
A :class:`PerProcess` builds its value lazily in the process that first asks
for it and again in every forked child (checked by PID on every access, and
reset by ``os.register_at_fork`` so that a child never even looks at the
parent's value). The parent's objects are never used or closed in the child:
closing a channel whose threads did not survive the fork can block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("herald")

T = TypeVar("T")

_instances: weakref.WeakSet[PerProcess[object]] = weakref.WeakSet()
#: The parents' values, kept referenced so that no destructor of theirs runs in a child.
_abandoned: list[object] = []


class PerProcess(Generic[T]):
    """A value built once per process by ``factory``."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._pid = -1
        self._value: T | None = None
        _instances.add(self)  # type: ignore[arg-type]

    def get(self) -> T:
        value = self._value
        if value is not None and self._pid == os.getpid():
            return value
        with self._lock:
            if self._value is None or self._pid != os.getpid():
                self._forget()
                self._value = self._factory()
                self._pid = os.getpid()
            return self._value

    def peek(self) -> T | None:
        """The value if this process built one (never builds)."""
        return self._value if self._pid == os.getpid() else None

    def _forget(self) -> None:
        if self._value is not None and self._pid != os.getpid():
            _abandoned.append(self._value)
        self._value = None

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by a thread that does not exist here.
        self._lock = threading.Lock()
        self._forget()


class ForkCancellable(Protocol):
    """Something holding a stream open, which it ends when asked (without blocking)."""

    def cancel_for_fork(self) -> None: ...


class ForkGate:
    """Keeps gRPC calls out of the way of ``fork()``.

    gRPC's own fork handlers only run when no thread is inside gRPC at that
    moment ("Other threads are currently calling into gRPC, skipping fork()
    handlers"); otherwise the child inherits gRPC's state half-way and can
    abort when it makes its own channel. So every call of this client runs
    inside :meth:`call`, and just before a fork the gate closes: streams are
    cancelled (their threads leave gRPC), calls in flight finish (each is
    bounded by its timeout), new ones wait until the fork is done.
    """

    #: Longest wait for calls in flight before forking anyway.
    MAX_WAIT_S = 10.0

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._forking = False
        self._cancellers: weakref.WeakValueDictionary[int, ForkCancellable] = weakref.WeakValueDictionary()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @property
    def forking(self) -> bool:
        return self._forking

    def on_fork(self, canceller: ForkCancellable) -> None:
        """``canceller.cancel()`` is called before each fork (it must not block)."""
        self._cancellers[id(canceller)] = canceller

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            for canceller in list(self._cancellers.values()):
                canceller.cancel_for_fork()
            if not self._cond.wait_for(lambda: self._active == 0, timeout=self.MAX_WAIT_S):
                log.warning("forking with %d herald calls in flight", self._active)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()


GATE = ForkGate()


def _reset_all_in_child() -> None:
    GATE._reset()
    for instance in list(_instances):
        instance._after_fork_in_child()


os.register_at_fork(
    before=GATE.before_fork, after_in_parent=GATE.after_fork_in_parent, after_in_child=_reset_all_in_child
)
