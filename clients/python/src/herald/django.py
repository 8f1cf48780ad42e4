"""``HeraldCache``: Django's cache framework over Herald, with the near cache.

::

    CACHES = {
        "default": {
            "BACKEND": "herald.django.HeraldCache",
            "LOCATION": "herald-cache-api:50051",
            "TIMEOUT": 300,
            "KEY_PREFIX": "shop",
            "OPTIONS": {
                "TOKEN": os.environ["HERALD_CACHE_TOKEN"],   # or "TOKEN_ENV": "HERALD_CACHE_TOKEN"
                "TENANT": "acme",                            # or "TENANT_FUNCTION": "myapp.tenancy.current"
                "IGNORE_EXCEPTIONS": True,                   # Herald down → misses, not errors
                "NEAR_CACHE": {"MAX_BYTES": 64 << 20, "MAX_TTL": 300, "TENANTS": None},
            },
        }
    }

Django's contract, and how Herald keeps it:

* ``add`` and ``incr``/``decr`` are atomic across every process and node
  (cache-api's ``Add`` and ``Incr``); integers are stored as decimal text so
  ``incr`` can add to them, everything else is pickled (``SERIALIZER``).
* ``timeout``: the default (``TIMEOUT``), ``None`` (the longest Herald allows:
  ``OPTIONS["MAX_TTL"]``, default 86400 s = cache.max_key_ttl_ms's default),
  ``0`` or negative (expire at once: the key is deleted).
* ``KEY_PREFIX``, ``VERSION``, ``KEY_FUNCTION`` as Django builds keys; keys
  Django allows but Herald refuses (spaces, control characters, braces,
  over 512 bytes) are encoded, so every Django key works.
* ``clear()`` drops this backend's keys of the current tenant (its
  namespace, ``OPTIONS["NAMESPACE"]``, default ``django``), never resources.
* ``touch`` rewrites the value with the new timeout (a read and a write: a
  concurrent ``set`` between them can be overwritten).
* ``close()``, which Django calls after every request, leaves the
  connection and the near cache's watcher running; one process-wide client
  serves every thread's backend instance (Django builds one per thread).
* the ``a*`` methods are Django's defaults (the sync methods in a thread).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pickle
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.utils.module_loading import import_string

from herald.client import Client, NearConfig
from herald.errors import HeraldUnavailable, InvalidArgument

log = logging.getLogger("herald.django")

#: Longest key part Herald accepts.
MAX_KEY_BYTES = 512
_PLAIN = re.compile(r"[^\s{}\x00-\x1f\x7f~][^\s{}\x00-\x1f\x7f]*\Z")
_INT = re.compile(rb"-?[0-9]+\Z")

_clients: dict[tuple[Any, ...], Client] = {}
_clients_lock = threading.Lock()


class HeraldSerializer:
    """Integers as decimal text (so ``incr`` works on them), anything else pickled."""

    def dumps(self, value: Any) -> bytes:
        if type(value) is int:
            return str(value).encode()
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        if _INT.match(data):
            return int(data)
        return pickle.loads(data)


def herald_key(namespace: str, django_key: str) -> str:
    """The Herald key of a Django key: as is when Herald accepts it, else encoded."""
    body = django_key
    if not _PLAIN.match(body):
        body = "~b" + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
    key = f"{namespace}:{body}"
    if len(key.encode()) > MAX_KEY_BYTES:
        key = f"{namespace}:~h" + hashlib.sha256(django_key.encode()).hexdigest()
    return key


def _shared_client(location: str, token: str, near: NearConfig | None, timeout_s: float) -> Client:
    """One client per process and configuration, whichever thread's backend asks."""
    key = (location, token, near, timeout_s)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(location, token, near=near, timeout_s=timeout_s)
        return client


