"""The truncated-export guard: a file that lacks too many of the snapshot's employees is stopped.

An HR system that times out half way writes a file that looks valid. Sent to a file-replacing
vendor it would shrink the audience to half the company; sent anywhere it would list half the
company as leavers. So when more than the feed's ``max_removed_rate`` of the employees in its
snapshot are missing (neither a valid nor a rejected row), the blocking check
``removed_rate_within_threshold`` fails and nothing is sent. A feed's first file has no snapshot
and passes. When they really left, the same partition re-run with ``accept_removals: true`` on
the validate step passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from audience_pipeline.changes import removed_ids
from audience_pipeline.snapshot import ID, ID_HASH, read_snapshot


def accept_config_hint(feed: str) -> str:
    return f"run config ops: {{{feed}__validate: {{config: {{accept_removals: true}}}}}}"


@dataclass(frozen=True)
class RemovedRate:
    feed: str
    removed: int
    snapshot_rows: int | None
    """Employees in the snapshot; ``None`` before the feed's first report."""
    threshold: float
    accepted: bool = False

    @property
    def rate(self) -> float:
        return self.removed / self.snapshot_rows if self.snapshot_rows else 0.0

    @property
    def over(self) -> bool:
        return self.rate > self.threshold

    @property
    def blocked(self) -> bool:
        return self.over and not self.accepted

    def message(self) -> str:
        if self.snapshot_rows is None:
            return "the feed's first file: no snapshot to compare with"
        head = (
            f"{self.removed:,} of the {self.snapshot_rows:,} employees in the snapshot ({self.rate:.1%}) "
            f"are missing from this file; threshold max_removed_rate {self.threshold:.1%}"
        )
        if not self.over:
            return head
        if self.accepted:
            return f"{head}; accepted with accept_removals: true"
        return (
            f"{head}: nothing was sent. A truncated export? Drop the complete file again. If they really "
            f"left, re-run this partition with {accept_config_hint(self.feed)}"
        )


def removed_rate(
    feed: str,
    threshold: float,
    snapshot_path: Path,
    ids: pa.Array | pa.ChunkedArray,
    rejected_ids: pa.Array | pa.ChunkedArray,
    *,
    accept: bool = False,
) -> RemovedRate:
    """How many of the snapshot's employees the file lacks (reads only the snapshot's ids)."""
    snapshot = read_snapshot(snapshot_path, [ID, ID_HASH])
    if snapshot is None:
        return RemovedRate(feed, 0, None, threshold, accept)
    gone = removed_ids(snapshot, ids, rejected_ids)
    return RemovedRate(feed, len(gone), snapshot.table.num_rows, threshold, accept)
