"""The small interface every destination implements, and the records that cross it.

``submit`` sends the valid rows and returns a :class:`JobHandle` (JSON, stored in Dagster
metadata so the status sensor can find it again); ``status`` is the cheap poll the sensor calls;
``outcome`` fetches the per-row result once a job is final, for the failure report. Rows are
addressed by their position in the submitted frame (``row``), and the handle records which
positions each vendor job (chunk) covers, so a vendor's line or index maps back to ``source_line``.

Two optional keywords carry what the pipeline already knows, so no client has to ask again:
``previous`` (``submit``, ``reconcile``) is the newest handle the feed recorded before, the
pipeline's own state between pushes (Experience Platform keeps its audience id there; the other
vendors ignore it); ``status`` (``outcome``) is the job's terminal status, already polled, so
``outcome`` does not poll the status again where the vendor's results can be read without it.
A client also remembers the per-job answers of the last import its own ``status`` saw end
(:class:`LastFinal`), so ``status`` then ``outcome`` on one client reads each job once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

MAX_LISTED_JOBS = 4
"""Chunks named one by one in :attr:`JobHandle.key`; more are summarised."""


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    """A status word the client does not know: not terminal, logged by name, ends at the time limit."""

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


class ChunkJob(BaseModel):
    """One vendor job covering rows ``first_row`` .. ``first_row + row_count - 1``."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    first_row: int
    row_count: int


class JobHandle(BaseModel):
    """Everything needed to poll a submitted import and to account for its rows later."""

    vendor: str
    feed: str
    partition: str
    jobs: list[ChunkJob]
    submitted_rows: int
    submitted_at: float = Field(default_factory=time.time)
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable identifier of the import across all its chunks (used in run keys and tags).

        A few chunks are listed by id; an import of hundreds of batches is named by its first and
        last id plus a digest of all of them, so run keys and tags stay short.
        """
        ids = [job.job_id for job in self.jobs]
        if not ids:
            return f"{self.feed}:{self.partition}:empty"
        if len(ids) <= MAX_LISTED_JOBS:
            return "+".join(ids)
        digest = hashlib.sha256("+".join(ids).encode()).hexdigest()[:12]
        return f"{ids[0]}+{len(ids) - 2}more+{ids[-1]}#{digest}"


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    vendor_status: str
    progress: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class RowFailure:
    """A submitted row the vendor did not import: ``row`` indexes the submitted frame."""

    row: int
    reason: str
    outcome: str = "failed"


@dataclass
class JobOutcome:
    """Final per-row result: every submitted row is imported, failed or (where the vendor says so) ignored."""

    submitted: int
    failures: list[RowFailure] = field(default_factory=list)
    vendor_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for f in self.failures if f.outcome == "failed")

    @property
    def ignored(self) -> int:
        return sum(1 for f in self.failures if f.outcome == "ignored")

    @property
    def imported(self) -> int:
        return self.submitted - len(self.failures)


@dataclass(frozen=True)
class SubmitIntent:
    """Written to the instance before a submit that is not idempotent, so that a retry whose
    earlier attempt ended without an answer (connection lost, process killed) asks the vendor
    what happened before it sends the file again.

    ``recorded_at`` is epoch seconds just before the request left; ``known_job_ids`` are the
    vendor jobs this pipeline already recorded for the same target, which can never be the lost one.
    """

    feed: str
    partition: str
    sha256: str
    attempt: int
    recorded_at: float
    rows: int
    known_job_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Reconciliation:
    """What the vendor says about an earlier submit whose outcome is unknown.

    ``handle``: the import that submit created; adopt it instead of sending the file again.
    ``certain``: the vendor's API can tell (``handle is None`` then means "nothing arrived").
    When not certain, the pipeline sends again and the report says a duplicate was not excluded.
    """

    handle: JobHandle | None
    certain: bool
    detail: str


def cannot_reconcile(vendor: str, why: str) -> Reconciliation:
    """For vendors whose documents offer no lookup of earlier imports."""
    return Reconciliation(handle=None, certain=False, detail=f"{vendor}: {why}")


class Destination(Protocol):
    vendor: ClassVar[str]

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle: ...

    def reconcile(
        self, intent: SubmitIntent, rows: pd.DataFrame, *, previous: JobHandle | None = None
    ) -> Reconciliation: ...

    def status(self, handle: JobHandle) -> JobStatus: ...

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome: ...

    def close(self) -> None: ...


T = TypeVar("T")


class LastFinal(Generic[T]):
    """The per-job answers (by job id) of the last import a client's ``status`` saw end.

    ``outcome`` right after ``status`` on the same client (the report's path) reuses them instead
    of polling the jobs again. One import only: a finished job's answer can hold its whole per-row
    result (Altcraft), and a sensor tick polls many imports with one client. One attribute holds
    key and answers together, so the sensor's polling threads never see them mismatched.
    """

    def __init__(self) -> None:
        self._last: tuple[str, dict[str, T]] = ("", {})

    def remember(self, handle: JobHandle, answers: dict[str, T]) -> None:
        self._last = (handle.key, dict(answers))

    def get(self, handle: JobHandle) -> dict[str, T]:
        key, answers = self._last
        return answers if key == handle.key else {}


def known_final(status: JobStatus | None) -> JobStatus | None:
    """``status`` when it is terminal; a caller passing a status still running is ignored."""
    return status if status is not None and status.state.terminal else None


def every_row(job: ChunkJob, reason: str) -> list[RowFailure]:
    """All of one chunk's rows failed with ``reason``: the vendor gave no per-row result for it."""
    return [RowFailure(row=job.first_row + i, reason=reason) for i in range(job.row_count)]


def line_to_row(line: object) -> int | None:
    """A line of an uploaded CSV (header = line 1) to the chunk's 0-based row.

    Validation puts every record on one line, so line ``n`` is row ``n - 2``; ``None`` for the
    header, line 0 or a value that is not a line number.
    """
    try:
        row = int(str(line)) - 2
    except ValueError:
        return None
    return row if row >= 0 else None


def combine_states(states: list[JobState]) -> JobState:
    """A chunked import is final only when every chunk is; it failed if any chunk failed."""
    if not states or all(s is JobState.SUCCEEDED for s in states):
        return JobState.SUCCEEDED
    if all(s.terminal for s in states):
        return JobState.FAILED
    if any(s is JobState.UNKNOWN for s in states):
        return JobState.UNKNOWN
    if any(s is not JobState.PENDING for s in states):
        return JobState.RUNNING
    return JobState.PENDING
