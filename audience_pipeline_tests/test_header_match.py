"""Mapped headers against the file's header line: exact first, then by case and spacing alone."""

from __future__ import annotations

import pytest

from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.header_match import AmbiguousHeader, fold, in_file_terms, match_headers


def test_fold_ignores_case_runs_of_whitespace_and_invisible_characters() -> None:
    assert fold("  First\u00a0 NAME\u200b ") == fold("first name") == "first name"
    assert fold("STRASSE") == fold("Straße")  # casefold, not lower
    assert fold("E-mail") != fold("Email")  # punctuation is a different header


def test_only_inexact_matches_are_reported_and_missing_ones_are_left_out() -> None:
    names = ["Employee ID", "EMAIL", "Phone"]

    assert match_headers(names, ["Employee ID", "Email", "Mobile"]) == {"Email": "EMAIL"}


def test_two_candidates_are_ambiguous_even_for_a_header_mapped_twice() -> None:
    with pytest.raises(AmbiguousHeader, match=r"'EMAIL' \(column 1\), ' email' \(column 2\)"):
        match_headers(["EMAIL", " email"], ["Email", "Email"])


def test_in_file_terms_renames_fields_and_attributes_and_keeps_everything_else() -> None:
    mapping = FieldMapping(
        unique_id="ID",
        email="Email",
        attributes={"start": {"header": "Start Date", "type": "date", "format": "%d/%m/%Y"}},
    )

    renamed = in_file_terms(mapping, {"Email": "EMAIL", "Start Date": "start date"})

    assert renamed.canonical_headers() == {"unique_id": "ID", "email": "EMAIL", "start": "start date"}
    assert (renamed.attributes["start"].type, renamed.attributes["start"].format) == ("date", "%d/%m/%Y")
    assert in_file_terms(mapping, {}) is mapping
