"""JSON request bodies for vendors that take rows as JSON batches (Yesmail, Altcraft).

A million rows through ``to_dict("records")`` + ``json.dumps`` costs 20 s or more (PERF-NOTES);
here each row's JSON object, comma included, is assembled column-wise by one pyarrow join, so the
encoded buffer already is the comma-separated member list. Batches are cut from the encoded byte
lengths (a vendor's size limit is met exactly, never guessed) as slices of that buffer between
the envelope's head and tail. ``send_concurrently`` pushes batches through the thread-safe sync
HTTP client with a bounded number in flight (threads beat an ``AsyncClient`` on CPU per request
here), pulling batches lazily so only those in flight are held in memory.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Batch", "encode_in_slices", "encode_records", "is_ascii", "pack_batches", "send_concurrently"]

T = TypeVar("T")

SLICE_ROWS = 50_000
"""Rows encoded at a time by :func:`encode_in_slices`: small enough that the first requests leave
after a few tens of milliseconds, large enough that kernel-call overhead stays negligible."""

_STR = pa.large_string()
_EMPTY = pa.scalar("", _STR)
# The escapes json.dumps writes; every other control character becomes \u00XX.
_SHORT_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_COMMA = pa.scalar(b",", pa.large_binary())
_COMMA_SEPARATOR = pa.scalar(b"", pa.large_binary())
_CONTROL = r"[\x00-\x1f]"


@dataclass(frozen=True)
class Batch:
    """One request: rows ``first_row .. first_row + row_count - 1`` of the submitted frame."""

    first_row: int
    row_count: int
    body: bytes
    records: pa.Array | None = field(default=None, repr=False, compare=False)
    """The batch's encoded rows, so a vendor that refuses the size can re-pack them smaller."""


def _s(value: str) -> pa.Scalar:
    return pa.scalar(value, _STR)


Columns = pd.DataFrame | Mapping[str, pd.Series | pa.Array | pa.ChunkedArray]
"""What :func:`encode_records` reads: a frame, or named columns of equal length (a vendor that
derives a column, like Yesmail's lower-cased ids, passes arrays without building a frame)."""


def _column(frame: Columns, name: str) -> pa.Array:
    names = frame.columns if isinstance(frame, pd.DataFrame) else frame.keys()
    if name not in names:
        raise KeyError(f"column {name!r} is not in the frame; columns: {list(names)}")
    values = frame[name]
    array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, from_pandas=True)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _row_count(frame: Columns) -> int:
    if isinstance(frame, pd.DataFrame):
        return len(frame)
    lengths = {len(values) for values in frame.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns differ in length: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _offsets(values: pa.Array) -> np.ndarray:
    """The len + 1 value offsets of a (large_)string array, as a zero-copy numpy view."""
    wide = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64 if wide else np.int32)
    return offsets[values.offset : values.offset + len(values) + 1]


def _text_bytes(values: pa.Array) -> np.ndarray:
    """The UTF-8 bytes of a (large_)string array's values, as a zero-copy numpy view."""
    offsets = _offsets(values)
    data = values.buffers()[2]
    if data is None or len(values) == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]


def is_ascii(values: pa.Array) -> bool:
    """Whether every value of a string array is ASCII: one numpy reduction over the bytes, ten
    times cheaper than ``pc.string_is_ascii`` over a million short strings."""
    data = _text_bytes(values)
    return len(data) == 0 or int(data.max()) < 0x80


def _has_empty(values: pa.Array) -> bool:
    """Whether a string array holds an empty value. Without nulls this needs only the offsets;
    with nulls (whose length is 0 too) the lengths kernel tells them apart."""
    if values.null_count == 0:
        return bool(len(values)) and int(np.diff(_offsets(values)).min()) == 0
    return pc.min(pc.binary_length(values)).as_py() == 0


