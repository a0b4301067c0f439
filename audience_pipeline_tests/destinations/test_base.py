"""The records that cross the destination interface: state algebra, counts, stored handles."""

from __future__ import annotations

import json

import pytest

from audience_pipeline.destinations.base import (
    ChunkJob,
    JobHandle,
    JobOutcome,
    JobState,
    RowFailure,
    combine_states,
)

P, R, S, F = JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED


@pytest.mark.parametrize(
    ("states", "combined"),
    [
        ([], S),
        ([S], S),
        ([S, S, S], S),
        ([F], F),
        ([S, F], F),
        ([F, F], F),
        ([P], P),
        ([P, P], P),
        ([R], R),
        ([P, R], R),
        ([S, P], R),
        ([F, P], R),
        ([S, R, F], R),
    ],
)
def test_combine_states(states: list[JobState], combined: JobState) -> None:
    assert combine_states(states) is combined
    assert combine_states(list(reversed(states))) is combined


def test_terminal_states() -> None:
    assert [s for s in JobState if s.terminal] == [S, F]


def test_job_outcome_counts() -> None:
    outcome = JobOutcome(
        submitted=10,
        failures=[
            RowFailure(row=1, reason="bad email"),
            RowFailure(row=4, reason="duplicate", outcome="ignored"),
            RowFailure(row=7, reason="bad phone"),
        ],
    )

    assert (outcome.failed, outcome.ignored, outcome.imported) == (2, 1, 7)
    assert (JobOutcome(submitted=3).imported, JobOutcome(submitted=3).failed) == (3, 0)


def test_job_handle_json_round_trip_and_key() -> None:
    handle = JobHandle(
        vendor="communicate_xi",
        feed="all_staff",
        partition="employees.csv|ab12",
        jobs=[
            ChunkJob(job_id="j-1", first_row=0, row_count=500),
            ChunkJob(job_id="j-2", first_row=500, row_count=3),
        ],
        submitted_rows=503,
        extra={"audience_import_id": "imp-1", "created": True},
    )

    stored = json.loads(json.dumps(handle.model_dump(mode="json")))
    again = JobHandle.model_validate(stored)

    assert again == handle
    assert JobHandle.model_validate_json(handle.model_dump_json()) == handle
    assert again.key == "j-1+j-2"


def test_empty_handle_key_names_feed_and_partition() -> None:
    handle = JobHandle(vendor="v", feed="all_staff", partition="p1", jobs=[], submitted_rows=0)

    assert handle.key == "all_staff:p1:empty"
    assert handle.submitted_at > 0


def test_handle_key_stays_short_for_many_chunks() -> None:
    from audience_pipeline.destinations.base import ChunkJob, JobHandle

    def handle(n: int) -> JobHandle:
        jobs = [ChunkJob(job_id=f"ticket-{i:06d}", first_row=i * 10, row_count=10) for i in range(n)]
        return JobHandle(vendor="v", feed="f", partition="p", jobs=jobs, submitted_rows=n * 10)

    assert handle(2).key == "ticket-000000+ticket-000001"
    many = handle(990).key
    assert len(many) < 80 and many.startswith("ticket-000000+988more+ticket-000989#")
    assert many == handle(990).key and many != handle(991).key
    assert handle(0).key == "f:p:empty"
