"""Where a secret could end up after a run: stored Dagster events, files under a root, texts."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import dagster as dg


def event_text(instance: dg.DagsterInstance) -> str:
    """Every stored event of every run as text: log messages and the events' own fields."""
    chunks = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            chunks.append(entry.user_message or "")
            if entry.dagster_event is not None:
                chunks.append(repr(entry.dagster_event))
    return "\n".join(chunks)


def files_containing(root: Path, needle: bytes, *, skip_suffixes: Collection[str] = ()) -> list[Path]:
    """Files under ``root`` holding ``needle``, except those whose suffix is in ``skip_suffixes``."""
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in skip_suffixes and needle in p.read_bytes()
    ]


def assert_not_leaked(
    secrets: Iterable[str],
    *,
    texts: Mapping[str, str],
    root: Path,
    skip_suffixes: Collection[str] = (),
) -> None:
    """No secret in any named text (logs, output, events) nor in any file under ``root``."""
    for index, secret in enumerate(secrets):
        for name, text in texts.items():
            assert secret not in text, f"secret #{index} found in {name}"
        found = files_containing(root, secret.encode(), skip_suffixes=skip_suffixes)
        assert found == [], f"secret #{index} found in {found}"
