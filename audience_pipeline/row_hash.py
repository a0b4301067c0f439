"""Stable 64-bit hashes of values and rows, computed on Arrow buffers with numpy.

The changed-rows snapshot stores a hash of every row sent, so the hash must be the same in every
process, on every machine and after an upgrade of pandas or pyarrow: Python's ``hash()`` is
salted per process, and pandas' ``hash_pandas_object`` costs 2.4 s per million rows of nine text
columns, ten reads of the file. This one reads each value's bytes as 8-byte words straight from
the Arrow data buffer (an unaligned numpy view, no copy per value), sums them as a polynomial in
a fixed odd constant (weights kept relative to each value's first word, so a value hashes the
same wherever it sits in the buffer) and finishes with splitmix64. No Python runs per row.

It is not cryptographic: it notices edits to HR data, nobody is forging collisions. Two
different values collide with probability about 2**-64. :data:`HASH_VERSION` is stored with
every snapshot; changing anything here must bump it, which turns the next file into a full push
instead of a wrong diff.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

HASH_VERSION = 1
THREADS = 2
SLICE_VALUES = 1 << 16
"""Values hashed per step: small arrays stay in cache and need no fresh pages from the kernel."""
_U = np.uint64
_MASK64 = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2**64
_LENGTH_KEY = _U(0xD6E8FEB86659FD93)
_CHUNK_BITS = 16
_CHUNK = 1 << _CHUNK_BITS
_TAIL_MASKS = np.array([_MASK64] + [(1 << (8 * i)) - 1 for i in range(1, 8)], dtype=_U)
"""Keeps the first ``n % 8`` bytes of a value's last word (all 8 when ``n % 8 == 0``)."""
_FIXED_WORDS = 8
"""Slices whose values all fit in this many words take the fixed-width path."""
_PAD = 8 * _FIXED_WORDS + 8
"""Zero bytes after a slice's data: word ``k`` of its last, shortest value is still readable."""
_SLOT_MASKS = np.array(
    [
        [(1 << (8 * min(max(n - 8 * k, 0), 8))) - 1 for n in range(8 * _FIXED_WORDS + 1)]
        for k in range(_FIXED_WORDS)
    ],
    dtype=_U,
)
"""``[k][n]``: keeps the bytes of word ``k`` that belong to a value of ``n`` bytes."""


def _powers(base: int, count: int) -> np.ndarray:
    """``base**0 .. base**(count-1)`` modulo 2**64, by doubling (uint64 arithmetic wraps)."""
    out = np.empty(max(count, 1), dtype=_U)
    out[0] = 1
    filled, step = 1, base
    with np.errstate(over="ignore"):
        while filled < count:
            n = min(filled, count - filled)
            out[filled : filled + n] = out[:n] * _U(step)
            filled += n
            step = step * step & _MASK64
    return out[:count]


