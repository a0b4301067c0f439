"""``audience-pipeline plan`` offline: the newest file of the source, or a given one, against the
feed's snapshot; the verdict of both blocking checks; nothing built that could reach a vendor."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from audience_pipeline.cli import main
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.snapshot import SnapshotInfo, feed_fingerprint, snapshot_schema, write_snapshot
from audience_pipeline.storage import PipelineStorage
from audience_pipeline.sync_plan import prepare_sync
from audience_pipeline.validation import validate_for_feed
from audience_pipeline_tests.offline_feeds import FEED, write_offline_feeds

HEADER = "ID,Email\n"


@pytest.fixture
def offline(tmp_path: Path) -> Path:
    write_offline_feeds(tmp_path)
    feeds = tmp_path / "feeds.yaml"  # the guard at its default threshold
    feeds.write_text(feeds.read_text("utf-8").replace("max_removed_rate: 1.0", "max_removed_rate: 0.2"))
    for age, (name, text) in enumerate(
        [("old.csv", HEADER + "E1,a@x.org\n"), ("new.csv", HEADER + "E1,a@x.org\nE2,b@x.org\nE3,bad\n")]
    ):
        path = tmp_path / "incoming" / name
        path.write_text(text, "utf-8")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    return tmp_path


def snapshot_of(root: Path, text: str) -> None:
    """The snapshot a report would have written after ``text`` was fully accepted."""
    feeds = load_feeds(root / "feeds.yaml")
    feed = feeds.feeds[0]
    csv = root / "snapshot-source.csv"
    csv.write_text(text, "utf-8")
    rows = validate_for_feed(csv, feed).valid
    path = PipelineStorage(base_dir=str(root / "home")).snapshot_path(feed.name)
    hashes = prepare_sync(feed, feeds.destination_for(feed), rows, pa.array([], pa.string()), path).hashes
    columns = feed.mapping.output_columns()
    table = pa.table(
        {
            "unique_id": pa.array(rows["unique_id"], pa.large_string()),
            "row_hash": hashes.rows,
            "id_hash": hashes.first,
            **{f"col:{c}": hashes.columns[c] for c in columns},
        },
        schema=snapshot_schema(columns),
    )
    info = SnapshotInfo(feed_fingerprint(feed, feeds.destination_for(feed)), "p", "k", 1.0, len(rows))
    write_snapshot(path, table, info)


def run_plan(root: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["plan", "--feeds", str(root / "feeds.yaml"), "--home", str(root / "home"), *extra])
    return code, capsys.readouterr().out


def test_the_newest_file_of_a_first_feed_sends_everything(offline: Path, capsys) -> None:
    code, out = run_plan(offline, capsys)

    assert code == 0, out
    assert f"{FEED} (communicate_xi): new.csv" in out
    assert "3 rows, 1 rejected; sync_mode full" in out and "would send 2: 2 added, 0 changed" in out
    assert "check rejection_rate_within_threshold: OK, 33.33% rejected (max_rejection_rate 50.00%)" in out
    assert "check removed_rate_within_threshold: OK, the feed's first file: no snapshot" in out


def test_plan_reports_changes_leavers_and_checks(offline: Path, capsys) -> None:
    snapshot_of(offline, HEADER + "E1,a@x.org\nE9,z@x.org\nE8,y@x.org\n")
    given = offline / "given.csv"
    given.write_text(HEADER + "E1,new@x.org\nE2,b@x.org\n", "utf-8")

    code, out = run_plan(offline, capsys, "--file", str(given))

    assert "given.csv" in out
    assert "would send 2: 1 added, 1 changed, 0 unchanged" in out  # CXI: sync_mode full
    assert "removed since the snapshot: 2 (the new file replaces the audience" in out
    assert "changed: E1 (email)" in out
    assert "check removed_rate_within_threshold: BLOCKED, 2 of the 3 employees" in out
    assert "nothing would be sent: a blocking check stops the file" in out
    assert out.rstrip().endswith("dry run: nothing was sent to any destination")
    assert code == 1


def test_an_unreadable_file_is_reported_not_raised(offline: Path, capsys) -> None:
    workbook = offline / "book.csv"
    workbook.write_bytes(b"PK\x03\x04 a workbook")

    code, out = run_plan(offline, capsys, "--file", str(workbook))

    assert code == 1 and "BLOCKED: refused:" in out and "workbook" in out
