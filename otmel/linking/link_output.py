"""Output of the link job: per input file, parts written by workers, committed as ONE file.

Layout of ``OUTPUT``::

    OUTPUT/part-<sha256(input uri)[:20]>.parquet   the committed output of one input file
    OUTPUT/_SUCCESS.json                           written last: counts, throughput, versions
    OUTPUT/_staging/<same hash>/<uuid>.parquet     uncommitted parts (workers write them)

* Workers (the link stage) write each batch's rows of an input file as a **part** under
  ``_staging/`` and report only small metadata (file, part URI, row and status counts, the
  part's first and last sort key) to the driver.
* When the reported rows of an input file add up to the file's row count, the driver starts
  a **commit** task: it streams the parts, in sort order, into one file inside the staging
  directory and moves it into place in one step (a rename; on S3 one object appears whole),
  then deletes the file's staging directory. A reader (``pyarrow.dataset``, Spark: names
  starting with ``_`` are hidden; DuckDB: ``OUTPUT/*.parquet``) sees the whole output of an
  input file or none of it. Commits run as soon as a file is done, while the rest of the
  job goes on.
* The final name depends only on the input's URI: a retried or re-run job overwrites
  instead of adding a duplicate, whatever the cluster shape. Its Parquet footer carries otmel
  metadata (input and its size/mtime stamp, row and status counts, model/index versions,
  the settings that change results): a re-run skips an input whose output has the same
  (:func:`is_complete`); anything else is recomputed. A re-run deletes the staging left by
  an interrupted one before linking that input again.
* Rows are sorted by (input row, mention start, mention id): the same input gives the same
  rows in the same order, with the same links and candidates; scores agree to float
  rounding (~1e-7), not bit for bit, because the batch a mention is encoded in varies from
  run to run (Ray Data forms batches in arrival order) and ONNX Runtime's kernels round
  differently for different batch sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from otmel.data.schemas import LINK_OUTPUT_SCHEMA, LINK_STATUSES

log = logging.getLogger(__name__)

#: the output's column layout, recorded in each file's footer: 2 added ``warning``. A re-run links
#: again an input whose output has another format (absent = 1), so one directory holds one
OUTPUT_FORMAT = 2

SUCCESS_FILE = "_SUCCESS.json"
STAGING_DIR = "_staging"
METADATA_KEY = b"otmel"
#: what a part holds: the output columns + the input row they come from (the sort key)
PART_SCHEMA = LINK_OUTPUT_SCHEMA.append(pa.field("source_row", pa.int64()))
SORT_KEYS = [("source_row", "ascending"), ("start", "ascending"), ("mention_id", "ascending")]


def input_hash(input_uri: str) -> str:
    return hashlib.sha256(str(input_uri).encode()).hexdigest()[:20]


def output_name(input_uri: str) -> str:
    return f"part-{input_hash(input_uri)}.parquet"


def staging_uri(out_uri: str, input_uri: str) -> str:
    """The directory of an input file's uncommitted parts."""
    from otmel.io.storage import join

    return join(out_uri, STAGING_DIR, input_hash(input_uri))


def status_counts(table: pa.Table) -> dict[str, int]:
    counts = Counter(table.column("status").to_pylist())
    return {s: int(counts.get(s, 0)) for s in LINK_STATUSES}


def warning_counts(table: pa.Table) -> dict[str, int]:
    """Rows by warning (``no_context``: linked on the mention string alone)."""
    return dict(Counter(w for w in table.column("warning").to_pylist() if w))


def error_reasons(table: pa.Table) -> dict[str, int]:
    """Error rows by reason (the text before the first colon of ``error``)."""
    return dict(Counter(e.split(":")[0] for e in table.column("error").to_pylist() if e))


def sort_rows(table: pa.Table) -> pa.Table:
    """Deterministic order: input row, then span start, then mention id (nulls last)."""
    return table.sort_by([k for k in SORT_KEYS if k[0] in table.column_names])


