"""What an import sends: every row, or only the rows that changed since the snapshot.

Per-member vendors (Yesmail, Altcraft, APSIS One) update the members they are sent and leave the
others alone, so they default to ``sync_mode: changed``: added and changed rows only. The
file-replacing vendors (Communicate XI's import file, Experience Platform's audience file) take
the file as the whole audience, so they are always ``full``. Everything is sent anyway on a
feed's first file, after its mapping or options changed (the snapshot's fingerprint differs),
and when ``import_job`` runs with ``force: true``.

A plan is written beside the partition (``PipelineStorage.sync_dir``) before the submit: per row
of the file its id, hashes, change and whether it was sent, plus the leavers. The failure report
reads it back to map vendor failures to rows, list the leavers and write the next snapshot.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from audience_pipeline.changes import CHANGED, UNCHANGED, RowChanges, diff_rows
from audience_pipeline.feeds.model import FILE_REPLACING, DestinationConfig, Feed, sync_mode_for
from audience_pipeline.object_store import StorePath, read_parquet, write_parquet
from audience_pipeline.reports import markdown_cell
from audience_pipeline.row_hash import RowHashes, hash_rows
from audience_pipeline.snapshot import (
    COLUMN_PREFIX,
    HASH,
    ID,
    ID_HASH,
    Snapshot,
    feed_fingerprint,
    read_snapshot,
)

CHANGE, SENT = "change", "sent"
PREVIEW_ROWS = 10
_META_KEY = b"audience_pipeline.plan"

VENDOR_NAMES = {
    "communicate_xi": "Communicate XI",
    "adobe_experience_platform": "Experience Platform",
    "apsis_one": "APSIS One",
    "yesmail": "Yesmail",
    "altcraft": "Altcraft",
}
LEAVER_REASONS = {
    "yesmail": "not in this file and not sent: Yesmail's target-list import cannot remove a member, "
    "so they stay on the list until someone removes them there",
    "altcraft": "not in this file and not sent: Altcraft's bulk import cannot delete a profile, so "
    "it stays (and stays subscribed) until someone removes it there",
    "apsis_one": "not in this file and not sent: APSIS One's profile import cannot delete a profile, "
    "so it stays in the section until someone removes it there",
}
"""What happens to a leaver at a per-member vendor: the report's reason for ``outcome: removed``."""


def leaver_note(vendor: str) -> str:
    """One line on what happens to employees missing from the new file, per vendor."""
    if vendor in FILE_REPLACING:
        return f"the new file replaces the audience at {VENDOR_NAMES[vendor]}: leavers are removed by it"
    return f"leavers are listed in the report (outcome removed); {VENDOR_NAMES[vendor]} keeps them"


@dataclass
class SyncPlan:
    """Which rows of a file go to the destination, and why."""

    mode: str
    """``changed`` or ``full``: the feed's sync mode."""
    reason: str
    """Why these rows: ``changed rows only``, or why everything is sent."""
    changes: RowChanges
    send: np.ndarray
    """Per row of the file: whether it is sent."""
    fingerprint: str
    snapshot_partition: str | None

    @property
    def sent(self) -> int:
        return int(np.count_nonzero(self.send))

    @property
    def positions(self) -> np.ndarray:
        """Rows of the file that are sent, in file order (the submitted frame's rows)."""
        return np.flatnonzero(self.send)

    def counts(self) -> dict[str, int]:
        c = self.changes
        return {
            "added": c.added,
            "changed": c.changed,
            "unchanged": c.unchanged,
            "removed": c.removed,
            "sent": self.sent,
        }

    def summary(self) -> str:
        c = self.counts()
        unsent = "" if self.mode == "full" else f", {c['unchanged']} unchanged not sent"
        return (
            f"sync_mode {self.mode}: {c['sent']} row(s) to send ({c['added']} added, {c['changed']} "
            f"changed{unsent}; {self.reason}); {c['removed']} employee(s) left since the snapshot"
        )


def plan_sync(
    feed: Feed,
    destination: DestinationConfig,
    ids: pa.Array | pa.ChunkedArray,
    row_hash: np.ndarray,
    snapshot: Snapshot | None,
    *,
    rejected_ids: pa.Array | pa.ChunkedArray | None = None,
    id_hash: np.ndarray | None = None,
    force: bool = False,
) -> SyncPlan:
    """Diff the file against the snapshot and decide what to send."""
    mode = sync_mode_for(feed, destination.type)
    fingerprint = feed_fingerprint(feed, destination)
    changes = diff_rows(ids, row_hash, snapshot, rejected_ids=rejected_ids, id_hash=id_hash)
    if mode == "full":
        reason = "the file is the whole audience"
    elif force:
        reason = "force: true sends every row"
    elif snapshot is None:
        reason = "the feed's first file: every row is sent"
    elif snapshot.info.fingerprint != fingerprint:
        reason = "the feed's mapping or options changed since the snapshot: every row is sent once"
    else:
        reason = "changed rows only"
    send = changes.change != UNCHANGED if reason == "changed rows only" else np.ones(len(row_hash), bool)
    return SyncPlan(mode, reason, changes, send, fingerprint, snapshot.info.partition if snapshot else None)


def file_hashes(rows: pd.DataFrame, feed: Feed) -> RowHashes:
    """Row, per-column and id hashes of a file's valid rows over the feed's output columns
    (``unique_id`` is always the first)."""
    return hash_rows(rows, feed.mapping.output_columns(), per_column=True, first_column=True)


