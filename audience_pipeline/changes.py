"""Compare a file's valid rows with the feed's snapshot: added, changed, unchanged, removed.

Ids are matched by a hash join on their 64-bit hashes (:func:`join_hashes`); rows then compare
by ``row_hash``. Nothing runs per row in Python, so a million rows against a million-row
snapshot costs about two reads of the file (``benchmarks/bench_diff.py``).

The match is not checked against the ids themselves, and need not be: ``row_hash`` covers the id,
so two ids sharing a hash (odds about 2**-64 per pair) can only make a row look changed or added
(it is sent, which is harmless) and keep a leaver off the list once; they can never make a
changed row look unchanged. Two snapshot ids sharing a hash fall back to Arrow's exact lookup.

A *removed* employee is in the snapshot but not in the file; one whose row validation rejected
is still in the file (it is a reject, not a leaver).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.row_hash import hash_values
from audience_pipeline.snapshot import HASH, ID_HASH, Snapshot

ADDED, CHANGED, UNCHANGED = 0, 1, 2
_LEVELS = 6
CHANGE_NAMES = ("added", "changed", "unchanged")


@dataclass
class RowChanges:
    """How each row of a file compares with the snapshot, and who left."""

    change: np.ndarray
    """Per row of the file: :data:`ADDED`, :data:`CHANGED` or :data:`UNCHANGED` (int8)."""
    previous: np.ndarray
    """Per row of the file: its row in the snapshot, -1 when it has none."""
    removed_ids: pa.Array
    snapshot_rows: int | None
    """Employees in the snapshot; ``None`` when the feed has none yet (its first file)."""

    def count(self, kind: int) -> int:
        return int(np.count_nonzero(self.change == kind))

    @property
    def added(self) -> int:
        return self.count(ADDED)

    @property
    def changed(self) -> int:
        return self.count(CHANGED)

    @property
    def unchanged(self) -> int:
        return self.count(UNCHANGED)

    @property
    def removed(self) -> int:
        return len(self.removed_ids)

    @property
    def removed_rate(self) -> float:
        """Share of the snapshot's employees missing from the file (0 without a snapshot)."""
        return self.removed / self.snapshot_rows if self.snapshot_rows else 0.0


