"""Batch ids: UTC timestamps, so batch order is id order and an id tells its batch time."""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.core.errors import BatchIdError

FORMAT = "%Y%m%dT%H%M%S%fZ"


def new_batch_id() -> str:
    """A UTC timestamp id such as 20261126T031500123456Z: sortable, unique per microsecond."""
    return datetime.now(UTC).strftime(FORMAT)


def batch_time(batch_id: str) -> datetime:
    """The time a batch id encodes (YYYYMMDDTHHMMSS[ffffff]Z): the snapshot's 'now'."""
    digits = batch_id.rstrip("Z")
    try:
        base = datetime.strptime(digits[:15], "%Y%m%dT%H%M%S")
        micros = int(digits[15:].ljust(6, "0")[:6]) if len(digits) > 15 else 0
    except ValueError as exc:
        raise BatchIdError(
            f"batch id {batch_id!r} is not YYYYMMDDTHHMMSS[ffffff]Z", batch=batch_id
        ) from exc
    return base.replace(microsecond=micros, tzinfo=UTC)


def batch_id_problem(batch_id: str) -> str | None:
    """Why `batch_id` is not a batch id RunAll accepts, or None."""
    try:
        batch_time(batch_id)
    except BatchIdError as exc:
        return str(exc)
    return None
