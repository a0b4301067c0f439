"""The feed fingerprint sees the account a variable points at, and not a rotated secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.snapshot import destination_account, feed_fingerprint


def _fingerprint(root: Path, base_url: str) -> str:
    config = {
        "sources": {"hr_drop": {"type": "folder", "path": str(root)}},
        "destinations": {"cxi": {"type": "communicate_xi", "base_url": base_url, "api_key": "${FP_CXI_KEY}"}},
        "feeds": [
            {
                "name": "staff",
                "source": "hr_drop",
                "destination": "cxi",
                "mapping": {"unique_id": "ID", "email": "Email"},
                "options": {"import_name": "All staff"},
            }
        ],
    }
    path = root / "feeds.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    feeds = load_feeds(path)
    return feed_fingerprint(feeds.feeds[0], feeds.destination_for(feeds.feeds[0]))


def test_a_variable_pointed_at_another_account_changes_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FP_CXI_KEY", "key-1")
    monkeypatch.setenv("FP_CXI_URL", "https://tenant-a.example.com")
    before = _fingerprint(tmp_path, "${FP_CXI_URL}")
    assert _fingerprint(tmp_path, "https://tenant-a.example.com") == before  # written out: same account
    monkeypatch.setenv("FP_CXI_KEY", "key-2")
    assert _fingerprint(tmp_path, "${FP_CXI_URL}") == before  # a rotated key resends nothing
    monkeypatch.setenv("FP_CXI_URL", "https://tenant-b.example.com")
    assert _fingerprint(tmp_path, "${FP_CXI_URL}") != before  # another tenant gets every row once


def test_the_account_never_holds_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FP_CXI_KEY", "very-secret-key")
    _fingerprint(tmp_path, "https://tenant-a.example.com")
    feeds = load_feeds(tmp_path / "feeds.yaml")
    account = destination_account(feeds.destination_for(feeds.feeds[0]))
    assert account["base_url"] == "https://tenant-a.example.com"
    assert "very-secret-key" not in repr(account) and "api_key" not in account
