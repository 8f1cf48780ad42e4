"""``@cached``: a function's answers from Herald or from the near cache.

* ``@cached(client, resource="user_by_slug")`` — the call's arguments are the
  resource's parameters; the answer comes from the near cache or Herald. The
  function body runs only when Herald is unavailable (``fallback=True``, the
  default): it should read the same data itself (the ORM, plain SQL).
* ``@cached(client, tags=lambda slug: [f"res_users.website_slug={slug}"])`` —
  the function's own result is kept in this process's near cache under those
  tags (row tags of watched tables, or app tags you invalidate), dropped when
  Herald sees a change to them. It is stored only under the fill rule: a
  ticket is taken before the function runs, so a change that lands while it
  runs refuses the result. Not live → the function just runs.

The tenant is ``tenant="acme"`` or ``tenant=callable`` (called with the same
arguments, e.g. the current request's tenant).
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from herald.client import Client
from herald.errors import HeraldUnavailable
from herald.near.protocol import Answer

P = ParamSpec("P")
R = TypeVar("R")

Tenant = str | Callable[..., str]


def cached(
    client: Client,
    *,
    tenant: Tenant,
    resource: str | None = None,
    tags: Callable[..., Iterable[str]] | None = None,
    ttl_s: float | None = None,
    fallback: bool = True,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    if (resource is None) == (tags is None):
        raise ValueError("give exactly one of resource= and tags=")

    def tenant_of(*args: Any, **kwargs: Any) -> str:
        return tenant(*args, **kwargs) if callable(tenant) else tenant

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if resource is not None:

            @functools.wraps(fn)
            def by_resource(*args: P.args, **kwargs: P.kwargs) -> R:
                params = [*args, *kwargs.values()]
                try:
                    value: R = client.get_resource(resource, params, tenant=tenant_of(*args, **kwargs))
                    return value
                except HeraldUnavailable:
                    if not fallback:
                        raise
                    return fn(*args, **kwargs)

            return by_resource

        assert tags is not None
        name = f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def by_tags(*args: P.args, **kwargs: P.kwargs) -> R:
            return local_memo(
                client,
                tenant_of(*args, **kwargs),
                name,
                args,
                kwargs,
                lambda: fn(*args, **kwargs),
                tags(*args, **kwargs),
                ttl_s,
            )

        return by_tags

    return decorate


def local_memo(
    client: Client,
    tenant: str,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    compute: Callable[[], R],
    tags: Iterable[str],
    ttl_s: float | None,
) -> R:
    """``compute()``'s result, kept in this process's near cache under ``tags`` (fill rule)."""
    near = client._near_for(client._rt(), tenant)
    if near is None or not near.live:
        return compute()
    key = f"{tenant}\x1fm\x1f{name}\x1f{args!r}\x1f{sorted(kwargs.items())!r}"
    entry = near.get(key)
    if entry is not None:
        hit: R = pickle.loads(entry.value)
        return hit
    ticket = near.begin_fill()
    try:
        value = compute()
    except BaseException:
        ticket.release()
        raise
    stream = near.stream
    if stream is None:
        ticket.release()
        return value
    expires = 0 if ttl_s is None else int(near.wall_ms() + ttl_s * 1000)
    answer = Answer(pickle.dumps(value), True, list(tags), stream.node_id, stream.generation, expires)
    near.fill(ticket, key, tenant, answer)
    return value