@cache
def _tables() -> tuple[np.ndarray, np.ndarray, int, int]:
    """Low powers of the base and of its inverse, and both raised to the chunk size."""
    inverse = _BASE
    for _ in range(6):  # Newton's iteration doubles the correct low bits each time
        inverse = inverse * (2 - _BASE * inverse) & _MASK64
    return (
        _powers(_BASE, _CHUNK),
        _powers(inverse, _CHUNK),
        pow(_BASE, _CHUNK, 1 << 64),
        pow(inverse, _CHUNK, 1 << 64),
    )


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit moves about half the output bits."""
    with np.errstate(over="ignore"):
        x = x + _U(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
        return x ^ (x >> _U(31))


def _as_binary(values: pa.Array) -> pa.Array:
    """Text as it is; any other type as its text (dates, numbers, booleans)."""
    if pa.types.is_null(values.type):
        return pa.array([None] * len(values), pa.large_binary())
    if not (
        pa.types.is_string(values.type)
        or pa.types.is_large_string(values.type)
        or pa.types.is_binary(values.type)
        or pa.types.is_large_binary(values.type)
    ):
        values = values.cast(pa.large_string())
    return values


def _slice_sums(values: pa.Array, sums: np.ndarray, codes: np.ndarray) -> None:
    """Write ``(polynomial sum, length code)`` of each value of one slice into ``sums`` and
    ``codes``; code 0 is null. Only the slice's own bytes are copied (into a padded buffer, so the
    last word of the last value may overrun), which keeps every array small and cached."""
    n = len(values)
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if large else np.int32)
    offsets = offsets[values.offset : values.offset + n + 1].astype(np.int64)
    first_byte = int(offsets[0])
    offsets -= first_byte
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    valid = None
    if values.null_count:
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        lengths = np.where(valid, lengths, 0)  # a null slot may span bytes; it holds none
    size = int(offsets[-1])
    padded = np.empty(size + _PAD, dtype=np.uint8)
    padded[size:] = 0
    if data_buf is not None and size:
        padded[:size] = np.frombuffer(data_buf, dtype=np.uint8, count=size, offset=first_byte)
    words = np.ndarray(shape=(size + _PAD - 7,), dtype="<u8", buffer=padded, strides=(1,))

    n_words = (lengths + 7) >> 3
    longest = int(n_words.max())
    if longest <= _FIXED_WORDS:
        _fixed_sums(words, starts, lengths, longest, sums)
    else:
        _variable_sums(words, starts, lengths, n_words, valid, sums)
    np.add(lengths, 1, out=codes, casting="unsafe")
    if valid is not None:
        codes[~valid] = 0


def _fixed_sums(
    words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, longest: int, sums: np.ndarray
) -> None:
    """Short values (at most :data:`_FIXED_WORDS` words): word ``k`` of every value at once,
    masked to the value's bytes, times ``base**-k``; the same sums as :func:`_variable_sums`."""
    _, low_inverse, _, _ = _tables()
    capped = np.minimum(lengths, 8 * _FIXED_WORDS)
    sums[:] = 0  # stays so when every value is empty or null (no word at all)
    with np.errstate(over="ignore"):
        for k in range(longest):  # the buffer is padded, so a short value's word k is readable
            w = words[starts + 8 * k] if k else words[starts]
            w &= _SLOT_MASKS[k][capped]  # the bytes of this value in its word k, nothing after it
            if k:
                w *= low_inverse[k]
            sums += w


def _variable_sums(
    words: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    n_words: np.ndarray,
    valid: np.ndarray | None,
    sums: np.ndarray,
) -> None:
    """Any lengths: every word of the slice in one flat array, weighted by ``base**-i`` (``i`` its
    index in the slice), prefix-summed, then each value's range brought back to its first word."""
    word_end = np.cumsum(n_words)
    word_start = word_end - n_words
    total = int(word_end[-1])
    low, low_inverse, chunk_power, chunk_inverse = _tables()
    with np.errstate(over="ignore"):
        position = np.repeat(starts - (word_start << 3), n_words)
        position += np.arange(0, total << 3, 8, dtype=np.int64)
        w = words[position]
        if valid is None and int(lengths.min()) > 0:  # the usual case: no empty value
            w[word_end - 1] &= _TAIL_MASKS[lengths & 7]
        else:
            has_words = n_words > 0
            w[word_end[has_words] - 1] &= _TAIL_MASKS[lengths[has_words] & 7]
        scale = 1
        for begin in range(0, total, _CHUNK):  # w[i] * base**-i, i the word's index in the slice
            part = w[begin : begin + _CHUNK]
            part *= low_inverse[: len(part)]
            part *= _U(scale)
            scale = scale * chunk_inverse & _MASK64
        prefix = np.empty(total + 1, dtype=_U)
        prefix[0] = 0
        np.cumsum(w, out=prefix[1:])
        np.subtract(prefix[word_end], prefix[word_start], out=sums)
        high = _powers(chunk_power, (total >> _CHUNK_BITS) + 1)
        sums *= low[word_start & (_CHUNK - 1)] * high[word_start >> _CHUNK_BITS]


