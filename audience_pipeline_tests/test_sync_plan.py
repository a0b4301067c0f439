"""What an import sends: changed rows only, or everything, and why; the plan the report reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from audience_pipeline.feeds.loader import DEMO_FEEDS, FeedsFileError, load_feeds
from audience_pipeline.feeds.model import Feed, FeedsFile, sync_mode_for
from audience_pipeline.guard import removed_rate
from audience_pipeline.snapshot import SnapshotInfo, feed_fingerprint, snapshot_schema, write_snapshot
from audience_pipeline.sync_plan import (
    changes_markdown,
    leaver_note,
    prepare_sync,
    read_plan,
)

FEEDS = load_feeds(DEMO_FEEDS)


def feed_named(name: str) -> tuple[Feed, FeedsFile]:
    return next(f for f in FEEDS.feeds if f.name == name), FEEDS


def rows(*changes: tuple[str, str, str]) -> pd.DataFrame:
    base = {
        "unique_id": ["E1", "E2", "E3", "E4"],
        "email": ["a@x.com", "b@x.com", "c@x.com", "d@x.com"],
        "mobile_phone": [None] * 4,
        "first_name": ["Ann", "Bo", "Cy", "Di"],
        "last_name": ["A", "B", "C", "D"],
        "department": ["Sales", "Ops", "IT", "IT"],
        "start_date": ["2020-01-01"] * 4,
        "office_city": ["Austin"] * 4,
    }
    frame = pd.DataFrame(base, dtype="str").assign(source_line=[2, 3, 4, 5])
    for uid, column, value in changes:
        frame.loc[frame["unique_id"] == uid, column] = value
    return frame


def store_snapshot(path: Path, feed: Feed, feeds: FeedsFile, frame: pd.DataFrame) -> None:
    """The snapshot a report would write after ``frame`` was fully accepted."""
    prepared = prepare_sync(feed, feeds.destination_for(feed), frame, pa.array([], pa.string()), path)
    columns = feed.mapping.output_columns()
    table = pa.table(
        {
            "unique_id": pa.array(frame["unique_id"], pa.large_string()),
            "row_hash": prepared.hashes.rows,
            "id_hash": prepared.hashes.first,
            **{f"col:{c}": prepared.hashes.columns[c] for c in columns},
        },
        schema=snapshot_schema(columns),
    )
    fingerprint = feed_fingerprint(feed, feeds.destination_for(feed))
    write_snapshot(path, table, SnapshotInfo(fingerprint, "first.csv@0123456789", "job", 1.0, len(frame)))


def test_default_sync_modes_per_vendor() -> None:
    modes = {f.name: sync_mode_for(f, FEEDS.destination_for(f).type) for f in FEEDS.feeds}

    assert modes == {
        "all_staff_cxi": "full",
        "all_staff_aep": "full",
        "all_staff_apsis": "changed",
        "all_staff_altcraft": "changed",
        "all_staff_yesmail": "changed",
    }
    assert "replaces the audience" in leaver_note("communicate_xi")
    assert "listed in the report" in leaver_note("yesmail")


def test_changed_mode_is_refused_for_a_file_replacing_vendor(tmp_path: Path) -> None:
    text = DEMO_FEEDS.read_text("utf-8").replace(
        "    destination: cxi\n", "    destination: cxi\n    sync_mode: changed\n"
    )
    path = tmp_path / "feeds.yaml"
    path.write_text(text.replace("path: incoming", f"path: {DEMO_FEEDS.parent / 'incoming'}"), "utf-8")

    with pytest.raises(FeedsFileError, match=r"feeds\[0\]\.sync_mode: 'changed' is not possible"):
        load_feeds(path)


def test_changed_rows_only_after_the_first_file(tmp_path: Path) -> None:
    feed, feeds = feed_named("all_staff_yesmail")
    path = tmp_path / "snapshot.parquet"
    first = prepare_sync(feed, feeds.destination_for(feed), rows(), pa.array([], pa.string()), path)
    assert (first.plan.sent, first.plan.reason) == (4, "the feed's first file: every row is sent")
    store_snapshot(path, feed, feeds, rows())

    second = rows(("E2", "office_city", "Dallas"), ("E3", "department", "Ops"))
    second = pd.concat([second.iloc[:3], second.iloc[:0]])  # E4 left
    prepared = prepare_sync(feed, feeds.destination_for(feed), second, pa.array([], pa.string()), path)

    plan = prepared.plan
    assert plan.counts() == {"added": 0, "changed": 2, "unchanged": 1, "removed": 1, "sent": 2}
    assert plan.positions.tolist() == [1, 2]
    assert plan.reason == "changed rows only"
    assert prepared.changed == [("E2", ["office_city"]), ("E3", ["department"])]
    preview = prepared.preview()
    assert "| E2 | office_city |" in preview and "Dallas" not in preview and "b@x.com" not in preview
    assert "sync_mode changed: 2 row(s) to send (0 added, 2 changed, 1 unchanged not sent" in plan.summary()


def test_everything_is_sent_when_forced_full_or_reconfigured(tmp_path: Path) -> None:
    yesmail, feeds = feed_named("all_staff_yesmail")
    path = tmp_path / "snapshot.parquet"
    store_snapshot(path, yesmail, feeds, rows())
    destination = feeds.destination_for(yesmail)
    none = pa.array([], pa.string())

    unchanged = prepare_sync(yesmail, destination, rows(), none, path)
    forced = prepare_sync(yesmail, destination, rows(), none, path, force=True)
    remapped = yesmail.model_copy(update={"options": {**yesmail.options, "import_type": "ignore"}})
    reconfigured = prepare_sync(remapped, destination, rows(), none, path)
    cxi, _ = feed_named("all_staff_cxi")
    full = prepare_sync(cxi, feeds.destination_for(cxi), rows(), none, path)

    assert unchanged.plan.sent == 0 and unchanged.plan.changes.unchanged == 4
    assert forced.plan.sent == 4 and forced.plan.reason == "force: true sends every row"
    assert reconfigured.plan.sent == 4 and "mapping or options changed" in reconfigured.plan.reason
    assert full.plan.sent == 4 and full.plan.mode == "full"


def test_the_plan_round_trips_for_the_report(tmp_path: Path) -> None:
    feed, feeds = feed_named("all_staff_altcraft")
    path = tmp_path / "snapshot.parquet"
    store_snapshot(path, feed, feeds, rows())
    second = rows(("E1", "email", "new@x.com")).iloc[[0, 1, 2]]
    prepared = prepare_sync(feed, feeds.destination_for(feed), second, pa.array([], pa.string()), path)

    extra = prepared.record(tmp_path / "sync", second)
    plan = read_plan(tmp_path / "sync" / extra["plan"])

    assert {
        k: extra[k] for k in ("added", "changed", "unchanged", "removed", "sent")
    } == prepared.plan.counts()
    assert plan.sent_positions.tolist() == [0]
    assert plan.removed_ids.to_pylist() == ["E4"]
    assert plan.fingerprint == prepared.plan.fingerprint and plan.mode == "changed"
    assert plan.snapshot_rows().column_names[:3] == ["unique_id", "row_hash", "id_hash"]


def test_the_guard_counts_leavers_against_the_snapshot(tmp_path: Path) -> None:
    feed, feeds = feed_named("all_staff_cxi")
    path = tmp_path / "snapshot.parquet"
    assert removed_rate(feed.name, 0.2, path, pa.array(["E1"]), pa.array([], pa.string())).blocked is False
    store_snapshot(path, feed, feeds, rows())

    blocked = removed_rate(feed.name, 0.2, path, pa.array(["E1"]), pa.array(["E2"]))
    accepted = removed_rate(feed.name, 0.2, path, pa.array(["E1"]), pa.array(["E2"]), accept=True)
    within = removed_rate(feed.name, 0.25, path, pa.array(["E1", "E2", "E3"]), pa.array([], pa.string()))

    assert (blocked.removed, blocked.snapshot_rows, blocked.blocked) == (2, 4, True)
    assert "2 of the 4 employees in the snapshot (50.0%) are missing" in blocked.message()
    assert "accept_removals: true" in blocked.message() and "nothing was sent" in blocked.message()
    assert not accepted.blocked and "accepted" in accepted.message()
    assert not within.blocked


def test_changes_markdown_says_how_many_more() -> None:
    assert changes_markdown([], 0) == "_No changed rows._"
    text = changes_markdown([("E|1", ["a", "b"])], 3)
    assert "| E\\|1 | a, b |" in text and text.endswith("_2 more changed rows_")
