"""Output of the link job: one Parquet file per input file, and the ``_SUCCESS.json`` manifest.

* The output file of an input file is ``part-<sha256(input uri)[:20]>.parquet``: a retried or
  re-run job overwrites it instead of adding a duplicate, whatever the cluster shape.
* Each file is written whole, atomically (local: temp name + rename; S3: one PUT), with
  otmel metadata in its Parquet footer (input, row counts, model/index versions and the
  settings that change results). A re-run skips an input whose output exists with the same
  metadata (:func:`is_complete`); anything else is recomputed and overwritten.
* Rows are sorted by (input row, mention start, mention id): the same input gives the same file.
* ``_SUCCESS.json`` is written last, with the row counts of every output file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from otmel.schemas import LINK_OUTPUT_SCHEMA, LINK_STATUSES

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
METADATA_KEY = b"otmel"


def output_name(input_uri: str) -> str:
    return f"part-{hashlib.sha256(str(input_uri).encode()).hexdigest()[:20]}.parquet"


def status_counts(table: pa.Table) -> dict[str, int]:
    counts = Counter(table.column("status").to_pylist())
    return {s: int(counts.get(s, 0)) for s in LINK_STATUSES}


def sort_rows(table: pa.Table) -> pa.Table:
    """Deterministic order: input row, then span start, then mention id."""
    keys = [("source_row", "ascending"), ("start", "ascending"), ("mention_id", "ascending")]
    return table.sort_by([k for k in keys if k[0] in table.column_names])


def write_output_file(table: pa.Table, uri: str, meta: dict, s3_endpoint: str | None = None) -> dict:
    """Write one input file's output rows (already in LINK_OUTPUT_SCHEMA order); returns the
    footer metadata written (with the status counts)."""
    from otmel.storage import write_bytes

    table = sort_rows(table).select(LINK_OUTPUT_SCHEMA.names).cast(LINK_OUTPUT_SCHEMA)
    meta = dict(meta, rows=table.num_rows, counts=status_counts(table),
                written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), s3_endpoint)
    return meta


def read_output_meta(uri: str, s3_endpoint: str | None = None) -> dict | None:
    """otmel footer metadata of an output file, or None if absent/unreadable."""
    from otmel.storage import StorageError, resolve

    fs, path = resolve(uri, s3_endpoint)
    try:
        with fs.open_input_file(path) as f:
            md = pq.read_schema(f).metadata or {}
    except (FileNotFoundError, StorageError, OSError, pa.ArrowInvalid):
        return None
    raw = md.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def is_complete(uri: str, expected: dict, s3_endpoint: str | None = None) -> dict | None:
    """The output's metadata when it was written for the same input with the same model,
    index and settings (then the input can be skipped), else None."""
    meta = read_output_meta(uri, s3_endpoint)
    if meta is None:
        return None
    same = all(meta.get(k) == v for k, v in expected.items())
    return meta if same else None


def error_reasons(table: pa.Table) -> dict[str, int]:
    """Error rows by reason (the text before the first colon of ``error``)."""
    return dict(Counter(e.split(":")[0] for e in table.column("error").to_pylist() if e))


def write_success(out_uri: str, summary: dict, s3_endpoint: str | None = None) -> str:
    from otmel.storage import join, write_bytes

    uri = join(out_uri, SUCCESS_FILE)
    write_bytes(uri, json.dumps(summary, indent=2, sort_keys=True).encode(), s3_endpoint)
    return uri


def read_link_output(out_uri: str, s3_endpoint: str | None = None) -> pa.Table:
    """Every output row of a link job directory (local or s3://), in file-name order."""
    from otmel.link_input import list_input_files
    from otmel.storage import read_parquet

    files = [f for f in list_input_files(out_uri, s3_endpoint) if f.rsplit("/", 1)[-1].startswith("part-")]
    tables = [read_parquet(f, s3_endpoint).replace_schema_metadata(None) for f in files]
    return pa.concat_tables(tables) if tables else LINK_OUTPUT_SCHEMA.empty_table()


