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

import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

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


def _reset_all_in_child() -> None:
    for instance in list(_instances):
        instance._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_all_in_child)
