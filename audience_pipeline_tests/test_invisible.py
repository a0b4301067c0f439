"""Invisible characters leave ids and emails, vectorised, and only when a column has any."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from audience_pipeline.csv_reader import ParsedCsv
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.invisible import strip_invisible, strip_invisible_text
from audience_pipeline.normalize import normalize

INVISIBLE = "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2060\u2064\ufeff"


def test_every_invisible_character_is_stripped_and_visible_ones_are_kept() -> None:
    values = pa.chunked_array([[f"a{INVISIBLE}b", "é\u00a0ü", None], pa.array([], pa.string())])

    assert strip_invisible(values).to_pylist() == ["ab", "é\u00a0ü", None]
    assert strip_invisible_text(f"x{INVISIBLE}y") == "xy"


def test_an_ascii_column_is_returned_as_it_is() -> None:
    ascii_only = pa.chunked_array([["E1", "E2"]])
    sliced = pa.chunked_array([pa.array(["\u200bx", "E2"]).slice(1)])  # the buffer holds more

    assert strip_invisible(ascii_only) is ascii_only
    assert strip_invisible(sliced) is sliced


def test_normalize_strips_ids_and_emails_but_not_names() -> None:
    table = pa.table({"ID": ["E1\u200b"], "Mail": ["\ufeffA@x.org"], "Name": ["An\u200dn"]})
    parsed = ParsedCsv(Path("e.csv"), ["ID", "Mail", "Name"], table, np.array([2]), "utf-8", ",")

    frame = normalize(parsed, FieldMapping(unique_id="ID", email="Mail", first_name="Name"))

    assert frame[["unique_id", "email", "first_name"]].values.tolist() == [["E1", "a@x.org", "An\u200dn"]]
