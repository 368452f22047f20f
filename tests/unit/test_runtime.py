"""Process-level behaviour of pipeline runs (checked in fresh interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys
from pipeline.runtime import without_pandas
without_pandas()
import pyarrow as pa
pa.array(["a", None])
pa.Table.from_pylist([{"a": 1}])
print("pandas" in sys.modules)
"""


@pytest.mark.parametrize(("allow", "loaded"), [(None, "False"), ("1", "True")])
def test_pipeline_runs_keep_pandas_out_unless_allowed(allow: str | None, loaded: str) -> None:
    """pyarrow would import pandas (installed with chDB) on its first list conversion."""
    pytest.importorskip("pandas")
    env = {k: v for k, v in os.environ.items() if k != "CDC_ALLOW_PANDAS"}
    if allow is not None:
        env["CDC_ALLOW_PANDAS"] = allow
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == loaded
