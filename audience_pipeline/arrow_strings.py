"""Zero-copy numpy views of Arrow string buffers, for byte scans that no compute kernel offers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa


def string_chunks(values: pa.ChunkedArray | pa.Array) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each chunk's offsets (int64, one more than rows) and data bytes, as zero-copy numpy views."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk in chunks:
        large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
        width = 8 if large else 4
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(
            offsets_buf,
            dtype=np.int64 if large else np.int32,
            count=len(chunk) + 1,
            offset=chunk.offset * width,
        ).astype(np.int64, copy=False)
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        yield offsets, data


def value_bytes(values: pa.ChunkedArray | pa.Array) -> Iterator[np.ndarray]:
    """Per chunk, just the bytes its values span (a chunk may be a slice of a larger buffer)."""
    for offsets, data in string_chunks(values):
        if len(offsets) > 1:
            yield data[offsets[0] : offsets[-1]]