def sort_key(row: dict) -> tuple:
    """A row's place in :func:`sort_rows`'s order, as a comparable tuple (nulls last)."""
    start, mention = row.get("start"), row.get("mention_id")
    return (row["source_row"], (0, start) if start is not None else (1, 0),
            (0, mention) if mention is not None else (1, ""))


# ---------------------------------------------------------------------------- workers: parts
def write_part(table: pa.Table, out_uri: str, input_uri: str, s3_endpoint: str | None = None) -> dict:
    """Write the rows of ONE input file (``PART_SCHEMA`` columns) as a staged part; return
    the metadata the driver needs (no rows)."""
    from otmel.io.storage import join, write_parquet

    table = sort_rows(table.select(PART_SCHEMA.names).cast(PART_SCHEMA))
    uri = join(staging_uri(out_uri, input_uri), f"{uuid.uuid4().hex}.parquet")
    write_parquet(uri, table, s3_endpoint, compression="zstd")
    first, last = table.slice(0, 1).to_pylist()[0], table.slice(table.num_rows - 1, 1).to_pylist()[0]
    return {"part": uri, "rows": table.num_rows, "counts": status_counts(table), "errors_by_reason": error_reasons(table),
            "warnings": warning_counts(table), "first_key": list(sort_key(first)), "last_key": list(sort_key(last))}


