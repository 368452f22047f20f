"""The side virtualenvs under `.bench/`: floors and peers must not share the project's environment.

The floors venv is pinned to the project's own pyarrow/pymongo/psycopg2/minio versions (so a
floor differs from our pipeline only by the code that runs), plus the optional fast drivers the
project does not depend on. The dlt venv pins the dlt the issue names. A venv is rebuilt only
when its requirement list changes.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

DLT_VERSION = "1.31.0"
PYMONGOARROW_VERSION = "1.15.0"
# pymongoarrow 1.15 builds against pyarrow 25.0.x only; with a newer pyarrow in the project the
# floors take the newest 25.0 (the bench prints the versions both sides ran)
PYMONGOARROW_PYARROW = (25, 0)
ADBC_VERSION = "1.13.0"
PY_SPY_VERSION = "0.4.3"
MARKER = ".bench-requirements"


def _ours(name: str) -> str:
    return f"{name}=={metadata.version(name)}"


def floors_pyarrow() -> str:
    """The project's pyarrow, unless pymongoarrow cannot take it."""
    ours = tuple(int(p) for p in metadata.version("pyarrow").split(".")[:2])
    if ours == PYMONGOARROW_PYARROW:
        return _ours("pyarrow")
    major, minor = PYMONGOARROW_PYARROW
    return f"pyarrow>={major}.{minor},<{major}.{minor + 1}"


def floors_requirements() -> list[str]:
    return [
        floors_pyarrow(),
        _ours("pymongo"),
        _ours("psycopg2-binary"),
        _ours("minio"),
        f"pymongoarrow=={PYMONGOARROW_VERSION}",
        f"adbc-driver-postgresql=={ADBC_VERSION}",
        f"adbc-driver-manager=={ADBC_VERSION}",
        # the profiler for `--profile`: a standalone binary, so any venv can carry it
        f"py-spy=={PY_SPY_VERSION}",
    ]


def dlt_requirements() -> list[str]:
    return [f"dlt[duckdb]=={DLT_VERSION}", _ours("pyarrow"), _ours("pymongo")]


def ensure(path: Path, requirements: list[str], log: Path) -> Path:
    """The venv's python, creating or updating the venv first when needed (raises on failure)."""
    python = path / "bin" / "python"
    marker = path / MARKER
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    base = getattr(sys, "_base_executable", None) or "python3"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        steps = [
            [base, "-m", "venv", str(path)],
            [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "-q", *requirements],
        ]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
                raise RuntimeError(f"`{' '.join(step)}` failed; see {log}")
    marker.write_text(wanted)
    return python
