"""The PostgreSQL type map and canonical JSON (`pipeline.extract.pg_types`), without a server."""

from __future__ import annotations

import pytest

from pipeline.extract import pg_types


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('{"b": [1.50, 2], "a": {"d": 1e5, "c": -0.0}}', '{"a":{"c":-0.0,"d":1e5},"b":[1.50,2]}'),
        ('{"k": "\\ue000 1.5", "n": 1.50}', '{"k":"\ue000 1.5","n":1.50}'),
        ('{"k": "\ue000", "n": 1.50}', '{"k":"\ue000","n":1.50}'),
        ('"\\u00e9\\n"', '"é\\n"'),
        ("12345678901234567890.123456789", "12345678901234567890.123456789"),
    ],
)
def test_canonical_json_keeps_numbers_exact(text: str, canonical: str) -> None:
    assert pg_types.canonical_json(text) == canonical
