"""The changed-rows snapshot of a feed: what its destination holds, one row per employee.

A parquet file in the pipeline's storage (``PipelineStorage.snapshot_path``) with ``unique_id``,
``row_hash`` (uint64 over the feed's output columns, ``row_hash.py``), ``id_hash`` (the id's own
hash, for the join) and one ``col:<name>`` per column (uint32: which columns of a changed row
changed). It holds no values: it tells whether a
row changed, never what it said. Its parquet metadata holds the fingerprint of the feed's
configuration (mapping, options, destination, hash version), so a configuration change makes the
next file a full push, and which import it reflects, so an older import's report that ends late
never replaces a newer import's snapshot.

Only a failure report replaces it (the import's outcome is then final), under a lock per feed:
written aside and renamed into place locally, one upload (visible whole once closed) on S3.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.feeds.model import DestinationConfig, Feed, SecretRef, is_secret_field
from audience_pipeline.object_store import StorePath, read_parquet, read_parquet_schema, write_parquet
from audience_pipeline.row_hash import HASH_VERSION

ID, HASH, ID_HASH = "unique_id", "row_hash", "id_hash"
COLUMN_PREFIX = "col:"
_META_KEY = b"audience_pipeline.snapshot"


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot reflects: the configuration it was made with and the import it records."""

    fingerprint: str
    partition: str
    import_key: str
    submitted_at: float
    rows: int


@dataclass
class Snapshot:
    table: pa.Table
    info: SnapshotInfo

    @property
    def ids(self) -> pa.ChunkedArray:
        return self.table.column(ID)


def feed_fingerprint(feed: Feed, destination: DestinationConfig) -> str:
    """A digest of everything that decides what a row looks like at the destination, and of the
    account it went to.

    The account is every non-secret text setting of the destination (endpoint, org, sandbox, API
    user…) with ``${VAR}`` resolved: a variable pointed at another account or endpoint sends
    everything once, while writing a value out in place of its variable changes nothing. Secrets
    are left out, so rotating a key does not resend the audience.
    """
    config = {
        "hash_version": HASH_VERSION,
        "mapping": feed.mapping.model_dump(mode="json"),
        "options": feed.options,
        "destination": feed.destination,
        "account": destination_account(destination),
    }
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def destination_account(destination: DestinationConfig) -> dict[str, str]:
    """The destination's non-secret text settings, ``${VAR}`` resolved (left as written if unset)."""
    model = type(destination)
    account = {}
    for name in model.model_fields:
        value = getattr(destination, name)
        if is_secret_field(model, name):
            continue
        if isinstance(value, SecretRef):
            value = os.environ.get(value.env_var) or f"${{{value.env_var}}}"
        if isinstance(value, str):
            account[name] = value
    return account


def snapshot_schema(columns: list[str]) -> pa.Schema:
    return pa.schema(
        [(ID, pa.large_string()), (HASH, pa.uint64()), (ID_HASH, pa.uint64())]
        + [(f"{COLUMN_PREFIX}{c}", pa.uint32()) for c in columns]
    )


def read_snapshot(path: StorePath, columns: list[str] | None = None) -> Snapshot | None:
    """The snapshot at ``path`` (``None`` before a feed's first report); ``columns`` limits the
    read (``unique_id`` and ``row_hash`` are what a diff needs)."""
    if not path.is_file():
        return None
    schema = read_parquet_schema(path)
    wanted = None if columns is None else [c for c in columns if c in schema.names]
    table = read_parquet(path, columns=wanted)
    raw = (schema.metadata or {}).get(_META_KEY)
    info = SnapshotInfo(**json.loads(raw)) if raw else SnapshotInfo("", "", "", 0.0, table.num_rows)
    return Snapshot(table, info)


def write_snapshot(path: StorePath, table: pa.Table, info: SnapshotInfo) -> None:
    """Replace the snapshot at once: readers see the old file or the new one, never half of one."""
    write_parquet(table.replace_schema_metadata({_META_KEY: json.dumps(asdict(info)).encode()}), path)


def _aligned(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns: missing ones null (a column the mapping gained)."""
    arrays = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema.remove_metadata())


def next_snapshot(
    current: pa.Table | None, candidates: pa.Table, holds: np.ndarray, carry_ids: pa.Array
) -> pa.Table:
    """The snapshot after an import whose outcome is final.

    ``candidates`` are the file's valid rows (snapshot columns), ``holds`` marks those the
    destination now holds as they are (accepted, ignored on purpose, or unchanged and not sent).
    A row that failed keeps its previous entry, if it had one: the destination still holds what
    it last accepted, so the row differs from it and is sent again with the next file. ``carry_ids``
    are such ids (rows that failed, and rows that validation rejected this time). Employees not
    in the file are dropped: they were reported as leavers once.
    """
    kept = candidates.filter(pa.array(holds, pa.bool_()))
    if current is None or len(carry_ids) == 0 or current.num_rows == 0:
        return kept
    carried = current.filter(pc.is_in(current.column(ID), value_set=pa.array(carry_ids, pa.large_string())))
    return pa.concat_tables([kept, _aligned(carried, kept.schema)])
