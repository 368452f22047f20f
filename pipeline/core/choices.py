"""The closed sets of values settings take; the allowed values are derived, never listed twice."""

from __future__ import annotations

from typing import Literal, get_args

Source = Literal["mongo", "postgres"]
Mode = Literal["full", "incremental", "log", "changestream"]
# modes that read a database's log of changes instead of its rows
CHANGE_MODES: tuple[Mode, ...] = ("log", "changestream")
Strategy = Literal["check", "timestamp"]
HardDeletes = Literal["ignore", "invalidate", "new_record"]
# a stage as the markers (`_cdc_batches`) and the run audit (`_cdc_runs`) name it
Stage = Literal["extract", "plan_ranges", "extract_range", "raw", "snapshot", "mart", "run"]

SOURCES: tuple[Source, ...] = get_args(Source)
MODES: tuple[Mode, ...] = get_args(Mode)
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
HARD_DELETES: tuple[HardDeletes, ...] = get_args(HardDeletes)
STAGES: tuple[Stage, ...] = get_args(Stage)