def _slices(values: pa.Array | pa.ChunkedArray) -> list[tuple[int, pa.Array]]:
    """``(first row, slice)`` of at most :data:`SLICE_VALUES` values each, as text."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    out, row = [], 0
    for chunk in chunks:
        chunk = _as_binary(chunk)
        for begin in range(0, len(chunk), SLICE_VALUES):
            out.append((row + begin, chunk.slice(begin, SLICE_VALUES)))
        row += len(chunk)
    return out


def _run(tasks: list, threads: int) -> None:
    if threads > 1 and len(tasks) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda task: task(), tasks))
    else:
        for task in tasks:
            task()


def _sums_of(columns: list[pa.Array | pa.ChunkedArray], threads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``value_sums`` of several columns, their slices spread over ``threads`` threads (numpy
    releases the GIL in every step, and each slice writes only its own rows)."""
    results = []
    tasks = []
    for values in columns:
        sums, codes = np.empty(len(values), _U), np.empty(len(values), _U)
        results.append((sums, codes))
        for row, part in _slices(values):
            out = (sums[row : row + len(part)], codes[row : row + len(part)])
            tasks.append(lambda part=part, out=out: _slice_sums(part, *out))
    _run(tasks, threads)
    return results


def value_sums(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Per value: its polynomial sum and its length code (0 for null, ``len + 1`` otherwise)."""
    return _sums_of([values], THREADS)[0]


def _finish(sums: np.ndarray, codes: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return splitmix64(sums ^ (codes * _LENGTH_KEY))


def hash_values(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each value (null and ``""`` differ)."""
    return _finish(*value_sums(values))


def _column_key(index: int) -> np.uint64:
    return splitmix64(np.array([index + 1], dtype=_U))[0] | _U(1)


class RowHashes(NamedTuple):
    rows: np.ndarray
    """uint64 per row, over every column."""
    columns: dict[str, np.ndarray]
    """uint32 per value, by column (``per_column``): which columns of a changed row changed."""
    first: np.ndarray | None
    """uint64 per value of the first column (``first_column``): the id, for the hash join."""


def _one_array(values: pa.ChunkedArray) -> pa.Array:
    """A slice of a column as one Arrow array of text (a copy only where it spans chunks)."""
    if values.num_chunks == 1:
        return _as_binary(values.chunk(0))
    return _as_binary(values.combine_chunks())


def hash_rows(
    frame: pd.DataFrame | pa.Table,
    columns: Sequence[str],
    *,
    per_column: bool = False,
    first_column: bool = False,
) -> RowHashes:
    """A 64-bit hash of each row over ``columns`` (in that order, so the order is part of the
    configuration), and on request each value's own hash.

    Work goes by slices of rows, every column of a slice at once, on :data:`THREADS` threads: no
    column-long intermediate array is ever made, so a million rows touch few fresh pages.
    """
    table = (
        frame
        if isinstance(frame, pa.Table)
        else pa.Table.from_pandas(frame[list(columns)], preserve_index=False)
    )
    n = table.num_rows
    names = list(columns)
    data = [table.column(name) for name in names]
    keys = [_column_key(index) for index in range(len(names))]
    rows = np.empty(n, dtype=_U)
    by_column = {name: np.empty(n, dtype=np.uint32) for name in names} if per_column else {}
    first = np.empty(n, dtype=_U) if first_column and names else None

    def hash_slice(begin: int) -> None:
        end = min(begin + SLICE_VALUES, n)
        sums, codes = np.empty(end - begin, _U), np.empty(end - begin, _U)
        total = rows[begin:end]
        total[:] = 0
        with np.errstate(over="ignore"):
            for index, name in enumerate(names):
                _slice_sums(_one_array(data[index].slice(begin, end - begin)), sums, codes)
                total += (sums ^ (codes * _LENGTH_KEY)) * keys[index]
                if per_column:
                    by_column[name][begin:end] = _finish(sums, codes) >> _U(32)
                if index == 0 and first is not None:
                    first[begin:end] = _finish(sums, codes)
        total[:] = splitmix64(total)

    _run([partial(hash_slice, begin) for begin in range(0, n, SLICE_VALUES)], THREADS)
    return RowHashes(rows, by_column, first)
