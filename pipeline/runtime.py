"""Process-wide handles to the warehouse and the staging store, opened on first use.

Luigi checks many Targets per run; opening one connection per process (and one chDB session,
which is all chDB allows) keeps that cheap. `reset()` drops them after the settings change.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from importlib.abc import MetaPathFinder
from typing import Any

from pipeline import config
from pipeline.staging import Store, open_store
from pipeline.warehouse import Cluster, Warehouse, connect

__all__ = ["reset", "secrets", "settings", "store", "warehouse", "without_pandas"]


@cache
def settings() -> config.Settings:
    """The process-wide settings; `reset()` forgets them after the environment changed."""
    return config.load_settings()


@cache
def warehouse() -> Warehouse:
    cfg = settings()
    cluster = None
    if cfg.cluster:
        cluster = Cluster(cfg.cluster, cfg.replicated_path_prefix, cfg.ddl_timeout_seconds)
    return connect(cfg.warehouse_url, cluster)


@cache
def store() -> Store:
    return open_store(settings())


def secrets() -> set[str]:
    """Every secret this process knows (see `config.secret_values`)."""
    return config.secret_values(settings)


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


class _NoPandas(MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas":
            raise ModuleNotFoundError(
                "pandas is not loaded in pipeline runs (CDC_ALLOW_PANDAS=1 allows it)", name=name
            )


def without_pandas() -> None:
    """Keep pandas out of a pipeline run: 0.3-0.5 s of every run for nothing.

    pyarrow's converters import pandas, when it is installed (chDB installs it), on the first
    conversion of a Python list, to recognise pandas objects the pipeline never passes. Run
    entry points (luigi --module pipeline, cdc-run, python -m pipeline) call this; a library
    user's process is left alone, and CDC_ALLOW_PANDAS=1 turns it off.
    """
    if "pandas" in sys.modules or os.environ.get("CDC_ALLOW_PANDAS") == "1":
        return
    if not any(isinstance(finder, _NoPandas) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())