def _needs_escape(values: pa.Array) -> bool:
    """Whether any value holds a quote, a backslash or a control character: one numpy pass over
    the bytes (a regex kernel over a million short strings costs several times more)."""
    data = _text_bytes(values)
    return len(data) > 0 and bool(data.min() < 0x20 or (data == 0x22).any() or (data == 0x5C).any())


def _escape(values: pa.Array) -> pa.Array:
    """JSON string escaping; the common case (nothing to escape) costs one pass over the bytes."""
    if len(values) == 0 or not _needs_escape(values):
        return values
    values = pc.replace_substring(values, "\\", "\\\\")
    values = pc.replace_substring(values, '"', '\\"')
    if not pc.any(pc.match_substring_regex(values, _CONTROL)).as_py():
        return values
    for code in range(0x20):
        char = chr(code)
        if pc.any(pc.match_substring(values, char)).as_py():
            values = pc.replace_substring(values, char, _SHORT_ESCAPES.get(char, f"\\u{code:04x}"))
    return values


def _json_value(values: pa.Array) -> pa.Array | _Quoted:
    """Each cell as JSON text, null where the cell is null or empty (so its key is left out);
    strings come back unquoted as :class:`_Quoted`."""
    kind = values.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return pc.cast(values, _STR)
    if pa.types.is_floating(kind):
        finite = pc.is_finite(values)
        return pc.cast(pc.if_else(finite, values, pa.scalar(None, kind)), _STR)
    if pa.types.is_null(kind):
        return pa.nulls(len(values), _STR)
    text = pc.cast(values, _STR) if not pa.types.is_large_string(kind) else values
    if _has_empty(text):  # lengths only: no data scan
        text = pc.if_else(pc.equal(text, _EMPTY), pa.scalar(None, _STR), text)
    return _Quoted(_escape(text))


class _Quoted:
    """A string column whose quotes are added in the same join that adds its key, saving a pass."""

    def __init__(self, text: pa.Array) -> None:
        self.text = text


def _objects(frame: Columns, spec: Mapping[str, str | Mapping], rows: int, close: str = "}") -> pa.Array:
    # A member is written '"key":value' when no earlier member of its row is present, else with a
    # leading comma; absent members are ''. A member that is never absent is not joined on its
    # own: its pieces go straight into the final join, which builds every object in one pass
    # over the output (binary_join_element_wise's null_handling="skip" would drop trailing
    # all-null rows in pyarrow 26, and cutting commas afterwards costs two more passes).
    parts: list[pa.Array] = []
    earlier: pa.Array | None = None  # per row: has a member been written before this one?
    for key, source in spec.items():
        name = json.dumps(str(key), ensure_ascii=False) + ":"
        if isinstance(source, Mapping):
            value: pa.Array | _Quoted = _objects(frame, source, rows)
        else:
            value = _json_value(_column(frame, source))
        quoted = isinstance(value, _Quoted)
        if earlier is None:
            prefix: pa.Scalar | pa.Array = _s(name + ('"' if quoted else ""))
        elif pc.all(earlier).as_py():
            prefix = _s("," + name + ('"' if quoted else ""))
        else:
            q = '"' if quoted else ""
            prefix = pc.if_else(earlier, _s("," + name + q), _s(name + q))
        values = value.text if isinstance(value, _Quoted) else value
        pieces = (prefix, values, _s('"')) if quoted else (prefix, values)
        if values.null_count == 0:  # always present: its pieces go straight into the final join
            parts.extend(pieces)
        else:
            parts.append(pc.fill_null(pc.binary_join_element_wise(*pieces, _EMPTY), _EMPTY))
        present = pc.is_valid(values)
        earlier = present if earlier is None else pc.or_(earlier, present)
    if rows == 0 or not parts:
        return pa.array(["{" + close] * rows, _STR)
    return _join([_s("{"), *parts, _s(close)])


