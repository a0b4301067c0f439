"""``audience-pipeline plan``: what the next import of each feed would send, without sending it.

The newest file in the feed's source (or a given file) is validated and diffed against the
feed's snapshot exactly as ``validate`` and ``import_job`` would, and both blocking checks are
evaluated. No destination client is ever built, so no vendor sees a request; the source is
only listed and read (a report URL is pulled once).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pyarrow as pa

from audience_pipeline.csv_reader import CsvFileError
from audience_pipeline.feeds.model import FILE_REPLACING, Feed, FeedsFile
from audience_pipeline.guard import RemovedRate, removed_rate
from audience_pipeline.normalize import MappingError
from audience_pipeline.redact import redact
from audience_pipeline.sources.base import stage
from audience_pipeline.sources.registry import build_source_resource
from audience_pipeline.storage import PipelineStorage
from audience_pipeline.sync_plan import PreparedSync, leaver_note, prepare_sync
from audience_pipeline.validation import validate_for_feed


@dataclass
class FeedPlan:
    """One feed's answer: what would be sent, and whether a check would stop the file."""

    feed: str
    vendor: str
    file: str
    problem: str = ""
    """Why there is no plan: no file, or a file validation refuses."""
    source_rows: int = 0
    rejected: int = 0
    rejection_rate: float = 0.0
    max_rejection_rate: float = 0.0
    removed: RemovedRate | None = None
    prepared: PreparedSync | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rejection_blocked(self) -> bool:
        return self.rejection_rate > self.max_rejection_rate

    @property
    def blocked(self) -> bool:
        return (
            bool(self.problem)
            or self.rejection_blocked
            or (self.removed is not None and self.removed.blocked)
        )


def newest_file(feed: Feed, feeds: FeedsFile, into: Path) -> Path | None:
    """Copy the newest complete file of the feed's source into ``into`` (``None``: no file)."""
    with dg.build_resources({"source": build_source_resource(feeds.source_for(feed))}) as resources:
        source = resources.source
        files = [f for f in source.list_files() if f.marked is not False]
        if not files:
            return None
        newest = max(files, key=lambda f: (f.modified_ns, f.name))
        return Path(stage(source, newest.name, into).path)


def plan_feed(feed: Feed, feeds: FeedsFile, storage: str | Path, file: Path | None = None) -> FeedPlan:
    """Validate and diff ``file`` (default: the newest in the source) for ``feed`` against its
    snapshot in ``storage`` (a local folder or an ``s3://`` URL, ``storage.storage_location``)."""
    vendor = feeds.destination_for(feed).type
    with tempfile.TemporaryDirectory(prefix="audience-plan-") as tmp:
        try:
            path = file or newest_file(feed, feeds, Path(tmp))
        except Exception as exc:  # a source that is down or misconfigured: say so, go on with the next feed
            return FeedPlan(feed.name, vendor, "-", problem=redact(f"cannot read the source: {exc}"))
        if path is None:
            return FeedPlan(feed.name, vendor, "-", problem="no file in the source")
        out = FeedPlan(feed.name, vendor, path.name, max_rejection_rate=feed.max_rejection_rate)
        try:
            result = validate_for_feed(path, feed)
        except (CsvFileError, MappingError) as exc:
            out.problem = f"refused: {exc}"
            return out
    out.source_rows, out.rejected, out.rejection_rate = (
        result.source_rows,
        len(result.rejects),
        result.rejection_rate,
    )
    snapshot_path = PipelineStorage(base_dir=str(storage)).snapshot_path(feed.name)
    valid_ids = pa.array(result.valid["unique_id"], pa.large_string())
    rejected_ids = pa.array(result.rejects["unique_id"], pa.large_string())
    out.removed = removed_rate(feed.name, feed.max_removed_rate, snapshot_path, valid_ids, rejected_ids)
    destination = feeds.destination_for(feed)
    out.prepared = prepare_sync(feed, destination, result.valid, rejected_ids, snapshot_path)
    return out


def format_plan(plan: FeedPlan) -> list[str]:
    """The lines ``plan`` prints for one feed."""
    head = f"{plan.feed} ({plan.vendor}): {plan.file}"
    if plan.problem:
        return [head, f"  BLOCKED: {plan.problem}"]
    assert plan.prepared is not None and plan.removed is not None
    sync = plan.prepared.plan
    c = sync.counts()
    unchanged = (
        f", {c['unchanged']} unchanged" if sync.mode == "full" else f"; {c['unchanged']} unchanged not sent"
    )
    lines = [
        head,
        f"  {plan.source_rows} rows, {plan.rejected} rejected; sync_mode {sync.mode} ({sync.reason})",
        f"  would send {c['sent']}: {c['added']} added, {c['changed']} changed{unchanged}",
        f"  removed since the snapshot: {c['removed']} ({leaver_note(plan.vendor)})",
    ]
    if plan.prepared.changed:
        shown = ", ".join(f"{uid} ({', '.join(cols)})" for uid, cols in plan.prepared.changed)
        lines.append(f"  changed: {shown}" + (" …" if c["changed"] > len(plan.prepared.changed) else ""))
    verdict = "BLOCKED" if plan.rejection_blocked else "OK"
    lines.append(
        f"  check rejection_rate_within_threshold: {verdict}, {plan.rejection_rate:.2%} rejected "
        f"(max_rejection_rate {plan.max_rejection_rate:.2%})"
    )
    verdict = "BLOCKED" if plan.removed.blocked else "OK"
    lines.append(f"  check removed_rate_within_threshold: {verdict}, {plan.removed.message()}")
    if plan.blocked:
        lines.append("  nothing would be sent: a blocking check stops the file")
    elif c["sent"] == 0:
        lines.append("  nothing would be sent: no row changed since the snapshot")
    elif plan.vendor in FILE_REPLACING:
        lines.append("  the file would replace the whole audience")
    return lines