class HeraldCache(BaseCache):  # type: ignore[misc]  # Django ships no types
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        opts: dict[str, Any] = dict(params.get("OPTIONS") or {})
        token = opts.get("TOKEN") or os.environ.get(opts.get("TOKEN_ENV", "HERALD_CACHE_TOKEN"), "")
        if not token:
            raise InvalidArgument("HeraldCache needs OPTIONS['TOKEN'] or a token in OPTIONS['TOKEN_ENV']")
        tenant_fn = opts.get("TENANT_FUNCTION")
        if isinstance(tenant_fn, str):
            tenant_fn = import_string(tenant_fn)
        if tenant_fn is None and not opts.get("TENANT"):
            raise InvalidArgument("HeraldCache needs OPTIONS['TENANT'] or OPTIONS['TENANT_FUNCTION']")
        self._tenant: str | None = opts.get("TENANT")
        self._tenant_fn: Callable[[], str] | None = tenant_fn
        serializer = opts.get("SERIALIZER", HeraldSerializer)
        if isinstance(serializer, str):
            serializer = import_string(serializer)
        self._serializer = serializer() if isinstance(serializer, type) else serializer
        self._ignore = bool(opts.get("IGNORE_EXCEPTIONS", False))
        self._namespace = str(opts.get("NAMESPACE", "django"))
        self._max_ttl = float(opts.get("MAX_TTL", 86400))
        near_opts = opts.get("NEAR_CACHE", {})
        near = None
        if near_opts is not False:
            tenants = near_opts.get("TENANTS")
            if tenants is None and self._tenant and tenant_fn is None:
                tenants = [self._tenant]
            near = NearConfig(
                tenants=tuple(tenants) if tenants is not None else None,
                max_bytes=int(near_opts.get("MAX_BYTES", 64 << 20)),
                max_ttl_s=float(near_opts.get("MAX_TTL", 300)),
                heartbeat_timeout_s=float(near_opts.get("HEARTBEAT_TIMEOUT", 1.5)),
            )
        self._client = _shared_client(server, token, near, float(opts.get("SOCKET_TIMEOUT", 2.0)))

    @property
    def client(self) -> Client:
        return self._client

    # -- keys, tenants, timeouts -------------------------------------------------

    def tenant(self) -> str:
        return self._tenant_fn() if self._tenant_fn is not None else str(self._tenant)

    def validate_key(self, key: str) -> None:
        """Every key Django can build works here (encoded when needed): no memcached warnings."""

    def _key(self, key: str, version: int | None) -> str:
        return herald_key(self._namespace, self.make_and_validate_key(key, version=version))

    def _ttl(self, timeout: Any) -> float | None:
        """Seconds to keep the value, or None: expire at once."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return self._max_ttl
        if timeout <= 0:
            return None
        return min(float(timeout), self._max_ttl)

    def _guard(self, default: Any, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except HeraldUnavailable:
            if not self._ignore:
                raise
            log.warning("herald unavailable, cache call ignored", exc_info=True)
            return default

    # -- the backend API -----------------------------------------------------------

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        hkey = self._key(key, version)

        def read() -> Any:
            raw = self._client.get_key(hkey, tenant=self.tenant())
            return default if raw is None else self._serializer.loads(raw)

        return self._guard(default, read)

    def set(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        hkey, ttl = self._key(key, version), self._ttl(timeout)
        if ttl is None:
            self._guard(None, lambda: self._client.delete(hkey, tenant=self.tenant()))
            return
        data = self._serializer.dumps(value)
        self._guard(None, lambda: self._client.set(hkey, data, tenant=self.tenant(), ttl_s=ttl))

    def add(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        hkey, ttl = self._key(key, version), self._ttl(timeout)
        tenant = self.tenant()
        if ttl is None:
            # Stored and expired at once: added only if nothing was there.
            return bool(self._guard(False, lambda: self._client.get_key(hkey, tenant=tenant) is None))
        data = self._serializer.dumps(value)
        return bool(self._guard(False, lambda: self._client.add(hkey, data, tenant=tenant, ttl_s=ttl)))

    def touch(self, key: str, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        hkey, ttl = self._key(key, version), self._ttl(timeout)
        tenant = self.tenant()

        def touch() -> bool:
            raw = self._client.get_key(hkey, tenant=tenant)
            if raw is None:
                return False
            if ttl is None:
                self._client.delete(hkey, tenant=tenant)
            else:
                self._client.set(hkey, raw, tenant=tenant, ttl_s=ttl)
            return True

        return bool(self._guard(False, touch))

    def delete(self, key: str, version: int | None = None) -> bool:
        hkey = self._key(key, version)
        return bool(self._guard(False, lambda: self._client.delete(hkey, tenant=self.tenant()) > 0))

    def has_key(self, key: str, version: int | None = None) -> bool:
        hkey = self._key(key, version)
        return bool(self._guard(False, lambda: self._client.get_key(hkey, tenant=self.tenant()) is not None))

    def incr(self, key: str, delta: int = 1, version: int | None = None) -> int:
        hkey = self._key(key, version)
        try:
            value = self._client.incr(hkey, delta, tenant=self.tenant())
        except InvalidArgument as e:
            raise ValueError(f"key {key!r} does not hold an integer: {e}") from None
        if value is None:
            raise ValueError(f"Key '{key}' not found")
        return value

    def decr(self, key: str, delta: int = 1, version: int | None = None) -> int:
        return self.incr(key, -delta, version)

    def get_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        by_herald = {self._key(k, version): k for k in keys}
        if not by_herald:
            return {}
        tenant = self.tenant()

        def read() -> dict[str, Any]:
            items = [{"key": h} for h in by_herald]
            found: dict[str, Any] = {}
            for hkey, result in zip(by_herald, self._client.get_many(items, tenant=tenant), strict=True):
                if isinstance(result, Exception):
                    raise result
                if result.found:
                    found[by_herald[hkey]] = self._serializer.loads(result.value)
            return found

        return dict(self._guard({}, read))

    def set_many(
        self, data: dict[str, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[str]:
        failed = []
        for key, value in data.items():
            try:
                self.set(key, value, timeout, version)
            except HeraldUnavailable:
                failed.append(key)
        return failed

    def delete_many(self, keys: Iterable[str], version: int | None = None) -> None:
        for key in keys:
            self.delete(key, version)

    def clear(self) -> None:
        tenant = self.tenant()
        self._guard(
            None, lambda: self._client.invalidate_prefix(tenant=tenant, key_prefix=f"{self._namespace}:")
        )

    def close(self, **kwargs: Any) -> None:
        """Django calls this after every request: the shared client and its watcher stay."""
