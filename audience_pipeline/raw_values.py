"""The file's own text for cells that normalisation changed, so rejects show what the file says.

Normalisation lower-cases emails, writes phone numbers in E.164, trims, joins lines and drops
invisible characters. A reject showing ``bad@example`` for the file's ``Bad@Example`` sends a
person looking for a value that is not there. Holding every raw column until validation ends would
hold a large file twice, so only the cells that changed are kept (one vectorised comparison per
column that normalisation touched), and only reject rows are ever looked up.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class RawValues:
    """Per canonical column: the row positions normalisation changed, and their raw text."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[np.ndarray, pa.Array]] = {}

    def keep(self, name: str, raw: pa.ChunkedArray, normalised: pa.ChunkedArray) -> None:
        """Remember the raw text of the rows where ``normalised`` differs (blank-to-null is no change)."""
        if normalised is raw:
            return
        if normalised.type != raw.type:
            normalised = normalised.cast(raw.type)
        changed = pc.fill_null(pc.not_equal(raw, normalised), False)
        if not pc.any(changed).as_py():
            return
        positions = np.flatnonzero(changed.to_numpy(zero_copy_only=False))
        self._kept[name] = (positions, raw.filter(changed).combine_chunks())

    def lookup(self, columns: list[str | None], positions: np.ndarray) -> dict[int, str]:
        """``{i: raw text}`` for each ``i`` whose cell (row ``positions[i]`` of column ``columns[i]``)
        was changed by normalisation; vectorised per column."""
        out: dict[int, str] = {}
        names = np.array(columns, dtype=object)
        for name, (kept, values) in self._kept.items():
            which = np.flatnonzero(names == name)
            if not len(which):
                continue
            wanted = positions[which]
            at = np.minimum(np.searchsorted(kept, wanted), len(kept) - 1)
            hit = kept[at] == wanted
            out.update(zip(which[hit].tolist(), values.take(pa.array(at[hit])).to_pylist(), strict=True))
        return out
