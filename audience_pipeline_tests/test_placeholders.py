"""Placeholders: the byte pre-filter never misses one, across chunks and slices."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from audience_pipeline.placeholders import PLACEHOLDERS, placeholder_mask, placeholders_to_null


def test_mask_agrees_with_a_plain_comparison() -> None:
    rng = random.Random(1)
    words = [*PLACEHOLDERS, "N/A", "NONE", "Unknown", "#N/a", "nul", "nonE", "-1", "n/ab", "Ann", "x", ""]
    values = [None if rng.random() < 0.05 else rng.choice(words) for _ in range(5000)]
    expected = np.array([v is not None and v.lower() in PLACEHOLDERS for v in values])
    whole = pa.array(values, type=pa.large_string())
    chunked = pa.chunked_array([whole.slice(0, 1234), whole.slice(1234, 1), whole.slice(1235)])

    assert (placeholder_mask(whole) == expected).all()
    assert (placeholder_mask(chunked) == expected).all()
    assert (placeholder_mask(pa.array(values, type=pa.string()).slice(7)) == expected[7:]).all()


def test_a_column_without_placeholders_is_returned_as_is() -> None:
    values = pa.chunked_array([pa.array(["Ann", None, "n"])])

    assert placeholders_to_null(values) is values
    assert placeholders_to_null(pa.chunked_array([pa.array(["-", "a"])])).to_pylist() == [None, "a"]
