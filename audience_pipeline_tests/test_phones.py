"""Phone validity, vectorised: the same answers as ``phonenumbers`` one number at a time.

The reference is ``phonenumbers.parse`` + ``is_valid_number`` + ``format_number(E164)`` (with a
leading ``00`` read as ``+``); :func:`phones.to_e164` must agree on every value, whichever path
settles it, and must settle the usual formats without the per-row path.
"""

from __future__ import annotations

import random
import re

import numpy as np
import phonenumbers
import pyarrow as pa
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE, SUPPORTED_REGIONS

from audience_pipeline import phones
from audience_pipeline.phones import parse_phone, to_e164, valid_e164_mask

REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "BR", "JP", "AR", "IT", "CA", "AG")
FORMATS = (PhoneNumberFormat.NATIONAL, PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.E164)


def _mutations(text: str, rng: random.Random) -> list[str]:
    """``text`` and near misses: a digit changed, dropped or added, ``00`` for ``+``, other spacing."""
    positions = [i for i, c in enumerate(text) if c.isdigit()]
    i = rng.choice(positions)
    out = [
        text,
        text[:i] + str((int(text[i]) + rng.randrange(1, 10)) % 10) + text[i + 1 :],
        text[:i] + text[i + 1 :],
        text[:i] + str(rng.randrange(10)) + text[i:],
        re.sub(r"[ ()-]", rng.choice([".", "", " ", "/"]), text),
    ]
    return out + [t.replace("+", "00", 1) for t in out if t.startswith("+")]


