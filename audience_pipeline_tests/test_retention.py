"""Retention: which partitions' files may go, and deleting them locally and on S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience_pipeline.automation.lifecycle import PartitionState
from audience_pipeline.feeds.model import RetentionConfig
from audience_pipeline.object_store import remove_tree as remove
from audience_pipeline.object_store import storage_path, write_parquet
from audience_pipeline.retention import DAY_SECONDS, prunable

NOW = 1_800_000_000.0


def _states(**states: tuple[str, float]) -> dict[str, PartitionState]:
    return {p: PartitionState("feed", p, state, since=since) for p, (state, since) in states.items()}


def test_only_ended_old_partitions_beyond_the_newest_are_prunable() -> None:
    old, young = NOW - 200 * DAY_SECONDS, NOW - 10 * DAY_SECONDS
    states = _states(
        a=("reported", old),
        b=("blocked", old),
        c=("refused", old),
        d=("importing", old),  # the status sensor and the report still need its files
        e=("needs_attention", old),  # a person has yet to look
        f=("retrying", old),
        g=("reported", young),
        h=("reported", old),  # among the newest two: kept whatever its age
        i=("reported", old),
    )
    order = list("abcdefghi")
    settings = RetentionConfig(keep_days=180, keep_last=2)
    assert prunable(states, order, settings, NOW) == ["a", "b", "c"]
    assert prunable(states, order, RetentionConfig(keep_days=None), NOW) == []
    assert prunable(states, order, RetentionConfig(keep_days=365, keep_last=1), NOW) == []
    assert prunable(_states(a=("reported", 0.0)), ["a", "b"], RetentionConfig(keep_last=1), NOW) == []


def test_the_default_keeps_half_a_year_and_thirty_files() -> None:
    settings = RetentionConfig()
    assert (settings.keep_days, settings.keep_last, settings.schedule) == (180.0, 30, "0 3 * * *")
    with pytest.raises(ValueError, match="cron"):
        RetentionConfig(schedule="every day")


def test_remove_deletes_folders_and_files_and_ignores_what_is_gone(tmp_path: Path) -> None:
    folder = tmp_path / "staging" / "feed" / "part"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.csv").write_bytes(b"x" * 10)
    (folder / "nested" / "b.csv").write_bytes(b"y" * 5)
    single = tmp_path / "assets" / "v.parquet"
    single.parent.mkdir(parents=True)
    single.write_bytes(b"z" * 7)
    assert remove(folder) == (2, 15)
    assert remove(single) == (1, 7)
    assert not folder.exists() and not single.exists() and (tmp_path / "staging" / "feed").is_dir()
    assert remove(folder) == (0, 0)


@pytest.mark.integration
def test_remove_deletes_a_prefix_on_s3(s3_storage: str) -> None:
    import pyarrow as pa

    root = storage_path(s3_storage)
    write_parquet(pa.table({"a": [1, 2, 3]}), root / "sync" / "feed" / "part" / "plan-1.parquet")
    (root / "reports" / "feed" / "part" / "failures.csv").write_text("line,id\n", "utf-8")
    write_parquet(pa.table({"a": [1]}), root / "sync" / "feed" / "part2" / "plan-1.parquet")
    files, freed = remove(root / "sync" / "feed" / "part")
    assert files == 1 and freed > 0
    assert remove(root / "reports" / "feed" / "part" / "failures.csv") == (1, len("line,id\n"))
    assert not (root / "sync" / "feed" / "part" / "plan-1.parquet").exists()
    assert (root / "sync" / "feed" / "part2" / "plan-1.parquet").exists()  # a sibling prefix stays
    assert remove(root / "sync" / "feed" / "part") == (0, 0)
