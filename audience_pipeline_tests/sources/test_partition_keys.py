"""Partition keys: the file's name, a short hash only when the name is taken by other content,
and keys of earlier releases (``<name>@<10 hex chars>``) still read."""

from __future__ import annotations

import hashlib

import pytest

from audience_pipeline.sources.base import choose_partition_key, same_content, split_partition_key

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("employees.csv", ("employees.csv", None)),
        (f"employees.csv@{SHA_A[:8]}", ("employees.csv", SHA_A[:8])),
        (f"employees.csv@{SHA_A[:10]}", ("employees.csv", SHA_A[:10])),  # an earlier release's key
        ("export@company.csv", ("export@company.csv", None)),  # an @ in a name is not a hash
        (f"odd@deadbeef@{SHA_A[:8]}", ("odd@deadbeef", SHA_A[:8])),
    ],
)
def test_keys_split_into_name_and_hash(key: str, expected: tuple[str, str | None]) -> None:
    assert split_partition_key(key) == expected


def test_first_content_is_the_bare_name_and_the_same_content_keeps_its_key() -> None:
    assert choose_partition_key("employees.csv", SHA_A, {}, set()) == "employees.csv"
    known = {"employees.csv": SHA_A}
    assert choose_partition_key("employees.csv", SHA_A[:16], known, set(known)) == "employees.csv"


def test_new_content_under_a_taken_name_gets_eight_hex_chars_more_on_a_clash() -> None:
    known = {"employees.csv": SHA_A}
    assert choose_partition_key("employees.csv", SHA_B, known, set(known)) == f"employees.csv@{SHA_B[:8]}"
    clash = {"employees.csv": SHA_A, f"employees.csv@{SHA_B[:8]}": "0" * 64}  # recorded other content
    assert choose_partition_key("employees.csv", SHA_B, clash, set(clash)) == f"employees.csv@{SHA_B[:12]}"


def test_a_key_of_an_earlier_release_is_recognised_by_its_hash() -> None:
    legacy = f"employees.csv@{SHA_A[:10]}"
    assert choose_partition_key("employees.csv", SHA_A, {legacy: None}, {legacy}) == legacy
    assert (
        choose_partition_key("employees.csv", SHA_B, {legacy: None}, {legacy}) == f"employees.csv@{SHA_B[:8]}"
    )


def test_a_name_that_reads_as_a_hashed_key_always_gets_a_hash() -> None:
    name = f"report@{SHA_B[:8]}"
    assert choose_partition_key(name, SHA_A, {}, set()) == f"{name}@{SHA_A[:8]}"


def test_same_content_compares_prefixes_of_eight_chars_or_more() -> None:
    assert same_content(SHA_A, SHA_A[:8]) and same_content(SHA_A[:10], SHA_A[:16])
    assert not same_content(SHA_A, SHA_B) and not same_content(SHA_A, SHA_A[:4])
