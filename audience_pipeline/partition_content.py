"""Which content each partition key stands for, kept in the Dagster instance.

A bare key (``employees.csv``, see ``sources/base.py``) carries no hash, so the sha256 the
new-file sensor (or the report schedule) saw when it made the key is recorded here, one entry per
key in the instance's key-value store (the table Dagster keeps its daemon cursors in, SQLite or
Postgres alike). ``hr_file`` compares the staged copy against it and refuses content that changed
since; the sensor reads it to recognise a file it already took. Keys with a hash in them are
recorded too, so a rare clash of 8 hex chars is noticed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dagster as dg

from audience_pipeline.sources.base import split_partition_key

PREFIX = "audience_pipeline/partition_sha256/"


def _entry(feed: str, key: str) -> str:
    return f"{PREFIX}{feed}/{key}"


def record_content(instance: dg.DagsterInstance, feed: str, content: Mapping[str, str]) -> None:
    """Remember the sha256 (or a prefix of 16 chars or more) of new partition keys."""
    if content:
        instance.daemon_cursor_storage.set_cursor_values(
            {_entry(feed, key): sha for key, sha in content.items()}
        )


def recorded_content(instance: dg.DagsterInstance, feed: str, keys: Iterable[str]) -> dict[str, str]:
    """The recorded content of each key that has a record."""
    wanted = {_entry(feed, key): key for key in keys}
    if not wanted:
        return {}
    found = instance.daemon_cursor_storage.get_cursor_values(set(wanted))
    return {wanted[entry]: sha for entry, sha in found.items() if sha}


def expected_contents(instance: dg.DagsterInstance, feed: str, keys: Iterable[str]) -> dict[str, str | None]:
    """What each key's file must hash to (a prefix), in one read: its record, else the hash in the
    key itself; ``None`` for a bare key without a record (added by hand in the UI)."""
    keys = list(keys)
    recorded = recorded_content(instance, feed, keys)
    return {key: recorded.get(key) or split_partition_key(key)[1] for key in keys}


def expected_content(instance: dg.DagsterInstance, feed: str, key: str) -> str | None:
    """:func:`expected_contents` of one key."""
    return expected_contents(instance, feed, [key])[key]
