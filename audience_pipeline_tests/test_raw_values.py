"""Raw text is kept only for the cells normalisation changed, and looked up only for rejects."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audience_pipeline.raw_values import RawValues


def test_only_changed_cells_are_kept_and_found_by_column_and_row() -> None:
    raw = pa.chunked_array([["a@x.org", "B@X.ORG"], ["", "C@x.org "]])
    normalised = pa.chunked_array([["a@x.org", "b@x.org", None, "c@x.org"]])
    kept = RawValues()

    kept.keep("email", raw, normalised)
    kept.keep("unique_id", raw, raw)  # untouched: nothing kept

    columns = ["email", "email", "email", "email", "unique_id", None]
    positions = np.array([0, 1, 2, 3, 1, 3])
    assert kept.lookup(columns, positions) == {1: "B@X.ORG", 3: "C@x.org "}
    assert kept.lookup([], np.zeros(0, dtype=np.int64)) == {}


def test_a_column_without_changes_keeps_nothing() -> None:
    raw = pa.chunked_array([["E1", ""]])
    kept = RawValues()

    kept.keep("unique_id", raw, pa.chunked_array([["E1", None]]))

    assert kept.lookup(["unique_id"], np.array([0])) == {}
    assert not kept._kept
