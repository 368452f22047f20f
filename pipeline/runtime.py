"""Process-wide handles to the warehouse and the staging store, opened on first use.

Luigi checks many Targets per run; opening one connection per process (and one chDB session,
which is all chDB allows) keeps that cheap. `reset()` drops them after the settings change.
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING

from pipeline.config import settings

if TYPE_CHECKING:
    from pipeline.staging import Store
    from pipeline.warehouse import Warehouse

__all__ = ["reset", "settings", "store", "warehouse"]


@cache
def warehouse() -> Warehouse:
    from pipeline.warehouse import connect

    return connect(settings().warehouse_url)


@cache
def store() -> Store:
    from pipeline.staging import open_store

    return open_store(settings())


def _forget_in_child() -> None:
    """A forked Luigi worker must not reuse the parent's sockets: drop (do not close) them."""
    warehouse.cache_clear()
    store.cache_clear()


os.register_at_fork(after_in_child=_forget_in_child)


def reset() -> None:
    """Forget settings and connections (tests and the CLI call this after changing the env)."""
    if warehouse.cache_info().currsize:
        warehouse().close()
    warehouse.cache_clear()
    store.cache_clear()
    settings.cache_clear()
