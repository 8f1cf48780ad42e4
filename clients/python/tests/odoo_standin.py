"""A small stand-in of the Odoo API the helper touches (Odoo itself cannot be
installed here): a registry with ``check_signaling``, a cursor with
``dbname``, ``commit``/``rollback`` and ``postcommit`` callbacks (as
``odoo.sql_db.Cursor`` has since Odoo 14), an environment, and models with
``env``, ``_name``, ``_table``, ``ids`` and a ``write`` that runs SQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2


class Callbacks:
    """``odoo.tools.Callbacks``: functions run once, in order, then cleared."""

    def __init__(self) -> None:
        self._funcs: list[Callable[[], Any]] = []

    def add(self, func: Callable[[], Any]) -> None:
        self._funcs.append(func)

    def run(self) -> None:
        funcs, self._funcs = self._funcs, []
        for f in funcs:
            f()

    def clear(self) -> None:
        self._funcs = []


class Cursor:
    def __init__(self, dbname: str, dsn: str) -> None:
        self.dbname = dbname
        self._conn = psycopg2.connect(dsn)
        self.postcommit = Callbacks()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def commit(self) -> None:
        self._conn.commit()
        self.postcommit.run()

    def rollback(self) -> None:
        self._conn.rollback()
        self.postcommit.clear()

    def close(self) -> None:
        self._conn.close()


class Environment:
    def __init__(self, cr: Cursor) -> None:
        self.cr = cr

    def __getitem__(self, model: str) -> Any:
        return MODELS[model](self, ())


class Registry:
    """``odoo.modules.registry.Registry``: ``check_signaling`` at the start of each request."""

    def __init__(self) -> None:
        self.signaling_checks = 0

    def check_signaling(self) -> None:
        self.signaling_checks += 1


class Model:
    _name = ""
    _table = ""

    def __init__(self, env: Environment, ids: tuple[int, ...]) -> None:
        self.env = env
        self.ids = list(ids)

    def browse(self, ids: list[int]) -> Model:
        return type(self)(self.env, tuple(ids))


MODELS: dict[str, type[Model]] = {}
