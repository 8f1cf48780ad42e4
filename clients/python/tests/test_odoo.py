"""The Odoo helper against a stand-in of Odoo's registry/cursor/model API
(tests/odoo_standin.py) and a real Herald stack: decorated model methods,
tenant = database name, the per-request liveness check, the worker's own
writes dropped at post-commit (not on rollback), and a plain-SQL update
reaching the cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from herald import NearConfig
from herald import odoo as herald_odoo
from tests.odoo_standin import MODELS, Cursor, Environment, Model, Registry
from tests.stack import BACKEND_TOKEN, Stack, free_port


def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


class ResUsers(Model):
    _name = "res.users"
    _table = "res_users"
    computed = 0
    fallbacks = 0

    @herald_odoo.cached(resource="user_by_slug")
    def _user_by_slug(self, slug: str) -> Any:
        ResUsers.fallbacks += 1
        rows = self.env.cr.execute(
            "SELECT id, website_slug, name FROM res_users WHERE website_slug = %s", (slug,)
        )
        return {"id": rows[0][0], "website_slug": rows[0][1], "name": rows[0][2]} if rows else None

    @herald_odoo.cached(tags=lambda self, slug: [f"res_users.website_slug={slug}"])
    def _name_of(self, slug: str) -> str | None:
        ResUsers.computed += 1
        rows = self.env.cr.execute(
            "SELECT name FROM res_users WHERE tenant_id = %s AND website_slug = %s",
            (self.env.cr.dbname, slug),
        )
        return rows[0][0] if rows else None

    @herald_odoo.cached(tags=lambda self, uid: [f"res_users.id={uid}"])
    def _name_by_id(self, uid: int) -> str | None:
        ResUsers.computed += 1
        rows = self.env.cr.execute("SELECT name FROM res_users WHERE id = %s", (uid,))
        return rows[0][0] if rows else None

    def write(self, vals: dict[str, Any]) -> None:
        for column, value in vals.items():
            self.env.cr.execute(f"UPDATE res_users SET {column} = %s WHERE id = ANY(%s)", (value, self.ids))
        herald_odoo.note_write(self)


MODELS["res.users"] = ResUsers


@pytest.fixture
def env(stack: Stack) -> Iterator[Environment]:
    client = herald_odoo.configure(stack.target, BACKEND_TOKEN, near=NearConfig(tenants=None))
    cr = Cursor("odoo_db", stack.db_url)
    e = Environment(cr)
    herald_odoo.check_signaling(e)  # the first request of this database starts watching it
    assert client.wait_live(tenant="odoo_db")
    stack.sql("DELETE FROM res_users WHERE tenant_id = 'odoo_db'")
    stack.sql("INSERT INTO res_users (tenant_id, website_slug, name) VALUES ('odoo_db', 'ana', 'Ana')")
    # The tests count computations: the fixture's own changes must have
    # reached the near cache first, or they would drop what a test fills.
    stack.quiesce(client, "odoo_db")
    yield e
    cr.close()
    client.close()


def request(registry: Registry, env: Environment) -> bool:
    """What a worker does at the start of a request."""
    registry.check_signaling()
    return herald_odoo.check_signaling(env)


def test_resource_methods_read_through_herald_and_follow_plain_sql(stack: Stack, env: Environment) -> None:
    users = env["res.users"]
    assert request(Registry(), env)
    assert users._user_by_slug("ana")["name"] == "Ana"
    assert ResUsers.fallbacks == 0
    near = herald_odoo.client().near
    assert near is not None
    hits = near.store.stats.hits
    users._user_by_slug("ana")
    assert near.store.stats.hits == hits + 1
    stack.sql("UPDATE res_users SET name = 'Ana María' WHERE tenant_id = 'odoo_db' AND website_slug = 'ana'")
    eventually(
        lambda: users._user_by_slug("ana")["name"] == "Ana María", "the plain-SQL update reached the worker"
    )


def test_tag_methods_cache_in_ram_until_a_row_changes(stack: Stack, env: Environment) -> None:
    users = env["res.users"]
    request(Registry(), env)
    before = ResUsers.computed
    assert users._name_of("ana") == "Ana"
    assert users._name_of("ana") == "Ana"
    assert ResUsers.computed == before + 1, "the second call was not served from RAM"
    stack.sql("UPDATE res_users SET name = 'Anita' WHERE tenant_id = 'odoo_db' AND website_slug = 'ana'")
    eventually(lambda: users._name_of("ana") == "Anita", "the row change dropped the cached result")


def test_own_writes_are_dropped_at_post_commit_and_kept_on_rollback(stack: Stack, env: Environment) -> None:
    (uid,) = env.cr.execute("SELECT id FROM res_users WHERE tenant_id = 'odoo_db' AND website_slug = 'ana'")[
        0
    ]
    env.cr.commit()
    users = env["res.users"].browse([uid])
    request(Registry(), env)
    assert users._name_by_id(uid) == "Ana"
    computed = ResUsers.computed

    users.write({"name": "Rolled back"})
    env.cr.rollback()
    assert users._name_by_id(uid) == "Ana" and ResUsers.computed == computed, "a rollback dropped the entry"

    users.write({"name": "Committed"})
    assert users._name_by_id(uid) == "Ana", "dropped before the commit"
    env.cr.commit()
    # No waiting: post-commit dropped this worker's copy synchronously.
    assert users._name_by_id(uid) == "Committed"


def test_a_request_bypasses_while_the_near_cache_is_not_live(stack: Stack) -> None:
    herald_odoo.configure(
        f"127.0.0.1:{free_port()}", BACKEND_TOKEN, near=NearConfig(tenants=None), timeout_s=0.5
    )
    cr = Cursor("odoo_db", stack.db_url)
    try:
        e = Environment(cr)
        assert request(Registry(), e) is False
        users = e["res.users"]
        before = (ResUsers.fallbacks, ResUsers.computed)
        assert users._user_by_slug("ana") is not None  # Herald unreachable: the method body answers
        users._name_of("ana")
        users._name_of("ana")
        assert (ResUsers.fallbacks, ResUsers.computed) == (before[0] + 1, before[1] + 2)
    finally:
        cr.close()
        herald_odoo.client().close()