def changed_columns(
    plan: SyncPlan, rows: pd.DataFrame, column_hashes: dict[str, np.ndarray], snapshot_path: StorePath
) -> list[tuple[str, list[str]]]:
    """``(id, columns that changed)`` for the first changed rows: from the per-column hashes,
    so no value is ever read from the snapshot (it holds none)."""
    picked = np.flatnonzero(plan.changes.change == CHANGED)[:PREVIEW_ROWS]
    if len(picked) == 0:
        return []
    names = list(column_hashes)
    snapshot = read_snapshot(snapshot_path, [f"{COLUMN_PREFIX}{c}" for c in names])
    if snapshot is None:
        return []
    previous = plan.changes.previous[picked]
    out = []
    for row, before in zip(picked, previous, strict=True):
        changed = [
            c
            for c in names
            if f"{COLUMN_PREFIX}{c}" in snapshot.table.column_names
            and snapshot.table.column(f"{COLUMN_PREFIX}{c}")[int(before)].as_py()
            != int(column_hashes[c][row])
        ]
        out.append((str(rows["unique_id"].iloc[row]), changed or ["(a column the snapshot does not know)"]))
    return out


def changes_markdown(changed: list[tuple[str, list[str]]], total: int) -> str:
    """The first changed rows as a Markdown table: id and column names, never a value."""
    if not changed:
        return "_No changed rows._"
    lines = ["| id | changed columns |", "|---|---|"]
    lines += [f"| {markdown_cell(uid)} | {markdown_cell(', '.join(cols))} |" for uid, cols in changed]
    if total > len(changed):
        lines.append(f"\n_{total - len(changed)} more changed rows_")
    return "\n".join(lines)


def write_plan(directory: StorePath, plan: SyncPlan, rows: pd.DataFrame, hashes: RowHashes) -> StorePath:
    """Store the plan of one import (a new file per submit, so a forced re-run keeps its own)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"plan-{time.time_ns()}.parquet"
    table = pa.table(
        {
            ID: pa.array(rows["unique_id"], pa.large_string()),
            HASH: pa.array(hashes.rows, pa.uint64()),
            ID_HASH: pa.array(hashes.first, pa.uint64()),
            **{f"{COLUMN_PREFIX}{c}": pa.array(h, pa.uint32()) for c, h in hashes.columns.items()},
            CHANGE: pa.array(plan.changes.change, pa.int8()),
            SENT: pa.array(plan.send, pa.bool_()),
        }
    )
    meta = {"fingerprint": plan.fingerprint, "mode": plan.mode, "reason": plan.reason}
    write_parquet(pa.table({ID: plan.changes.removed_ids}), _removed_path(path))
    write_parquet(table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()}), path)
    return path


def _removed_path(plan_path: StorePath) -> StorePath:
    return plan_path.with_name(plan_path.stem + "-removed.parquet")


@dataclass
class StoredPlan:
    """A plan read back by the failure report."""

    table: pa.Table
    removed_ids: pa.Array
    fingerprint: str
    mode: str

    @property
    def sent_positions(self) -> np.ndarray:
        return np.flatnonzero(self.table.column(SENT).to_numpy())

    def count(self, kind: int) -> int:
        return int(np.count_nonzero(self.table.column(CHANGE).to_numpy() == kind))

    def snapshot_rows(self) -> pa.Table:
        """The file's rows as snapshot rows (id, hashes)."""
        return self.table.drop_columns([CHANGE, SENT])


def read_plan(path: StorePath) -> StoredPlan:
    table = read_parquet(path)
    meta = json.loads((table.schema.metadata or {})[_META_KEY])
    removed = read_parquet(_removed_path(path)).column(ID).combine_chunks()
    return StoredPlan(table.replace_schema_metadata(None), removed, meta["fingerprint"], meta["mode"])


@dataclass
class PreparedSync:
    """A plan with what it was computed from: hashes to store, changed columns to show."""

    plan: SyncPlan
    hashes: RowHashes
    changed: list[tuple[str, list[str]]]

    def preview(self) -> str:
        return changes_markdown(self.changed, self.plan.changes.changed)

    def record(self, directory: StorePath, rows: pd.DataFrame) -> dict:
        """Write the plan beside the partition; what the job handle keeps of it (small; the plan
        by file name, so the pipeline's storage can move)."""
        path = write_plan(directory, self.plan, rows, self.hashes)
        return {
            "plan": path.name,
            "mode": self.plan.mode,
            "reason": self.plan.reason,
            **self.plan.counts(),
            "changed_preview": self.preview(),
        }


def prepare_sync(
    feed: Feed,
    destination: DestinationConfig,
    rows: pd.DataFrame,
    rejected_ids: pa.Array | pa.ChunkedArray,
    snapshot_path: StorePath,
    *,
    force: bool = False,
) -> PreparedSync:
    """Hash the file's valid rows, diff them against the feed's snapshot and plan the push."""
    hashes = file_hashes(rows, feed)
    snapshot = read_snapshot(snapshot_path, [ID, HASH, ID_HASH])
    ids = pa.array(rows["unique_id"], pa.large_string())
    plan = plan_sync(
        feed,
        destination,
        ids,
        hashes.rows,
        snapshot,
        rejected_ids=rejected_ids,
        id_hash=hashes.first,
        force=force,
    )
    changed = changed_columns(plan, rows, hashes.columns, snapshot_path) if snapshot is not None else []
    return PreparedSync(plan, hashes, changed)