# ---------------------------------------------------------------------------- commit
def commit_output_file(parts: list[dict], out_uri: str, input_uri: str, meta: dict,
                       s3_endpoint: str | None = None, vectors=None, coherence: dict | None = None) -> dict:
    """Stream an input file's staged ``parts`` (the metadata :func:`write_part` returned) into
    its final output file, atomically, then delete its staging directory. ``meta`` (input,
    stamp, versions, settings) goes into the footer with the row and status counts.
    Returns the footer metadata. Runs on a worker: memory is one part at a time.

    With KGE ``vectors`` (:class:`otmel.linking.coherence.EntityVectors`) and ``coherence``
    (``weight``, ``nil_threshold``), the rows are re-scored by their post's other mentions
    (:mod:`otmel.linking.coherence`): the parts are read three times (each mention's top-1 by
    post, the statuses coherence gives for the footer's counts, the rows to write), still
    one part in memory at a time."""
    from otmel.io.storage import StorageError, delete_dir, join, read_parquet, resolve

    ordered = sorted(parts, key=lambda p: _key(p["first_key"]))
    for a, b in zip(ordered, ordered[1:]):
        if _key(a["last_key"]) > _key(b["first_key"]):  # never: parts are slices of one sorted stream
            raise RuntimeError(f"{input_uri}: staged parts overlap in sort order ({a['part']}, {b['part']})")
    counts, reasons, warnings = Counter(), Counter(), Counter()
    for p in ordered:
        counts.update(p["counts"])
        reasons.update(p["errors_by_reason"])
        warnings.update(p.get("warnings", {}))
    rows = sum(p["rows"] for p in ordered)
    meta = dict(meta, rows=rows, counts={s: int(counts.get(s, 0)) for s in LINK_STATUSES},
                errors_by_reason=dict(reasons), warnings=dict(warnings), written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tops = None
    if vectors is not None:
        tops, after = _coherence_passes(ordered, vectors, coherence, s3_endpoint)
        meta["counts"] = after  # the statuses as written, after coherence (errors do not change)
    schema = LINK_OUTPUT_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    # written whole inside the (hidden) staging directory, then moved into place in one step:
    # a rename locally, one server-side copy on S3, so the final name only ever holds a
    # complete file (an upload that fails half-way leaves nothing but staging garbage)
    fs, final = resolve(join(out_uri, output_name(input_uri)), s3_endpoint)
    _, tmp = resolve(join(staging_uri(out_uri, input_uri), f"commit-{uuid.uuid4().hex}.parquet"), s3_endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
    written = 0
    with fs.open_output_stream(tmp) as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        if not ordered:
            writer.write_table(schema.empty_table())
        for p in ordered:  # one part in memory at a time
            t = read_parquet(p["part"], s3_endpoint).select(LINK_OUTPUT_SCHEMA.names).cast(LINK_OUTPUT_SCHEMA)
            if tops is not None:
                from otmel.linking.coherence import apply_to_rows

                t = apply_to_rows(t, tops, vectors, coherence["weight"], coherence.get("nil_threshold"))
            writer.write_table(t)
            written += t.num_rows
    if written != rows:
        raise RuntimeError(f"{input_uri}: read {written} rows from its parts, their metadata says {rows}")
    try:
        fs.move(tmp, final)
    except OSError as exc:
        raise StorageError(f"{final}: could not move the committed output into place: {exc}") from exc
    delete_dir(staging_uri(out_uri, input_uri), s3_endpoint)
    return meta


#: the columns coherence reads to find each mention's post and candidates
POST_COLUMNS = ["mention_id", "post_id", "candidates", "status"]


def _coherence_passes(parts: list[dict], vectors, coherence: dict,
                      s3_endpoint: str | None) -> tuple[dict[str, list], dict[str, int]]:
    """The footer needs the status counts before the rows are written: pass 1 collects each
    post's top-1s, pass 2 counts the statuses coherence gives (the write is pass 3).
    Returns (post -> [(mention id, top-1)], status counts)."""
    from otmel.linking.coherence import apply_to_rows, post_tops_of_table
    from otmel.io.storage import read_parquet

    tops: dict[str, list] = {}
    for p in parts:  # a post's rows may be in any part of the file
        for post, pairs in post_tops_of_table(read_parquet(p["part"], s3_endpoint, POST_COLUMNS)).items():
            tops.setdefault(post, []).extend(pairs)
    counts: Counter = Counter()
    for p in parts:
        t = read_parquet(p["part"], s3_endpoint, POST_COLUMNS + ["entity_id", "score"])
        counts.update(status_counts(apply_to_rows(t, tops, vectors, coherence["weight"], coherence.get("nil_threshold"))))
    return tops, {s: int(counts.get(s, 0)) for s in LINK_STATUSES}


def _key(k: list) -> tuple:
    return (k[0], tuple(k[1]), tuple(k[2]))


def read_output_meta(uri: str, s3_endpoint: str | None = None) -> dict | None:
    """otmel footer metadata of an output file, or None if absent/unreadable."""
    from otmel.io.storage import StorageError, resolve

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


def write_success(out_uri: str, summary: dict, s3_endpoint: str | None = None) -> str:
    from otmel.io.storage import join, write_bytes

    uri = join(out_uri, SUCCESS_FILE)
    write_bytes(uri, json.dumps(summary, indent=2, sort_keys=True).encode(), s3_endpoint)
    return uri


def read_link_output(out_uri: str, s3_endpoint: str | None = None) -> pa.Table:
    """Every COMMITTED output row of a link job directory (local or s3://), in file-name
    order (staged parts of unfinished inputs are never included)."""
    from otmel.io.storage import read_parquet
    from otmel.linking.link_input import OWN_OUTPUT, list_files

    files = [f for f, rel in list_files(out_uri, s3_endpoint) if OWN_OUTPUT.fullmatch(rel)]
    tables = [_current_format(read_parquet(f, s3_endpoint).replace_schema_metadata(None)) for f in files]
    return pa.concat_tables(tables) if tables else LINK_OUTPUT_SCHEMA.empty_table()


def _current_format(table: pa.Table) -> pa.Table:
    """An output file of an earlier format (1: no ``warning``) in this format's columns."""
    if "warning" not in table.column_names:
        table = table.add_column(LINK_OUTPUT_SCHEMA.get_field_index("warning"), "warning",
                                 pa.nulls(table.num_rows, pa.string()))
    return table
