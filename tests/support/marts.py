"""Mart projects written on the fly: the tables a project may read, and files of SQL."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# the non-mart tables of the shipped project's database
SOURCES = {
    "users_snapshot",
    "orders_snapshot",
    "products_snapshot",
    "raw_users",
    "raw_orders",
    "raw_products",
}


def write(directory: Path, files: Mapping[str, str]) -> Path:
    """`sql/<name>.sql` files for each name -> text."""
    for name, text in files.items():
        (directory / f"{name}.sql").write_text(text, encoding="utf-8")
    return directory
