"""The diff of a file against the snapshot, and the snapshot that follows an import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from audience_pipeline.changes import (
    ADDED,
    CHANGED,
    UNCHANGED,
    diff_rows,
    join_hashes,
    match_ids,
    removed_ids,
)
from audience_pipeline.row_hash import hash_rows
from audience_pipeline.snapshot import (
    Snapshot,
    SnapshotInfo,
    next_snapshot,
    read_snapshot,
    snapshot_schema,
    write_snapshot,
)

COLUMNS = ["unique_id", "email", "department"]


def frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS, dtype="str")


def snapshot_of(rows: pd.DataFrame) -> Snapshot:
    hashes = hash_rows(rows, COLUMNS, per_column=True, first_column=True)
    by_column = hashes.columns
    table = pa.table(
        {
            "unique_id": pa.array(rows["unique_id"], pa.large_string()),
            "row_hash": hashes.rows,
            "id_hash": hashes.first,
            **{f"col:{c}": by_column[c] for c in COLUMNS},
        },
        schema=snapshot_schema(COLUMNS),
    )
    return Snapshot(table, SnapshotInfo("fp", "old.csv@0123456789", "job-1", 1.0, len(rows)))


BEFORE = frame([("E1", "a@x.com", "Sales"), ("E2", "b@x.com", "Ops"), ("E3", "c@x.com", "IT")])


def test_added_changed_unchanged_and_removed() -> None:
    after = frame([("E4", "d@x.com", "IT"), ("E2", "b@x.com", "Ops"), ("E1", "a@x.com", "Support")])
    row_hash = hash_rows(after, COLUMNS).rows

    changes = diff_rows(pa.array(after["unique_id"]), row_hash, snapshot_of(BEFORE))

    assert changes.change.tolist() == [ADDED, UNCHANGED, CHANGED]
    assert changes.previous.tolist() == [-1, 1, 0]
    assert changes.removed_ids.to_pylist() == ["E3"]
    assert (changes.added, changes.changed, changes.unchanged, changes.removed) == (1, 1, 1, 1)
    assert changes.removed_rate == pytest.approx(1 / 3)


def test_without_a_snapshot_every_row_is_added() -> None:
    row_hash = hash_rows(BEFORE, COLUMNS).rows

    changes = diff_rows(pa.array(BEFORE["unique_id"]), row_hash, None)

    assert changes.change.tolist() == [ADDED] * 3
    assert changes.snapshot_rows is None and changes.removed == 0 and changes.removed_rate == 0.0


def test_a_rejected_row_is_not_a_leaver() -> None:
    after = BEFORE.iloc[:1]
    row_hash = hash_rows(after, COLUMNS).rows

    changes = diff_rows(
        pa.array(after["unique_id"]), row_hash, snapshot_of(BEFORE), rejected_ids=pa.array(["E2"])
    )

    assert changes.removed_ids.to_pylist() == ["E3"]
    gone = removed_ids(snapshot_of(BEFORE), pa.array(after["unique_id"]), pa.array(["E2", None, ""]))
    assert gone.to_pylist() == ["E3"]


def test_match_ids_survives_a_hash_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    import audience_pipeline.changes as changes

    monkeypatch.setattr(changes, "hash_values", lambda values: np.zeros(len(values), dtype=np.uint64))

    found = match_ids(pa.array(["b", "z", "a"]), pa.array(["a", "b", "c"]))

    assert found.tolist() == [1, -1, 0]


def test_match_ids_on_large_inputs() -> None:
    known = pa.array([f"E{i:07d}" for i in range(100_000)])
    order = np.random.default_rng(3).permutation(100_000)
    probe = pa.concat_arrays([known.take(pa.array(order)), pa.array(["nobody"])])

    found = match_ids(probe, known)

    assert found[:-1].tolist() == order.tolist() and found[-1] == -1


def test_snapshot_round_trip_keeps_its_info(tmp_path: Path) -> None:
    snapshot = snapshot_of(BEFORE)
    path = tmp_path / "snapshots" / "feed.parquet"

    write_snapshot(path, snapshot.table, snapshot.info)
    back = read_snapshot(path, ["unique_id", "row_hash"])

    assert back is not None and back.info == snapshot.info
    assert back.table.column_names == ["unique_id", "row_hash"]
    assert back.table.column("row_hash").to_pylist() == snapshot.table.column("row_hash").to_pylist()
    assert read_snapshot(tmp_path / "none.parquet") is None
    assert [p.name for p in path.parent.iterdir()] == ["feed.parquet"]


def test_next_snapshot_keeps_what_the_destination_holds() -> None:
    """Accepted and unchanged rows take their new hash; a row that failed keeps its previous
    entry (so it differs next time and is sent again), or none if it was new; a rejected row
    keeps its entry; a leaver is dropped."""
    current = snapshot_of(BEFORE).table
    after = frame([("E1", "a@x.com", "Support"), ("E2", "b@x.com", "Finance"), ("E4", "d@x.com", "IT")])
    candidates = snapshot_of(after).table
    holds = np.array([True, False, False])  # E2 and E4 failed at the destination

    table = next_snapshot(current, candidates, holds, pa.array(["E2", "E4", "E3"]))

    by_id = dict(
        zip(table.column("unique_id").to_pylist(), table.column("row_hash").to_pylist(), strict=True)
    )
    old = dict(
        zip(current.column("unique_id").to_pylist(), current.column("row_hash").to_pylist(), strict=True)
    )
    new = dict(
        zip(
            candidates.column("unique_id").to_pylist(), candidates.column("row_hash").to_pylist(), strict=True
        )
    )
    assert by_id == {"E1": new["E1"], "E2": old["E2"], "E3": old["E3"]}
    assert next_snapshot(current, candidates, holds, pa.array([], pa.string())).num_rows == 1
    assert next_snapshot(None, candidates, np.ones(3, bool), pa.array(["E2"])).num_rows == 3


def test_join_hashes_finds_every_key_and_refuses_repeated_ones() -> None:
    rng = np.random.default_rng(11)
    known = rng.integers(0, 2**63, 50_000, dtype=np.uint64)
    known[:100] = known[100:200] ^ np.uint64(1)  # neighbours: they compete for slots
    probe = np.concatenate([known[rng.permutation(50_000)], rng.integers(0, 2**63, 500, dtype=np.uint64)])

    found = join_hashes(known, probe)

    assert found is not None
    assert found.tolist() == pd.Index(known).get_indexer(probe).tolist()
    assert join_hashes(np.array([5, 7, 5], dtype=np.uint64), np.array([7], dtype=np.uint64)) is None
