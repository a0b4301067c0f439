"""The shared JSON-batch encoder, packer and concurrent sender.

The encoder is checked property-style against ``json.loads``/``json.dumps`` over seeded random
nasty strings (no hypothesis dependency), and the packer against the limits it must respect.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from audience_pipeline.destinations.json_batches import (
    Batch,
    encode_records,
    is_ascii,
    pack_batches,
    send_concurrently,
)

NASTY = [
    '"',
    "\\",
    "\n",
    "\r",
    "\t",
    "\b",
    "\f",
    "/",
    "\x7f",
    "\u2028",
    "é",
    "Ω",
    "😀",
    "\\u0041",
    "'",
    "}",
    "]",
    ",",
]
NASTY += [chr(c) for c in range(0x20)]


def _nasty_string(rng: random.Random) -> str:
    pieces = [
        rng.choice(NASTY) if rng.random() < 0.5 else rng.choice("abcXYZ019 ")
        for _ in range(rng.randint(1, 12))
    ]
    return "".join(pieces)


def _strings(values: list[str | None]) -> pd.Series:
    return pd.Series(values, dtype="str")


def _expected(value: str | None) -> bool:
    return value is not None and value != ""


@pytest.mark.parametrize("seed", range(5))
def test_random_nasty_strings_round_trip_like_json_dumps(seed: int) -> None:
    rng = random.Random(seed)
    rows = 300
    columns = {
        name: [
            None if rng.random() < 0.1 else "" if rng.random() < 0.05 else _nasty_string(rng)
            for _ in range(rows)
        ]
        for name in ("a", "b", "c")
    }
    frame = pd.DataFrame({name: _strings(values) for name, values in columns.items()})
    spec = {"id": "a", 'we"ird\\key\n': "b", "nested": {"c": "c", "again": "a"}}

    encoded = encode_records(frame, spec).to_pylist()

    assert len(encoded) == rows
    for i, text in enumerate(encoded):
        expected: dict = {}
        if _expected(columns["a"][i]):
            expected["id"] = columns["a"][i]
        if _expected(columns["b"][i]):
            expected['we"ird\\key\n'] = columns["b"][i]
        nested = {k: columns[col][i] for k, col in (("c", "c"), ("again", "a")) if _expected(columns[col][i])}
        expected["nested"] = nested
        assert json.loads(text) == expected
        # Same text as json.dumps in compact, UTF-8 form: key order kept, nothing extra.
        assert text == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))
    terminated = encode_records(frame, spec, trailing_comma=True).to_pylist()
    assert terminated == [text + "," for text in encoded]


def test_control_characters_use_json_dumps_escapes() -> None:
    every = "".join(chr(c) for c in range(0x20)) + '"\\'
    frame = pd.DataFrame({"v": _strings([every])})
    (text,) = encode_records(frame, {"v": "v"}).to_pylist()
    assert text == json.dumps({"v": every}, ensure_ascii=False, separators=(",", ":"))
    assert "\\n" in text and "\\u0000" in text and "\\u001f" in text


def test_nulls_empties_and_missing_members() -> None:
    frame = pd.DataFrame({"a": _strings([None, "", "x", None]), "b": _strings([None, None, None, "y"])})
    encoded = encode_records(frame, {"a": "a", "b": "b", "n": {"a": "a"}}).to_pylist()
    assert encoded == ['{"n":{}}', '{"n":{}}', '{"a":"x","n":{"a":"x"}}', '{"b":"y","n":{}}']
    assert encode_records(frame, {"a": "a", "b": "b"}).to_pylist() == ["{}", "{}", '{"a":"x"}', '{"b":"y"}']
    assert encode_records(frame, {"b": "b"}, trailing_comma=True).to_pylist()[0] == "{},"
    assert encode_records(frame, {}, trailing_comma=True).to_pylist() == ["{},"] * 4


def test_empty_cells_are_left_out_with_or_without_nulls_and_in_slices() -> None:
    no_nulls = pd.DataFrame({"a": _strings(["", "x", "y", ""])})
    assert encode_records(no_nulls, {"a": "a"}).to_pylist() == ["{}", '{"a":"x"}', '{"a":"y"}', "{}"]
    assert encode_records(no_nulls.iloc[1:3], {"a": "a"}).to_pylist() == ['{"a":"x"}', '{"a":"y"}']
    assert encode_records(no_nulls.iloc[2:], {"a": "a"}).to_pylist() == ['{"a":"y"}', "{}"]


def test_is_ascii_reads_only_the_values_of_a_slice() -> None:
    values = pa.array(["abc", None, "é", "xyz"], pa.large_string())
    assert not is_ascii(values)
    assert is_ascii(values.slice(0, 2)) and is_ascii(values.slice(3))
    assert is_ascii(pa.array([], pa.large_string())) and is_ascii(pa.array([None], pa.string()))


def test_named_arrays_encode_like_a_frame() -> None:
    frame = pd.DataFrame({"a": _strings(["x", None]), "n": [1, 2]})
    columns = {"a": pa.array(["x", None], pa.large_string()), "n": frame["n"]}
    assert encode_records(columns, {"a": "a", "n": "n"}).to_pylist() == ['{"a":"x","n":1}', '{"n":2}']
    assert encode_records(frame, {"a": "a", "n": "n"}).to_pylist() == ['{"a":"x","n":1}', '{"n":2}']
    with pytest.raises(ValueError, match="differ in length"):
        encode_records({"a": columns["a"], "b": pa.array(["y"])}, {"a": "a"})


def test_numbers_and_booleans_are_json_scalars() -> None:
    frame = pd.DataFrame({"i": [1, -2], "f": [1.5, np.nan], "t": [True, False]})
    encoded = encode_records(frame, {"i": "i", "f": "f", "t": "t"}).to_pylist()
    assert [json.loads(t) for t in encoded] == [{"i": 1, "f": 1.5, "t": True}, {"i": -2, "t": False}]


def test_result_type_empty_frame_and_unknown_column() -> None:
    frame = pd.DataFrame({"a": _strings(["x"])})
    assert encode_records(frame, {"a": "a"}).type == pa.large_string()
    assert len(encode_records(frame.iloc[:0], {"a": "a"})) == 0
    with pytest.raises(KeyError, match="nope"):
        encode_records(frame, {"a": "nope"})


def _records(n: int, width: int = 5) -> pa.Array:
    rng = random.Random(n)
    return pa.array(
        ['{"id":"' + "x" * rng.randint(1, width) + f'{i}"' + "}" for i in range(n)], pa.large_string()
    )


@pytest.mark.parametrize(
    ("max_rows", "max_bytes"), [(1, 10_000), (7, 10_000), (1000, 120), (1000, 60), (3, 95)]
)
def test_pack_batches_respects_limits_and_keeps_every_row(max_rows: int, max_bytes: int) -> None:
    records = _records(101)
    head, tail = b'{"token":"t","data":[', b"]}"
    batches = list(
        pack_batches(records, head=head, tail=tail, max_rows=max_rows, max_bytes=max_bytes, first_row=10)
    )

    decoded: list[dict] = []
    position = 10
    for batch in batches:
        assert batch.first_row == position
        assert 1 <= batch.row_count <= max_rows
        assert len(batch.body) <= max_bytes
        assert batch.body.startswith(head) and batch.body.endswith(tail)
        data = json.loads(batch.body)["data"]
        assert len(data) == batch.row_count
        decoded += data
        position += batch.row_count
    assert decoded == [json.loads(r) for r in records.to_pylist()]

    # Records that already end with their comma are cut and wrapped into the very same bodies.
    terminated = pa.array([r + "," for r in records.to_pylist()], pa.large_string())
    again = pack_batches(
        terminated,
        head=head,
        tail=tail,
        max_rows=max_rows,
        max_bytes=max_bytes,
        first_row=10,
        trailing_comma=True,
    )
    assert [(b.first_row, b.row_count, b.body) for b in again] == [
        (b.first_row, b.row_count, b.body) for b in batches
    ]


def test_pack_batches_is_greedy_and_exact_at_the_byte_limit() -> None:
    records = pa.array(["{}"] * 10, pa.large_string())
    # head 1 + tail 1 + 3 records of 2 bytes + 2 commas = 10 bytes exactly.
    batches = list(pack_batches(records, head=b"[", tail=b"]", max_rows=100, max_bytes=10))
    assert [b.row_count for b in batches] == [3, 3, 3, 1]
    assert batches[0].body == b"[{},{},{}]"


def test_pack_batches_names_a_row_that_cannot_fit() -> None:
    records = pa.array(["{}", '{"long":"' + "x" * 100 + '"}', "{}"], pa.large_string())
    with pytest.raises(ValueError, match="row 41 "):
        list(pack_batches(records, head=b"[", tail=b"]", max_rows=10, max_bytes=50, first_row=40))


def test_pack_batches_of_nothing_and_chunked_input() -> None:
    assert (
        list(pack_batches(pa.array([], pa.large_string()), head=b"[", tail=b"]", max_rows=5, max_bytes=9))
        == []
    )
    chunked = pa.chunked_array([["{}", "{}"], ["{}"]], pa.large_string())
    (batch,) = pack_batches(chunked, head=b"[", tail=b"]", max_rows=5, max_bytes=100)
    assert batch.body == b"[{},{},{}]"


def _batches(n: int) -> list[Batch]:
    return [Batch(first_row=i, row_count=1, body=b"{}") for i in range(n)]


def test_send_concurrently_keeps_order_and_bounds_in_flight() -> None:
    lock = threading.Lock()
    in_flight = peak = 0

    def send(batch: Batch) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002 * (batch.first_row % 3))
        with lock:
            in_flight -= 1
        return batch.first_row

    assert send_concurrently(send, _batches(40), max_in_flight=4) == list(range(40))
    assert 1 < peak <= 4


def test_send_concurrently_stops_starting_batches_after_a_failure() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def send(batch: Batch) -> int:
        with lock:
            started.append(batch.first_row)
        if batch.first_row == 5:
            raise RuntimeError("boom at 5")
        time.sleep(0.01)
        return batch.first_row

    with pytest.raises(RuntimeError, match="boom at 5"):
        send_concurrently(send, _batches(100), max_in_flight=3)
    assert 5 in started
    assert max(started) <= 5 + 3  # only batches already started (or racing in) ran


def test_an_interrupt_in_the_calling_thread_stops_every_sender() -> None:
    started: list[int] = []
    lock = threading.Lock()
    caller = threading.current_thread()

    def send(batch: Batch) -> int:
        with lock:
            started.append(batch.first_row)
            count = len(started)
        if threading.current_thread() is caller and count >= 10:
            raise KeyboardInterrupt  # what Ctrl-C or a terminated Dagster run raises here
        time.sleep(0.005)
        return batch.first_row

    with pytest.raises(KeyboardInterrupt):
        send_concurrently(send, _batches(500), max_in_flight=4)
    assert len(started) < 50  # the other senders finished their request and took no more


def test_send_concurrently_closes_a_generator_source() -> None:
    closed = False

    def source() -> Iterator[Batch]:
        nonlocal closed
        try:
            yield from _batches(3)
            yield from _batches(3)
        finally:
            closed = True

    def send(batch: Batch) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        send_concurrently(send, source(), max_in_flight=2)
    assert closed


def test_send_concurrently_pulls_batches_lazily() -> None:
    produced = 0
    lock = threading.Lock()
    high = 0

    def source() -> Iterator[Batch]:
        nonlocal produced, high
        for batch in _batches(30):
            produced += 1
            with lock:
                high = max(high, produced - done)
            yield batch

    done = 0

    def send(batch: Batch) -> None:
        nonlocal done
        time.sleep(0.001)
        with lock:
            done += 1

    send_concurrently(send, source(), max_in_flight=2)
    assert produced == 30
    assert high <= 3  # at most max_in_flight bodies alive besides the one being built


def test_send_concurrently_rejects_a_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        send_concurrently(lambda b: b, _batches(1), max_in_flight=0)
