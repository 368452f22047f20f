"""The SCD2 oracle itself (tests/support/scd2_oracle.py), checked by hand on small histories."""

from __future__ import annotations

from tests.support.scd2_scenarios import at, make_entity, oracle_for
from tests.support.scd2_scenarios import version as _v


def test_oracle_check_new_record_by_hand() -> None:
    """Unchecked change: no version; NULL vs '': a version; delete: tombstone; revival."""
    oracle = oracle_for(make_entity("check-cols", "new_record", composite=False))
    a = {"name": "", "score": 1, "note": "x", "updated_at": None}
    b = {**a, "note": "y"}  # unchecked column only
    c = {**b, "name": None}  # '' -> NULL
    for t, rows in ((1, [a]), (2, [b]), (3, [c]), (4, []), (5, []), (6, [c])):
        oracle.apply([{"id": 1, **r} for r in rows], at(t))
    assert oracle.history() == [
        _v(1, a, 1, 3, 1, "False"),
        _v(1, c, 3, 4, 3, "False"),
        _v(1, c, 4, 6, 4, "True"),
        _v(1, c, 6, None, 6, "False"),
    ]


def test_oracle_timestamp_invalidate_by_hand() -> None:
    """Not newer: ignored; newer: valid from updated_at; deleted, then back with an old
    updated_at: valid from the batch time (after the closed window)."""
    oracle = oracle_for(make_entity("timestamp", "invalidate", composite=False))
    a = {"name": "a", "score": None, "note": None, "updated_at": at(1)}
    b = {**a, "name": "b"}  # same updated_at: ignored
    c = {**a, "name": "c", "updated_at": at(3)}
    for t, rows in ((2, [a]), (3, [b]), (4, [c]), (6, []), (8, [a])):
        oracle.apply([{"id": 1, **r} for r in rows], at(t))
    assert oracle.history() == [_v(1, a, 1, 3, 1), _v(1, c, 3, 6, 3), _v(1, a, 8, None, 1)]
