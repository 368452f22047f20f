"""Helpers both layers import: the SCD2 oracle and its scenarios, load-hash checks, paths."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: README.md, luigi.cfg, sql/, setup/
SQL_DIR = ROOT / "sql"
README = ROOT / "README.md"


def private_luigi_locks(directory: Path) -> dict[str, str]:
    """Environment for a `luigi` command whose pid lock is its own.

    The CLI locks its command line in /tmp/luigi, shared by every run on the machine: a test
    session running while another runs the same command would exit 10, "already running"."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "luigi-locks.cfg"
    config.write_text(f"[core]\nlock_pid_dir = {directory / 'luigi-pids'}\n")
    return {"LUIGI_CONFIG_PATH": str(config)}
