"""Bad input files a user's dump can hold, written by the tests (shared by the main suite's
reader tests and the hostile-corpus job test)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def string_column_with_invalid_utf8(values: list[bytes]) -> pa.Array:
    """A Parquet/Arrow ``string`` column holding the given raw bytes unchecked (a writer that
    did not validate its text: Parquet stores the bytes, a reader fails on decoding them)."""
    offsets, total = [0], 0
    for v in values:
        total += len(v)
        offsets.append(total)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]),
                                  pa.py_buffer(b"".join(values))])


def deeply_nested_json_line(depth: int = 100_000) -> bytes:
    """A JSON value nested ``depth`` deep: valid JSON that exhausts a recursive parser."""
    return b'{"post_id": "deep", "text": ' + b"[" * depth + b"]" * depth + b"}"


def damage_row_group(path: Path, row_group: int) -> int:
    """Overwrite the first page header of ``row_group``'s first column in place (the footer
    stays intact, so the file opens and the other row groups read); returns its row count."""
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(row_group).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 12] = b"\x7f" * 12
    path.write_bytes(bytes(data))
    return meta.row_group(row_group).num_rows
