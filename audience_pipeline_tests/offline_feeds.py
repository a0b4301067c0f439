"""A one-feed feeds file for tests that stand in for the vendor: its CXI address is never called."""

from __future__ import annotations

from pathlib import Path

import yaml

from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.feeds.model import FeedsFile

FEED = "staff"


def write_offline_feeds(root: Path, feeds: int = 1) -> FeedsFile:
    """Feed ``FEED`` reading ``root/incoming`` (created), with ID and Email mapped; loaded back.

    ``feeds > 1`` adds ``FEED_2``, ``FEED_3``… like it, on the same destination, each with its own
    import name."""
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    config = {
        "sources": {"hr_drop": {"type": "folder", "path": str(root / "incoming")}},
        "destinations": {
            # Secrets must be ${VAR}; the variable stays unset because the tests put a fake vendor
            # in the destination's place, so the CXI resource is never built into a run.
            "cxi": {
                "type": "communicate_xi",
                "base_url": "http://127.0.0.1:9",
                "api_key": "${OFFLINE_CXI_KEY}",
            }
        },
        "feeds": [
            {
                "name": FEED if n == 1 else f"{FEED}_{n}",
                "source": "hr_drop",
                "destination": "cxi",
                "max_rejection_rate": 0.5,
                # The tests' files are unrelated lists, not one company's exports over time: the
                # truncated-export guard (its own tests in test_changed_sync) would stop them.
                "max_removed_rate": 1.0,
                "mapping": {"unique_id": "ID", "email": "Email"},
                "options": {"import_name": "All staff" if n == 1 else f"All staff {n}"},
            }
            for n in range(1, feeds + 1)
        ],
    }
    path = root / "feeds.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    return load_feeds(path)
