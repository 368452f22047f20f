"""One error root for the whole pipeline, with the fields operators and Luigi need.

Every failure the pipeline raises on purpose is a `PipelineError`: its message names what is
wrong and how to fix it, `entity` and `batch` say where, and `retriable` says whether running
the same task again may succeed (a server that was down) or cannot (a bad setting, bad data).
The CLI edges print one line for it; task runs retry only retriable ones.
"""

from __future__ import annotations

from collections.abc import Iterable


class PipelineError(Exception):
    """A failure with a message that names the entity, batch, table or setting involved."""

    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        entity: str | None = None,
        batch: str | None = None,
        retriable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.entity = entity
        self.batch = batch
        if retriable is not None:
            self.retriable = retriable


class ConfigError(PipelineError, ValueError):
    """A setting is missing or malformed; the message names the section and key."""


class BatchIdError(PipelineError, ValueError):
    """A batch id is not `YYYYMMDDTHHMMSS[ffffff]Z`."""


class SourceError(PipelineError):
    """A source is unreachable or a value cannot be read; the message names what and where."""


class StagingError(PipelineError):
    """Staging is unreachable or a batch is damaged; the message names the store and key."""


class WarehouseError(PipelineError):
    """A warehouse statement failed; the message names the statement's target."""


class LoadError(PipelineError):
    """A batch cannot be loaded into its raw table; the message names entity, batch, column."""


class SnapshotError(PipelineError):
    """The batch cannot be applied; the message names the entity and the offending key."""


class DeleteGuardError(SnapshotError):
    """A full extract would retire too many live keys: probably a truncated extract."""


class InvariantError(SnapshotError):
    """The history broke an SCD2 invariant; the message names the keys."""


class FailpointError(PipelineError):
    """Raised on purpose by tests to simulate a crash at a named point."""


class MartError(PipelineError):
    """The mart project is invalid or a build failed; each problem names the file (and line).

    All the problems of a project are reported together, one per line of the message.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))