def _join(pieces: list[pa.Array | pa.Scalar]) -> pa.Array:
    """Concatenate row-wise. The kernel's cost grows with the number of pieces, so constant
    pieces side by side (a closing quote and the next key) are merged first: 17 pieces instead
    of 25 for a Yesmail member, a third less time in the largest step of the encoding."""
    merged: list[pa.Array | pa.Scalar] = []
    for piece in pieces:
        if isinstance(piece, pa.Scalar) and merged and isinstance(merged[-1], pa.Scalar):
            merged[-1] = _s(merged[-1].as_py() + piece.as_py())
        else:
            merged.append(piece)
    return pc.binary_join_element_wise(*merged, _EMPTY)


def encode_records(
    frame: Columns, spec: Mapping[str, str | Mapping], *, trailing_comma: bool = False
) -> pa.Array:
    """One compact JSON object per row (pyarrow large_string array), built from columns with
    pyarrow compute (no row-by-row to_dict / json.dumps over a million rows). `spec` maps a JSON
    key to a frame column name, or to a nested spec for a nested object. Null or empty cells are
    left out of the object (an empty nested object is `{}`). Strings are escaped exactly as JSON
    requires (quotes, backslashes, control characters).

    Strings are written as UTF-8, not ``\\uXXXX`` (``ensure_ascii=False``); integer and boolean
    columns become JSON numbers and booleans, non-finite floats are left out.

    ``trailing_comma=True`` ends every object with ``,`` in the same pass, so the array's data
    buffer is already the comma-joined list that :func:`pack_batches` slices request bodies from.
    """
    return _objects(frame, spec, _row_count(frame), close="}," if trailing_comma else "}")


def _batch_ends(lengths: np.ndarray, room: int, max_rows: int, first_row: int) -> Iterator[tuple[int, int]]:
    """Greedy ``(start, end)`` cuts; ``room`` is max_bytes minus head and tail."""
    # cost(i, j) = sum(lengths[i:j]) + (j - i - 1) commas = cum[j] - cum[i] - 1, cum of length + 1.
    cum = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=cum[1:])
    start, total = 0, len(lengths)
    while start < total:
        end = int(np.searchsorted(cum, cum[start] + room + 1, side="right")) - 1
        end = min(end, start + max_rows, total)
        if end <= start:
            raise ValueError(
                f"row {first_row + start} encodes to {int(lengths[start])} bytes and cannot fit a "
                f"request of at most {room} bytes besides the envelope"
            )
        yield start, end
        start = end


