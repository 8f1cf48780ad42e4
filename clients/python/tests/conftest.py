"""Shared fixtures: one real Herald stack (Postgres database, Redis namespace,
capture, broadcast, cache-api processes) for the whole session, started only
when a test asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import Stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    s = Stack.start()
    try:
        yield s
    finally:
        s.stop()
