"""What an invalid value in an optional column does to its row (the feed's
``invalid_optional_fields``).

An employee whose email is fine but whose phone says ``12`` should still get the email. So by
default (``clear``) the invalid optional value is emptied, the row is imported without it and the
report lists the value as a ``warning``. The row is rejected when a required field is wrong (the id,
a required attribute, the only mapped channel) or when clearing leaves it with neither an email
address nor a phone number. ``reject`` keeps the strict rule: any invalid value rejects its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from audience_pipeline.feeds.model import InvalidOptionalFields

CHANNELS = ("email", "mobile_phone")
CLEARED_NOTE = ": cleared, the employee is imported without it"


@dataclass
class Triage:
    """Which of pandera's failure cases reject their row and which only clear a cell."""

    rejected: np.ndarray  # per case: it belongs to a row that is rejected
    cleared: np.ndarray  # per case: its cell is cleared and its row kept
    stranded: np.ndarray  # row positions rejected only because clearing left no channel
    cells: dict[str, np.ndarray]  # the cleared cells: column -> row positions


def triage(
    frame: pd.DataFrame, cases: pd.DataFrame, schema: pa.DataFrameSchema, policy: InvalidOptionalFields
) -> Triage:
    """Sort the failure cases of ``frame`` (one per cell and check) by what they do to their row.

    Cases without a row (the frame does not match the schema at all) all count as rejects, for the
    caller to report as the bug they are.
    """
    optional = [name for name, column in schema.columns.items() if column.nullable]
    clearable = (cases["schema_context"] == "Column").to_numpy() & cases["column"].isin(optional).to_numpy()
    if policy == "reject" or not clearable.any() or cases["index"].isna().any():
        everything = np.ones(len(cases), dtype=bool)
        return Triage(everything, ~everything, np.zeros(0, dtype=np.int64), {})
    positions = frame.index.get_indexer(cases["index"].astype("int64"))
    columns = cases["column"].to_numpy()
    soft = clearable & ~np.isin(positions, positions[~clearable])
    stranded = _stranded(frame, positions[soft], columns[soft])
    cleared = soft & ~np.isin(positions, stranded)
    cells = {str(c): np.unique(positions[cleared & (columns == c)]) for c in np.unique(columns[cleared])}
    return Triage(~cleared, cleared, stranded, cells)


def _stranded(frame: pd.DataFrame, positions: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Rows among ``positions`` whose email and phone would both be empty once cleared."""
    if not all(c in frame.columns for c in CHANNELS):
        return np.zeros(0, dtype=np.int64)  # one channel mapped: it is required, never cleared
    rows = np.unique(positions)
    left = np.zeros(len(rows), dtype=bool)
    for name in CHANNELS:
        present = frame[name].notna().to_numpy()[rows]
        present &= ~np.isin(rows, positions[columns == name])
        left |= present
    return rows[~left]


def clear_cells(frame: pd.DataFrame, cells: dict[str, np.ndarray]) -> None:
    """Empty ``frame[column]`` at the row positions given per column, in place."""
    for name, rows in cells.items():
        if not len(rows):
            continue
        series = frame[name]
        mask = np.zeros(len(frame), dtype=bool)
        mask[rows] = True
        dtype = series.dtype
        if not (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
            frame[name] = series.mask(mask)
            continue
        values = pa_arrow.array(series, type=pa_arrow.large_string(), from_pandas=True)
        emptied = pc.if_else(pa_arrow.array(mask), pa_arrow.scalar(None, values.type), values)
        frame[name] = pd.Series(dtype.__from_arrow__(emptied), index=frame.index, copy=False)
