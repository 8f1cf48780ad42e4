"""Conformance of ``herald.django.HeraldCache`` with Django's cache contract,
against a real cache-api (pytest-django): the operations Django documents,
timeouts, KEY_PREFIX and VERSION, atomic add/incr under concurrency, keys
Herald would refuse, tenants, IGNORE_EXCEPTIONS, the async API, close(), and
one process-wide client behind the per-thread backends."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.core.cache import caches
from django.test import override_settings

from herald import Client, HeraldUnavailable, NearConfig
from herald.django import HeraldCache, HeraldSerializer, herald_key
from tests.stack import ACME_TOKEN, BACKEND_TOKEN, Stack, free_port

current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="acme")


def tenant_of_request() -> str:
    return current_tenant.get()


def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def backend(location: str, token: str = ACME_TOKEN, **options: Any) -> dict[str, Any]:
    return {
        "BACKEND": "herald.django.HeraldCache",
        "LOCATION": location,
        "TIMEOUT": 60,
        "OPTIONS": {"TOKEN": token, "TENANT": "acme", **options},
    }


@pytest.fixture
def cache(stack: Stack) -> Iterator[HeraldCache]:
    settings = {
        "default": {**backend(stack.target), "KEY_PREFIX": "t" + str(time.monotonic_ns())},
        "prefixed": {**backend(stack.target), "KEY_PREFIX": "other", "VERSION": 2},
        "tenants": backend(stack.target, BACKEND_TOKEN, TENANT=None, TENANT_FUNCTION=tenant_of_request),
        "down": backend(f"127.0.0.1:{free_port()}", IGNORE_EXCEPTIONS=True, SOCKET_TIMEOUT=0.5),
        "down_strict": backend(f"127.0.0.1:{free_port()}", SOCKET_TIMEOUT=0.5),
    }
    with override_settings(CACHES=settings):
        c = caches["default"]
        assert isinstance(c, HeraldCache)
        yield c


def test_get_set_and_defaults(cache: HeraldCache) -> None:
    assert cache.get("missing") is None
    assert cache.get("missing", "dflt") == "dflt"
    cache.set("k", "v")
    assert cache.get("k") == "v"
    cache.set("none", None)
    assert cache.get("none", "dflt") is None, "a cached None is a hit"
    for value in [{"a": [1, 2]}, [1, "x"], 1.5, b"\x00raw", True, False, "123", 2**70, -5, 0]:
        cache.set("typed", value)
        got = cache.get("typed")
        assert got == value and type(got) is type(value), value


def test_add_only_when_absent_and_get_or_set(cache: HeraldCache) -> None:
    assert cache.add("a", 1) is True
    assert cache.add("a", 2) is False
    assert cache.get("a") == 1
    assert cache.get_or_set("gos", "first") == "first"
    assert cache.get_or_set("gos", "second") == "first"
    assert cache.get_or_set("gos_callable", lambda: "computed") == "computed"


def test_racing_adds_have_one_winner(cache: HeraldCache) -> None:
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: cache.add("lock", i), range(16)))
    assert wins.count(True) == 1
    assert cache.get("lock") == wins.index(True)


def test_incr_decr_are_atomic_and_refuse_missing_keys(cache: HeraldCache) -> None:
    with pytest.raises(ValueError):
        cache.incr("nope")
    with pytest.raises(ValueError):
        cache.decr("nope")
    cache.set("n", 10)
    assert cache.incr("n") == 11
    assert cache.incr("n", 10) == 21
    assert cache.decr("n", 30) == -9
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: cache.incr("n"), range(40)))
    assert cache.get("n") == 31
    cache.set("s", "text")
    with pytest.raises(ValueError):
        cache.incr("s")


def test_many_delete_and_has_key(cache: HeraldCache) -> None:
    assert cache.set_many({"m1": 1, "m2": "two", "m3": [3]}) == []
    assert cache.get_many(["m1", "m2", "m3", "absent"]) == {"m1": 1, "m2": "two", "m3": [3]}
    assert cache.has_key("m1") and not cache.has_key("absent")
    assert cache.delete("m1") is True
    assert cache.delete("m1") is False
    cache.delete_many(["m2", "m3"])
    assert cache.get_many(["m1", "m2", "m3"]) == {}


def test_timeouts_default_none_zero_and_negative(cache: HeraldCache) -> None:
    cache.set("forever", 1, timeout=None)
    assert cache.get("forever") == 1
    cache.set("zero", 1, timeout=0)
    assert cache.get("zero") is None
    cache.set("gone", 1)
    cache.set("gone", 2, timeout=-1)
    assert cache.get("gone") is None, "a negative timeout expires the key at once"
    assert cache.add("zero_add", 1, timeout=0) is True
    assert cache.get("zero_add") is None
    cache.set("short", 1, timeout=1)
    eventually(lambda: cache.get("short") is None, "a 1 s timeout expired")


def test_touch(cache: HeraldCache) -> None:
    assert cache.touch("absent") is False
    cache.set("t", "v", timeout=1)
    assert cache.touch("t", timeout=None) is True
    time.sleep(1.2)  # past the first timeout: the value must still be there
    assert cache.get("t") == "v"
    assert cache.touch("t", timeout=0) is True
    assert cache.get("t") is None


def test_key_prefix_and_versions_keep_keys_apart(cache: HeraldCache) -> None:
    other = caches["prefixed"]
    cache.set("shared", "default")
    other.set("shared", "prefixed")
    assert (cache.get("shared"), other.get("shared")) == ("default", "prefixed")
    cache.set("v", "one", version=1)
    cache.set("v", "two", version=2)
    assert (cache.get("v", version=1), cache.get("v", version=2)) == ("one", "two")
    assert cache.incr_version("v", version=2) == 3
    assert cache.get("v", version=3) == "two" and cache.get("v", version=2) is None


def test_keys_herald_would_refuse_are_encoded_and_stay_distinct(cache: HeraldCache) -> None:
    keys = ["with space", "tab\tkey", "{braces}", "ünïcode ✓", "x" * 600, "x" * 601, "~b", "~tilde", ""]
    for i, key in enumerate(keys):
        cache.set(key, i)
    assert [cache.get(k) for k in keys] == list(range(len(keys)))
    assert herald_key("django", "plain:1:key") == "django:plain:1:key"
    assert len({herald_key("django", k) for k in keys}) == len(keys)


def test_clear_drops_this_backends_keys_only(cache: HeraldCache, stack: Stack) -> None:
    client = Client(stack.target, ACME_TOKEN, near=None)
    try:
        client.set("not-django", b"kept", tenant="acme")
        cache.set("c1", 1)
        cache.clear()
        assert cache.get("c1") is None
        assert client.get_key("not-django", tenant="acme") == b"kept"
    finally:
        client.close()


def test_tenant_function_isolates_tenants(cache: HeraldCache) -> None:
    tenants = caches["tenants"]
    current_tenant.set("acme")
    tenants.set("who", "acme's")
    current_tenant.set("globex")
    assert tenants.get("who") is None
    tenants.set("who", "globex's")
    current_tenant.set("acme")
    assert tenants.get("who") == "acme's"


def test_ignore_exceptions_turns_an_outage_into_misses(cache: HeraldCache) -> None:
    down = caches["down"]
    assert down.get("k", "dflt") == "dflt"
    down.set("k", 1)
    assert down.add("k", 1) is False
    with pytest.raises(HeraldUnavailable):
        caches["down_strict"].get("k")


def test_async_methods(cache: HeraldCache) -> None:
    async def run() -> tuple[Any, ...]:
        await cache.aset("ak", "av")
        added = await cache.aadd("ak", "other")
        got = await cache.aget("ak")
        await cache.aset("an", 1)
        n = await cache.aincr("an", 2)
        deleted = await cache.adelete("ak")
        return added, got, n, deleted

    assert asyncio.run(run()) == (False, "av", 3, True)


def test_close_keeps_the_near_cache_and_threads_share_one_client(cache: HeraldCache, stack: Stack) -> None:
    assert cache.client.wait_live(), "the near cache never became live"
    cache.set("near", "v1")
    near = cache.client.near
    assert near is not None

    def served_from_ram() -> bool:
        hits = near.store.stats.hits
        return bool(cache.get("near") == "v1" and near.store.stats.hits == hits + 1)

    # The set's own invalidation may refuse the first fill after it.
    eventually(served_from_ram, "the value is served from RAM")
    hits = near.store.stats.hits
    cache.close()
    assert cache.client.live()
    assert cache.get("near") == "v1" and near.store.stats.hits == hits + 1

    other_thread: list[HeraldCache] = []
    t = threading.Thread(target=lambda: other_thread.append(caches["default"]))
    t.start()
    t.join()
    assert other_thread[0] is not cache and other_thread[0].client is cache.client

    # A write through another client (another app server) reaches this
    # process's near cache.
    writer = Client(stack.target, ACME_TOKEN, near=NearConfig(tenants=["acme"]))
    try:
        writer.set(
            herald_key("django", cache.make_key("near")), HeraldSerializer().dumps("v2"), tenant="acme"
        )
    finally:
        writer.close()
    eventually(lambda: cache.get("near") == "v2", "the other client's set dropped the near copy")
