"""Helpers both layers import: the SCD2 oracle and its scenarios, load-hash checks, paths."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: README.md, luigi.cfg, sql/, setup/
SQL_DIR = ROOT / "sql"
README = ROOT / "README.md"