def pack_batches(
    records: pa.Array,
    *,
    head: bytes,
    tail: bytes,
    max_rows: int,
    max_bytes: int,
    first_row: int = 0,
    trailing_comma: bool = False,
) -> Iterator[Batch]:
    """body = head + b",".join(records[i:j]) + tail, with at most max_rows records and
    len(body) <= max_bytes, measured from the encoded byte lengths (not guessed). A single record
    that cannot fit raises ValueError naming its row. `head`/`tail` wrap the array, e.g.
    head=b'{"token":"...","data":[' tail=b']}' (the caller keeps secrets out of logs).

    Cuts are computed up front (so an oversized row fails before anything is sent); bodies are
    built lazily, one per ``next()``. With ``trailing_comma=True`` every record already ends with
    its comma (``encode_records(..., trailing_comma=True)``), which saves a pass over all bytes;
    the batches' ``records`` keep that form.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if isinstance(records, pa.ChunkedArray):
        records = records.combine_chunks()
    if records.null_count:
        raise ValueError("records must not contain nulls")
    # Every record followed by a comma, in one contiguous buffer: a batch's payload is then a plain
    # slice of that buffer (minus its last comma), with no per-batch join kernel.
    binary = records.cast(pa.large_binary())
    if not trailing_comma:
        binary = pc.binary_join_element_wise(binary, _COMMA, _COMMA_SEPARATOR)
    offsets = _offsets(binary)
    data = memoryview(binary.buffers()[2] or b"")
    lengths = np.diff(offsets) - 1
    room = max_bytes - len(head) - len(tail)
    cuts = list(_batch_ends(lengths, room, max_rows, first_row))
    for start, end in cuts:
        payload = data[offsets[start] : offsets[end] - 1]
        yield Batch(
            first_row=first_row + start,
            row_count=end - start,
            body=b"".join((head, payload, tail)),
            records=records.slice(start, end - start),
        )


def encode_in_slices(
    frame: pd.DataFrame,
    encode: Callable[[pd.DataFrame], pa.Array],
    *,
    head: bytes,
    tail: bytes,
    max_rows: int,
    max_bytes: int,
    slice_rows: int = SLICE_ROWS,
) -> Iterator[Batch]:
    """:func:`pack_batches` over ``encode(frame)``, encoded a slice of rows at a time.

    ``encode`` must end every record with a comma (``encode_records(..., trailing_comma=True)``):
    the encoded slice is then sent as it is, without another pass to join it.

    Fed to :func:`send_concurrently`, the first requests are on the wire while later rows are
    still being encoded: the next slice is encoded in a helper thread (pyarrow's kernels release
    the GIL) while the current one's batches are sent.
    Slices are whole multiples of ``max_rows`` so batch sizes stay even. The price: a row too
    large for any request is found when its slice is reached, not before the first send; rows
    come from validation, which caps every value at 255 characters, so that cannot happen there.
    """
    step = max(max_rows, slice_rows // max_rows * max_rows)
    starts = range(0, len(frame), step)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="json-encode") as encoder:
        upcoming = [encoder.submit(encode, frame.iloc[start : start + step]) for start in starts[:1]]
        for i, start in enumerate(starts):
            records = upcoming.pop().result()
            if i + 1 < len(starts):  # the next slice encodes while this one's batches are sent
                upcoming.append(encoder.submit(encode, frame.iloc[starts[i + 1] : starts[i + 1] + step]))
            yield from pack_batches(
                records,
                head=head,
                tail=tail,
                max_rows=max_rows,
                max_bytes=max_bytes,
                first_row=start,
                trailing_comma=True,
            )


def send_concurrently(send: Callable[[Batch], T], batches: Iterable[Batch], *, max_in_flight: int) -> list[T]:
    """Call `send` for every batch with at most `max_in_flight` at once (threads; each `send` uses
    the thread-safe sync `VendorHTTP`/httpx client), results in batch order; the first exception is
    raised after in-flight sends finish, and no new batch starts after a failure.

    ``batches`` is consumed lazily, so a generator of bodies never holds more than
    ``max_in_flight`` of them (plus one being built) in memory. Each sender takes its next batch
    itself as soon as its request ends: handing batches out from a coordinating thread would cost
    two thread wake-ups per request, which shows at a thousand requests a second. The calling
    thread is one of the senders, so an interrupt delivered to it (Ctrl-C, Dagster terminating the
    run) stops the others from starting new batches like any failed send.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    source = enumerate(batches)
    lock = threading.Lock()  # guards `source` (a generator is not thread-safe) and `errors`
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        with lock:
            errors.append(exc)

    def sender() -> None:
        while True:
            with lock:
                if errors:
                    return
                try:
                    index, batch = next(source)
                except StopIteration:
                    return
                except BaseException as exc:  # building a body failed: stop like a failed send
                    errors.append(exc)
                    return
            try:
                results[index] = send(batch)
            except BaseException as exc:
                fail(exc)
                return

    with ThreadPoolExecutor(max_workers=max(max_in_flight - 1, 1), thread_name_prefix="json-batch") as pool:
        helpers = [pool.submit(sender) for _ in range(max_in_flight - 1)]
        try:
            sender()
            for helper in helpers:
                helper.result()
        except BaseException as exc:  # interrupted while waiting for the helpers
            fail(exc)
    close = getattr(batches, "close", None)
    if callable(close):
        close()  # a generator's own helper threads end now, not at garbage collection
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(results))]
