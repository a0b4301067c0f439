"""Find the feed's mapped headers in a file's header line as people write them.

HR systems and the people who edit exports change a header's case (``EMAIL`` for ``Email``) and
its spacing (``First  Name``, ``Employee ID ``), and paste invisible characters into it. A mapped
header matches a file header exactly; failing that, it matches the one file header that is equal
after case folding, collapsing runs of whitespace, and dropping invisible characters. Several
such headers are ambiguous: the file is refused naming them, since picking one could send the
wrong column. No match at all is left to :func:`normalize.check_mapping`, which names what is
missing and suggests the closest header.
"""

from __future__ import annotations

from collections.abc import Iterable

from audience_pipeline.feeds.model import CANONICAL_FIELDS, AttributeSpec, FieldMapping
from audience_pipeline.invisible import strip_invisible_text


class AmbiguousHeader(ValueError):
    """A mapped header matches several file headers once case and spacing are ignored."""


def fold(name: str) -> str:
    """The form headers are compared in: no invisible characters, single spaces, case folded."""
    return " ".join(strip_invisible_text(name).split()).casefold()


def match_headers(names: list[str], mapped: Iterable[str]) -> dict[str, str]:
    """``{mapped header: file header}`` for each mapped header found only by its folded form.

    Raises :class:`AmbiguousHeader` when a mapped header folds to more than one file header.
    """
    present = set(names)
    by_fold: dict[str, list[int]] = {}
    for column, name in enumerate(names, start=1):
        by_fold.setdefault(fold(name), []).append(column)
    matches: dict[str, str] = {}
    for header in dict.fromkeys(mapped):
        if header in present:
            continue
        columns = by_fold.get(fold(header), [])
        if len(columns) > 1:
            candidates = ", ".join(f"{names[c - 1]!r} (column {c})" for c in columns)
            raise AmbiguousHeader(
                f"the feed's header {header!r} matches {len(columns)} headers of the file when case and "
                f"spacing are ignored: {candidates}; rename the extra column or map the exact header"
            )
        if columns:
            matches[header] = names[columns[0] - 1]
    return matches


def mapped_count(names: Iterable[str], mapped: Iterable[str]) -> int:
    """How many of the mapped headers are among ``names``, exactly or folded."""
    folded = {fold(n) for n in names}
    return sum(fold(h) in folded for h in mapped)


def in_file_terms(mapping: FieldMapping, matches: dict[str, str]) -> FieldMapping:
    """``mapping`` naming the file's own headers, so that lookups and reject labels use them."""
    if not matches:
        return mapping
    fields = {
        name: matches.get(header, header) for name in CANONICAL_FIELDS if (header := getattr(mapping, name))
    }
    attributes = {
        name: AttributeSpec(**{**spec.model_dump(), "header": matches.get(spec.header, spec.header)})
        for name, spec in mapping.attributes.items()
    }
    return mapping.model_copy(update={**fields, "attributes": attributes})