def _sample(regions: tuple[str, ...], seed: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for region in regions:
        for kind in PhoneNumberType.values():
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            for fmt in FORMATS:
                out += _mutations(phonenumbers.format_number(example, fmt), rng)
    out += [
        "(687) 207-0030",
        "687.207.0030",
        "+1 687 207 0030",
        "+16872070030",
        "0044 20 7946 0958",
        "+44 20 7946 0958",
        "020 7946 0958",
        "+44 (0)20 7946 0958",
        "+4402079460958",
        "+39 06 1234 5678",
        "011 44 20 7946 0958",
        "+0 44 20 7946 0958",
        "+28 123 456 789",
        "+", "00", "0", "12", "123", "+12", "+123", "1-", "()", " - ",
        "+44 20 7946 0958 ext. 12",
        "０２０ ７９４６ ０９５８",
        "tel: 020 7946 0958",
        "020 7946 0958" + " " * 240,
    ]  # fmt: skip
    return out


def _per_row(values: list[str | None], region: str) -> list[str | None]:
    return [None if v is None else parse_phone(v, region) for v in values]


@pytest.mark.parametrize("region", REGIONS)
def test_vectorised_answers_equal_phonenumbers_row_by_row(region: str) -> None:
    values: list[str | None] = [*_sample(REGIONS, seed=REGIONS.index(region)), None]

    got = to_e164(pa.array(values), region).to_pylist()

    expected = _per_row(values, region)
    assert [(v, g) for v, g, e in zip(values, got, expected, strict=True) if g != e] == []
    valid = sum(e is not None for e in expected)
    assert len(values) // 5 < valid < len(values) * 0.9  # the sample has both kinds


def test_every_region_example_in_every_format() -> None:
    rng = random.Random(5)
    values = []
    for region in sorted(SUPPORTED_REGIONS):
        for kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                values += [phonenumbers.format_number(example, f) for f in FORMATS]
    for default in ("US", "GB", "DE", "JP", "BR", "XX"):
        sample = rng.sample(values, 1500)
        got = to_e164(pa.array(sample), default).to_pylist()
        expected = _per_row(sample, default)
        assert [(v, g) for v, g, e in zip(sample, got, expected, strict=True) if g != e] == []


def test_validity_does_not_depend_on_how_a_number_is_written() -> None:
    unassigned = ["+16872070030", "(687) 207-0030", "687.207.0030", "+1 687 207 0030", "001 687 207 0030"]
    assigned = ["+12125550100", "(212) 555-0100", "212.555.0100", "+1 212 555 0100", "001 212 555 0100"]

    got = to_e164(pa.array(unassigned + assigned), "US").to_pylist()

    assert got == [None] * 5 + ["+12125550100"] * 5
    assert valid_e164_mask(pa.array(["+16872070030", "+12125550100"])).tolist() == [False, True]


def test_usual_formats_never_reach_the_per_row_path(per_row_phones: list[str]) -> None:
    values = [
        "(687) 207-0030",
        "687.207.0030",
        "0044 20 7946 0958",
        "+44 20 7946 0958",
        "+49 30 123456",
        "+33 6 12 34 56 78",
        "+91 98765 43210",
        "+61 412 345 678",
        "+55 11 91234 5678",
        "+81 3-1234-5678",
        "+81 03-1234-5678",
        "+44 20 7946 0958 ext. 1",
    ]

    to_e164(pa.array(values), "US")
    to_e164(pa.array(["020 7946 0958", "07400 123456"]), "GB")
    to_e164(pa.array(["03-1234-5678", "090-1234-5678"]), "JP")
    to_e164(pa.array(["(011) 4123-4567", "011 15 2345-6789"]), "AR")

    assert per_row_phones == ["+44 20 7946 0958 ext. 1"]


def test_canonical_form_is_what_the_schema_accepts() -> None:
    values = ["+442079460958", "+4402079460958", "+16872070030", "+12125550100", "+0123456789", "+2812345"]

    got = valid_e164_mask(pa.array([*values, None])).tolist()

    assert got == [True, False, False, True, False, False, False]
    assert to_e164(pa.array(["+4402079460958"]), "US").to_pylist() == ["+442079460958"]


def test_every_country_code_has_vectorised_rules() -> None:
    """Every pattern of the metadata compiles in RE2 and every transform rule can be followed, so no
    country falls back to phonenumbers wholesale."""
    missing = [cc for cc in COUNTRY_CODE_TO_REGION_CODE if phones._country(cc).parsing is None]
    assert missing == []
    assert all(phones._home(r) is not None for r in SUPPORTED_REGIONS)


def test_chunked_and_sliced_input() -> None:
    values = ["(212) 555-0100", None, "+44 20 7946 0958", "n/a", "+16872070030"]
    whole = pa.array(values, type=pa.large_string())
    chunked = pa.chunked_array([whole.slice(0, 2), whole.slice(2)])

    expected = ["+12125550100", None, "+442079460958", None, None]
    assert to_e164(chunked, "US").to_pylist() == expected
    assert to_e164(whole.slice(2), "us").to_pylist() == expected[2:]  # the region in any case
    assert np.array_equal(valid_e164_mask(chunked), [False] * 5)


def test_slices_of_a_long_column_give_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phones, "_SLICE_ROWS", 7)
    values: list[str | None] = [*_sample(("US", "GB"), seed=9)[:400], None, "+12125550100"]
    chunked = pa.chunked_array([pa.array(values[:123]), pa.array(values[123:])])

    got = to_e164(chunked, "US")

    assert got.to_pylist() == _per_row(values, "US")
    e164 = [v for v in got.to_pylist() if v] + ["+16872070030", "+4402079460958"]
    assert valid_e164_mask(pa.array(e164)).tolist() == [True] * (len(e164) - 2) + [False, False]


def test_the_schema_takes_normalizes_verdict_only_for_the_very_same_buffers() -> None:
    column = to_e164(pa.chunked_array([pa.array(["+16872070030", "+12125550100"])]), "US")
    judged = pa.chunked_array([pa.array(["+16872070030", "+12125550100"], pa.large_string())])
    phones.remember_verdict(judged, np.array([True, True]))  # deliberately wrong, to see it used

    assert valid_e164_mask(pa.array(["+16872070030", "+12125550100"], pa.large_string())).tolist() == [
        False,
        True,
    ]  # equal values in other buffers: judged afresh
    assert valid_e164_mask(judged).tolist() == [True, True]  # the same buffers: the kept verdict
    assert valid_e164_mask(judged).tolist() == [False, True]  # taken once only
    assert column.to_pylist() == [None, "+12125550100"]


def test_patterns_re2_cannot_run_leave_the_numbers_to_phonenumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    values = ["(212) 555-0100", "+44 20 7946 0958", "+16872070030", "020 7946 0958"]
    phones._country.cache_clear()
    phones._home.cache_clear()
    monkeypatch.setattr(phones, "_re2_accepts", lambda *patterns: False)
    try:
        assert to_e164(pa.array(values), "US").to_pylist() == _per_row(values, "US")
        assert phones._country(44).parsing is None
    finally:
        monkeypatch.undo()
        phones._country.cache_clear()
        phones._home.cache_clear()
    assert phones._country(44).parsing is not None