def _flat(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return ids.cast(pa.large_string())


def _slots(hashes: np.ndarray, level: int, bits: int) -> np.ndarray:
    """Table slots from ``bits`` bits of the hash, a different 16-bit rotation at each level."""
    turn = np.uint64(16 * (level % 4))
    rotated = (hashes << turn) | (hashes >> (np.uint64(64) - turn)) if level % 4 else hashes
    return (rotated >> np.uint64(64 - bits)).astype(np.intp)


def join_hashes(known: np.ndarray, probe: np.ndarray) -> np.ndarray | None:
    """For each of ``probe``, its position in ``known``, or -1; ``None`` if ``known`` repeats a hash.

    Direct-address tables of two slots per key, indexed by bits of the hash: one scatter places
    most keys; the keys that lost their slot to another go to a smaller table indexed by other
    bits, and so on. Pure numpy, about half the time of a pandas hash table.
    """
    found = np.full(len(probe), -1, dtype=np.int64)
    keys = probes = None  # level 0 takes them all without index arrays (fresh pages are dear)
    for level in range(_LEVELS):
        key_hashes = known if keys is None else known[keys]
        wanted = probe if probes is None else probe[probes]
        if len(key_hashes) == 0 or len(wanted) == 0:
            return found
        bits = min(max(10, (len(key_hashes) - 1).bit_length() + 1), 31)
        table = np.full(1 << bits, -1, dtype=np.int32)
        slot = _slots(key_hashes, level, bits)
        order = np.arange(len(key_hashes), dtype=np.int32)
        table[slot] = order  # the last key into a slot keeps it
        lost = table[slot] != order
        if np.any(key_hashes[lost] == key_hashes[table[slot[lost]]]):
            return None  # a repeated hash: an exact match decides
        candidate = table[_slots(wanted, level, bits)]
        hit = candidate >= 0
        hit[hit] = key_hashes[candidate[hit]] == wanted[hit]
        matched = candidate[hit] if keys is None else keys[candidate[hit]]
        if probes is None:
            found[hit] = matched
        else:
            found[probes[hit]] = matched
        keys = np.flatnonzero(lost) if keys is None else keys[lost]
        probes = np.flatnonzero(~hit) if probes is None else probes[~hit]
    if len(keys) and len(probes):  # a handful left after every level: sorted search
        order = np.argsort(known[keys])
        ordered = known[keys][order]
        if np.any(ordered[1:] == ordered[:-1]):
            return None
        at = np.minimum(np.searchsorted(ordered, probe[probes]), len(ordered) - 1)
        hit = ordered[at] == probe[probes]
        found[probes[hit]] = keys[order[at[hit]]]
    return found


def match_ids(
    ids: pa.Array | pa.ChunkedArray,
    known: pa.Array | pa.ChunkedArray,
    *,
    ids_hash: np.ndarray | None = None,
    known_hash: np.ndarray | None = None,
) -> np.ndarray:
    """For each of ``ids``, its position in ``known`` (unique ids), or -1. The ids' hashes
    (``row_hash.hash_values``) are computed unless given."""
    if len(known) == 0 or len(ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    known_hash = hash_values(known) if known_hash is None else known_hash
    found = join_hashes(known_hash, hash_values(ids) if ids_hash is None else ids_hash)
    if found is not None:
        return found
    found = pc.index_in(_flat(ids), value_set=_flat(known))  # two snapshot ids share a hash: exact
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def diff_rows(
    ids: pa.Array | pa.ChunkedArray,
    row_hash: np.ndarray,
    snapshot: Snapshot | None,
    *,
    rejected_ids: pa.Array | pa.ChunkedArray | None = None,
    id_hash: np.ndarray | None = None,
) -> RowChanges:
    """Classify a file's valid rows (``ids`` with their ``row_hash``) against ``snapshot``.

    ``rejected_ids`` are the ids of rows validation rejected: not leavers. ``id_hash`` (the ids'
    own hashes, ``hash_rows(..., first_column=True)``) saves hashing them again.
    """
    n = len(row_hash)
    if snapshot is None:
        return RowChanges(
            np.full(n, ADDED, np.int8), np.full(n, -1, np.int64), pa.array([], pa.large_string()), None
        )
    known = snapshot.ids
    previous = match_ids(ids, known, ids_hash=id_hash, known_hash=_known_hashes(snapshot))
    hit = previous >= 0
    old_hash = snapshot.table.column(HASH).to_numpy()
    change = np.full(n, ADDED, np.int8)
    same = old_hash[previous[hit]] == row_hash[hit]
    change[hit] = np.where(same, UNCHANGED, CHANGED)
    gone = np.ones(len(known), dtype=bool)
    gone[previous[hit]] = False
    removed = _flat(known.filter(pa.array(gone)))
    if rejected_ids is not None and len(removed) and len(rejected_ids):
        removed = removed.filter(pc.invert(pc.is_in(removed, value_set=_flat(rejected_ids))))
    return RowChanges(change, previous, removed, snapshot.table.num_rows)


def _known_hashes(snapshot: Snapshot) -> np.ndarray | None:
    """The snapshot's stored id hashes, when it has them all."""
    if ID_HASH not in snapshot.table.column_names or snapshot.table.column(ID_HASH).null_count:
        return None
    return snapshot.table.column(ID_HASH).to_numpy()


def removed_ids(
    snapshot: Snapshot | None, ids: pa.Array | pa.ChunkedArray, rejected_ids: pa.Array | pa.ChunkedArray
) -> pa.Array:
    """Employees in the snapshot that the file lacks (neither valid nor rejected): the guard's count."""
    if snapshot is None or snapshot.table.num_rows == 0:
        return pa.array([], pa.large_string())
    present = pa.concat_arrays([_flat(ids), _flat(rejected_ids)]) if len(rejected_ids) else _flat(ids)
    gone = np.ones(snapshot.table.num_rows, dtype=bool)
    found = match_ids(present, snapshot.ids, known_hash=_known_hashes(snapshot))
    gone[found[found >= 0]] = False
    return _flat(snapshot.ids.filter(pa.array(gone)))
