"""What tags mean, as ``crates/herald-core/src/tags.rs`` defines them: the tags an
event drops, and the tags an entry is indexed under besides the ones it was given.

A row tag (``res_users.website_slug=alice``) implies its table's *any-row* tag
(``res_users.*``); only table-wide events (a TRUNCATE, or an event capture
widened past its size limit) carry the any-row tag, so they drop every entry
that depends on any row of the table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from herald.v1 import events_pb2

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


class TagKey(NamedTuple):
    """A tag in its scope: the tenant id, or ``""`` for global data."""

    scope: str
    tag: str


def any_row(table: str) -> str:
    """The any-row tag of ``table``."""
    return f"{table}.*"


def row_tag_table(tag: str) -> str | None:
    """The table a row tag (``<table>.<column>=<value>``) belongs to, if ``tag`` is one."""
    name, eq, _value = tag.partition("=")
    if not eq:
        return None
    table, dot, column = name.partition(".")
    if not dot or not _IDENT.match(table) or not _IDENT.match(column):
        return None
    return table


def indexed_tags(tags: Iterable[TagKey]) -> list[TagKey]:
    """``tags`` plus the any-row tag of every table one of them is a row tag of; order kept."""
    out = list(dict.fromkeys(tags))
    seen = set(out)
    for tag in list(out):
        table = row_tag_table(tag.tag)
        if table is not None:
            implied = TagKey(tag.scope, any_row(table))
            if implied not in seen:
                seen.add(implied)
                out.append(implied)
    return out


def is_table_wide(event: events_pb2.InvalidationEvent) -> bool:
    """Whether ``event`` concerns every row of its table (it names no rows)."""
    return bool(event.widened) or event.operation == events_pb2.OPERATION_TRUNCATE


def event_tags(event: events_pb2.InvalidationEvent) -> Sequence[str]:
    """The tags ``event`` drops: its own, plus its table's any-row tag when table-wide."""
    tags = list(event.tags)
    if is_table_wide(event) and event.table:
        implied = any_row(event.table)
        if implied not in tags:
            tags.append(implied)
    return tags
