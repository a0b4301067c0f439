"""Text that HR systems write where a value is missing: ``n/a``, ``-``, ``unknown``...

These are not values. Kept, ``n/a`` in a phone column is an invalid phone number, ``unknown``
becomes a department, and two people with the id ``-`` are duplicates. So they count as empty
cells everywhere (a placeholder in a required column reads as "empty but required").

A placeholder is short and starts with one of a few bytes, so a numpy pass over the first byte
and length of each value picks the few candidates; only those are lower-cased and compared.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.arrow_strings import string_chunks

PLACEHOLDERS = ("n/a", "-", "none", "null", "#n/a", "unknown")
"""Compared after trimming, ignoring case."""

_LENGTHS = np.zeros(max(len(p) for p in PLACEHOLDERS) + 2, dtype=bool)
_LENGTHS[[len(p) for p in PLACEHOLDERS]] = True
_FIRST_BYTES = np.zeros(256, dtype=bool)
for _p in PLACEHOLDERS:
    _FIRST_BYTES[[ord(_p[0]), ord(_p[0].upper())]] = True


def placeholder_mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value is one of :data:`PLACEHOLDERS` (any case; nulls: false)."""
    out: list[np.ndarray] = []
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk, (offsets, data) in zip(chunks, string_chunks(values), strict=True):
        lengths = offsets[1:] - offsets[:-1]
        rows = np.flatnonzero(_LENGTHS[np.minimum(lengths, len(_LENGTHS) - 1)])
        rows = rows[_FIRST_BYTES[data[offsets[rows]]]]
        hit = np.zeros(len(chunk), dtype=bool)
        if len(rows):
            lowered = pc.utf8_lower(chunk.take(pa.array(rows)))
            hit[rows] = pc.fill_null(pc.is_in(lowered, pa.array(PLACEHOLDERS, lowered.type)), False)
        out.append(hit)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def placeholders_to_null(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column with placeholders as nulls; the same object when it has none."""
    hit = placeholder_mask(values)
    if not hit.any():
        return values
    return pc.if_else(pa.array(hit), pa.scalar(None, values.type), values)
