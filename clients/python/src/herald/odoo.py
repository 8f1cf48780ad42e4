"""Odoo helper: Herald's near cache in every Odoo worker, as a drop-in for
``@tools.ormcache`` where the data must follow changes made anywhere (other
workers, other services, raw SQL), not only through this worker's ORM.

In a server-wide module (loaded before Odoo forks its workers)::

    from herald import odoo as herald_odoo

    herald_odoo.configure("herald-cache-api:50051", token=os.environ["HERALD_CACHE_TOKEN"])

    class ResUsers(models.Model):
        _inherit = "res.users"

        @herald_odoo.cached(resource="user_by_slug")      # Herald reads it (configured SQL)
        def _user_by_slug(self, slug):
            ...                                          # runs only while Herald is unavailable

        @herald_odoo.cached(tags=lambda self, slug: [f"res_users.website_slug={slug}"])
        def _slug_to_id(self, slug):
            return self.search([("website_slug", "=", slug)]).id   # kept in RAM under those tags

        def write(self, vals):
            res = super().write(vals)
            herald_odoo.note_write(self)                  # this worker drops its copies at post-commit
            return res

and, next to ``registry.check_signaling()`` at the start of each request,
``herald_odoo.check_signaling(env)``: the whole request then bypasses the
near cache when it is not live (Herald down, stream lost).

The tenant is the database name (``env.cr.dbname``): one Herald tenant per
Odoo database. Watch streams cover the databases a worker serves (added as
they are first used).

What the tests exercise (against a stand-in of the registry, cursor,
environment and model API, since Odoo itself cannot be installed there):
the decorators on model methods, the tenant from ``env.cr.dbname``, the
per-request liveness check, ``note_write`` dropping the worker's own entries
when ``cr.postcommit`` runs (and not on rollback), a plain-SQL update reaching
every worker. Not exercised: a real Odoo server, its prefork manager, and its
own ormcache signalling running beside Herald's.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from herald.client import DEFAULT_NEAR, Client, NearConfig
from herald.decorators import local_memo
from herald.errors import HeraldUnavailable

F = TypeVar("F", bound=Callable[..., Any])

_client: Client | None = None
#: Set per request by :func:`check_signaling`: the request bypasses the near cache.
_bypass: contextvars.ContextVar[bool] = contextvars.ContextVar("herald_odoo_bypass", default=False)


def configure(
    target: str, token: str, *, near: NearConfig | None = DEFAULT_NEAR, timeout_s: float = 2.0
) -> Client:
    """The process-wide client (each forked worker builds its own connection lazily)."""
    global _client
    _client = Client(target, token, near=near, timeout_s=timeout_s)
    return _client


def client() -> Client:
    if _client is None:
        raise RuntimeError("herald.odoo.configure(target, token) was not called")
    return _client


def tenant_of(records: Any) -> str:
    """A model's (or environment's) tenant: its database name."""
    env = getattr(records, "env", records)
    return str(env.cr.dbname)


def check_signaling(env: Any) -> bool:
    """Call beside ``registry.check_signaling()``: decides for the whole request
    whether the near cache may serve (live for this database). Returns that."""
    live = client().live(tenant_of(env))
    _bypass.set(not live)
    return live


def cached(
    *,
    resource: str | None = None,
    tags: Callable[..., Iterable[str]] | None = None,
    ttl_s: float | None = None,
    fallback: bool = True,
) -> Callable[[F], F]:
    """A model method's answers from Herald (``resource=``: the method's arguments are
    the resource's parameters; its body runs only while Herald is unavailable) or kept
    in this worker's near cache under ``tags`` (computed by the method, stored under the
    fill rule, dropped when Herald sees a change to a tag)."""
    if (resource is None) == (tags is None):
        raise ValueError("give exactly one of resource= and tags=")

    def decorate(method: F) -> F:
        name = f"{method.__module__}.{method.__qualname__}"

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any) -> Any:
            herald = client()
            tenant = tenant_of(self)
            if resource is not None:
                try:
                    return herald.get_resource(resource, list(args), tenant=tenant)
                except HeraldUnavailable:
                    if not fallback:
                        raise
                    return method(self, *args)
            assert tags is not None
            if _bypass.get():
                return method(self, *args)
            model = getattr(self, "_name", type(self).__name__)
            return local_memo(
                herald,
                tenant,
                f"{name}:{model}",
                args,
                {},
                lambda: method(self, *args),
                tags(self, *args),
                ttl_s,
            )

        return wrapper  # type: ignore[return-value]

    return decorate


def note_write(records: Any, extra_tags: Iterable[str] = ()) -> None:
    """After a write, create or unlink: once the transaction commits
    (``cr.postcommit``), this worker drops its entries tagged with the records'
    row tags (``<table>.id=<id>``), the table tag and ``extra_tags`` — before
    Herald's invalidation comes back, so the worker reads its own write. Other
    workers drop theirs when the invalidation arrives."""
    env = records.env
    table = records._table
    tags = [table, *(f"{table}.id={i}" for i in records.ids), *extra_tags]
    tenant = tenant_of(env)
    env.cr.postcommit.add(lambda: client().drop_local(tenant, tags))
