"""Input of the link job: listing input files and turning each into mention rows.

An input URI is a file, a directory (every ``*.parquet`` / ``*.jsonl`` / ``*.ndjson`` / ``*.json``
under it; names starting with ``_`` or ``.`` are skipped) or a glob (``s3://b/dump/*.parquet``),
local or ``s3://``. One input file is the unit of work (DESIGN.md "Scale model").

:func:`iter_mention_rows` streams one file (Parquet by row-group batches, JSONL line by line;
memory stays at a chunk) into :data:`MENTION_ROW_SCHEMA`, one row per mention, with nothing
dropped:

* a **mentions** file (has ``mention``): one row per input row;
* a **posts** file (``post_id``, ``text``): each post's ``mentions`` spans (one row each,
  ``mention_id = post_id:start-end``, the context is a window of text around the span), or,
  without spans, the spans found by the mention detector; a post where none is found is one
  ``no_mention`` row; a post with empty text is an ``error`` row;
* anything else, an unreadable file, or a JSONL line that does not parse: ``error`` rows whose
  ids are ``<file>:<line>`` (JSONL is read line by line so one bad line is one error row).

``preset`` carries what reading already decided (``""`` = to be linked, ``no_mention``,
``error`` with the reason in ``error``).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
DEFAULT_CONTEXT_CHARS = 200
#: the longest text (UTF-8 bytes) a row may carry (``--max-text-bytes``); a longer one is an
#: error row (``text_too_long``) or, with ``--truncate-text``, cut there (warning
#: ``text_truncated``). Decided while reading, before mention detection or the tokenizer: one
#: 200 MB text line drove a preprocess worker to 16.7 GB and stalled the job
DEFAULT_MAX_TEXT_BYTES = 1 << 20
#: the largest inline image a row may carry (``--max-image-bytes``; base64 in JSON)
DEFAULT_MAX_IMAGE_BYTES = 20 << 20


def max_line_bytes(max_text_bytes: int, max_image_bytes: int) -> int:
    """The longest JSONL line read: a text and a base64 image at their caps, and 1 MiB for the
    rest of the record. A longer line (a giant field of any kind) is skipped without being
    held and becomes one ``line_too_long`` error row."""
    return max_text_bytes + (max_image_bytes * 4) // 3 + (1 << 20)
#: a read chunk ends at this many rows or at READ_CHUNK_BYTES of input, whichever comes first:
#: rows of posts with inline images are ~100x larger than text rows, and a read task holds
#: several copies of a chunk (Python records, mention table, sorted table) at once
DEFAULT_CHUNK_ROWS = 1024
READ_CHUNK_BYTES = 8 << 20  # = a Ray Data block of the jobs (TARGET_BLOCK_BYTES)
#: Parquet column data is read through a buffer of this size instead of whole column chunks
#: (pre-buffering a row group of inline images holds it twice, measured 265 vs 164 MB for 64 MB)
PARQUET_READ_BUFFER = 8 << 20

MENTION_ROW_SCHEMA = pa.schema([
    ("mention_id", pa.string()),
    ("post_id", pa.string()),
    ("mention", pa.string()),
    ("start", pa.int32()),
    ("end", pa.int32()),
    ("text", pa.string()),  # the context given to the model
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("preset", pa.string()),  # "" | no_mention | error
    ("error", pa.string()),
    ("warning", pa.string()),  # linked, but with less than the model expects (no_context: no text)
    ("source_file", pa.string()),
    ("source_row", pa.int64()),  # row (Parquet) or line (JSONL, 1-based) in the input file
])


def _is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def _glob_regex(pattern: str) -> "re.Pattern[str]":
    """A glob as a regex over paths relative to its base: ``*`` and ``?`` stay inside one path
    segment, ``**`` crosses segments, ``[...]`` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


#: what an input listing does not read, and why
SKIP_HIDDEN = "hidden or _-prefixed (not data: _SUCCESS, .crc, .DS_Store, ...)"
SKIP_OWN_OUTPUT = "an otmel link output file (part-<hash>.parquet): never an input"
#: an output file of ``otmel link`` (otmel.linking.link_output.output_name)
OWN_OUTPUT = re.compile(r"part-[0-9a-f]{20}\.parquet")


@dataclass
class InputListing:
    """Every file an input URI names, accounted for: ``files`` are read (sorted URIs),
    ``skipped`` maps each other file to the reason it is not read."""

    files: list[str]
    skipped: dict[str, str]

    @property
    def unsupported(self) -> dict[str, str]:
        return {f: r for f, r in self.skipped.items() if r.startswith("unsupported")}


def _classify(rel: str) -> str | None:
    """None when a file (its path relative to what was listed) is read, else why not."""
    parts = PurePosixPath(rel).parts
    if any(part.startswith(("_", ".")) for part in parts):
        return SKIP_HIDDEN
    if OWN_OUTPUT.fullmatch(parts[-1]):
        return SKIP_OWN_OUTPUT
    if not parts[-1].lower().endswith(INPUT_SUFFIXES):
        suffix = "".join(PurePosixPath(parts[-1]).suffixes[-2:]) or "no extension"
        return f"unsupported: {suffix} (no reader for it; read: {', '.join(INPUT_SUFFIXES)})"
    return None


def _glob_base(uri: str) -> str:
    """The directory a glob lists: the part before its first wildcard, up to the last slash
    ("*.jsonl": the current directory)."""
    head = uri[:min(uri.index(c) for c in "*?[" if c in uri)]
    return head.rsplit("/", 1)[0] if "/" in head else "."


def list_files(uri: str, s3_endpoint: str | None = None) -> list[tuple[str, str]]:
    """Every file a file, directory or glob URI names: sorted ``(uri, path relative to what was
    listed)``; a file named directly has the relative path ``""``."""
    from otmel.io.storage import StorageError, resolve

    uri = str(uri)
    prefix = "s3://" if uri.startswith(("s3://", "s3a://")) else ""
    found: list[tuple[str, str]] = []
    if _is_glob(uri):
        base = _glob_base(uri)
        fs, base_path = resolve(base or "/", s3_endpoint)
        rest = uri[len(base):].lstrip("/")
        pattern = _glob_regex(rest)
        try:
            infos = fs.get_file_info(pafs.FileSelector(base_path, recursive="**" in rest or "/" in rest,
                                                       allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"{uri}: {exc}") from exc
        for i in infos:
            rel = i.path[len(base_path):].lstrip("/")
            if i.type == pafs.FileType.File and pattern.fullmatch(rel):
                found.append((prefix + i.path, rel))
    else:
        fs, path = resolve(uri, s3_endpoint)
        try:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [(prefix + path, "")]
            elif info.type == pafs.FileType.Directory:
                found = [(prefix + i.path, i.path[len(path):].lstrip("/"))
                         for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                         if i.type == pafs.FileType.File]
        except OSError as exc:
            raise StorageError(f"{uri}: {exc}") from exc
    return sorted(found)


def classify_input_files(uri: str, s3_endpoint: str | None = None) -> InputListing:
    """The files of a file, directory or glob URI, each read or skipped with a reason
    (hidden / _-prefixed, an otmel output file, an extension no reader claims);
    FileNotFoundError if none is read. A file named directly is read whatever its name (its
    reader says if it cannot)."""
    files, skipped = [], {}
    for path, rel in list_files(uri, s3_endpoint):
        reason = _classify(rel) if rel else None
        if reason is None:
            files.append(path)
        else:
            skipped[path] = reason
    if not files:
        said = f" ({len(skipped)} file(s) not read: {_some(skipped)})" if skipped else ""
        raise FileNotFoundError(f"{uri}: no input files found (expected *.parquet / *.jsonl files, a directory or a "
                                f"glob){said}")
    return InputListing(files, skipped)


def _some(skipped: dict[str, str], n: int = 3) -> str:
    items = [f"{f} ({r.split(' (')[0]})" for f, r in list(skipped.items())[:n]]
    return ", ".join(items) + (f" and {len(skipped) - n} more" if len(skipped) > n else "")


def unsupported_error(uri: str, listing: InputListing) -> ValueError:
    """The one-line refusal of input files no reader claims (unless --skip-unsupported)."""
    bad = listing.unsupported
    return ValueError(f"{len(bad)} file(s) in {uri} have no reader: {_some(bad)}; pass --skip-unsupported to link "
                      f"the other {len(listing.files)} and list these in _SUCCESS.json")


def list_input_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Sorted URIs of the files a file, directory or glob URI reads (see
    :func:`classify_input_files` for the others); FileNotFoundError if none."""
    return classify_input_files(uri, s3_endpoint).files


def _location(uri: str) -> str:
    """A comparable form of a local path or ``s3://`` URI: absolute, symlinks resolved, no
    trailing slash; for a glob, the directory it lists."""
    import os

    uri = str(uri)
    if _is_glob(uri):
        uri = _glob_base(uri)
    if uri.startswith(("s3://", "s3a://")):
        return "s3://" + uri.split("://", 1)[1].strip("/")
    return os.path.realpath(os.path.abspath(uri or "."))


def check_output_apart(input_uri: str, output_uri: str) -> None:
    """Refuse an output equal to, inside, or containing the input (one line, before any work): a
    later run would read the job's own output files as input, or a run would write among its
    inputs."""
    where, out = _location(input_uri), _location(output_uri)
    if out == where or out.startswith(where.rstrip("/") + "/") or where.startswith(out.rstrip("/") + "/"):
        relation = "is" if out == where else "is inside" if out.startswith(where.rstrip("/") + "/") else "contains"
        raise ValueError(f"--output {output_uri} {relation} the input {input_uri}: a re-run would read this job's own "
                         f"output as input; write the output outside the input")


def input_stamps(files: list[str], s3_endpoint: str | None = None) -> dict[str, str]:
    """``size:mtime`` of each input file: a rewritten input is not "already linked"."""
    from otmel.io.storage import StorageError, resolve

    if not files:
        return {}
    fs, _ = resolve(files[0], s3_endpoint)
    try:
        infos = fs.get_file_info([resolve(f, s3_endpoint)[1] for f in files])
    except OSError as exc:
        raise StorageError(f"{files[0]}: {exc}") from exc
    return {f: f"{i.size}:{i.mtime_ns}" for f, i in zip(files, infos)}


# ---------------------------------------------------------------------------- reading one file
def _error_row(source: str, row: int, reason: str, post_id=None, mention_id=None) -> dict:
    ident = f"{source}:{row}"
    return {"mention_id": str(mention_id) if mention_id not in (None, "") else ident,
            "post_id": str(post_id) if post_id not in (None, "") else ident, "mention": None, "start": None,
            "end": None, "text": None, "image": None, "image_uri": None, "preset": "error", "error": reason,
            "warning": None, "source_file": source, "source_row": row}


def _first(value):
    """The first of a list of images (posts may carry several), else the value."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _image_bytes(value) -> tuple[bytes | None, str | None]:
    """Image cell -> bytes; JSON carries bytes as base64 strings."""
    value = _first(value)
    if value is None or isinstance(value, (bytes, bytearray)):
        return (bytes(value) if value else None), None
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True), None
        except ValueError:
            return None, "bad_image: the image field is neither bytes nor base64"
    return None, f"bad_image: unexpected image value of type {type(value).__name__}"


Record = tuple[int, "dict | None", "str | None"]  # (row or line number, record, parse problem)


def _json_record(n: int, raw: bytes | str | object, what: str) -> Record:
    try:
        rec = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except (ValueError, UnicodeDecodeError) as exc:
        return n, None, f"bad_json: {what} {n} does not parse: {exc}"
    except RecursionError:
        return n, None, f"bad_json: {what} {n} is nested too deeply to parse"
    if not isinstance(rec, dict):
        return n, None, f"bad_json: {what} {n} is a JSON {type(rec).__name__}, not an object"
    return n, rec, None


def parquet_batch_rows(metadata, chunk_rows: int, chunk_bytes: int) -> int:
    """Rows per Parquet read batch: ``chunk_rows``, fewer when the file's widest row group
    (uncompressed bytes per row, from the footer) would make a batch exceed ``chunk_bytes``."""
    widest = max((metadata.row_group(i).total_byte_size / max(1, metadata.row_group(i).num_rows)
                  for i in range(metadata.num_row_groups)), default=0.0)
    return max(1, min(chunk_rows, int(chunk_bytes // widest) if widest > 0 else chunk_rows))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _parquet_records(pf, chunk_rows: int, chunk_bytes: int) -> Iterator[list[Record]]:
    """A Parquet file's rows, a row group at a time, in batches of ``parquet_batch_rows``.

    A row group whose data cannot be decoded (its footer entry intact) gives one error
    record per row it holds (the footer has the count) and the next row group is read:
    nothing silently dropped, and one damaged page does not cost the rest of the file. A
    storage error while reading one (a response body that breaks off mid-object: the SDK
    retries requests, not bodies) re-reads that row group from where it stopped, up to
    ``TRANSFER_ATTEMPTS`` times with backoff, before it fails the read task (which Ray
    retries in turn)."""
    import time

    from otmel.io.storage import TRANSFER_ATTEMPTS, is_storage_error, retry_delay

    batch_rows = parquet_batch_rows(pf.metadata, chunk_rows, chunk_bytes)
    first = 0  # file row of the row group's first row
    for rg in range(pf.metadata.num_row_groups):
        rg_rows, done = pf.metadata.row_group(rg).num_rows, 0
        for attempt in range(TRANSFER_ATTEMPTS):
            try:
                skip = done  # rows of this row group already yielded by an earlier attempt
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], use_threads=False):
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch, skip = batch.slice(skip), 0
                    yield _batch_records(batch, first + done)
                    done += batch.num_rows
                break
            except (pa.ArrowInvalid, OSError) as exc:
                if is_storage_error(exc):
                    if attempt + 1 >= TRANSFER_ATTEMPTS:
                        raise
                    log.warning("row group %d: %s; reading it again from row %d", rg, _first_line(exc), done)
                    time.sleep(retry_delay(attempt))
                    continue
                reason = (f"unreadable_row_group: row group {rg} of {pf.metadata.num_row_groups} cannot be decoded: "
                          f"{_first_line(exc)}")
                for start in range(done, rg_rows, chunk_rows):
                    yield [(first + i, None, reason) for i in range(start, min(rg_rows, start + chunk_rows))]
                break
        first += rg_rows


def _batch_records(batch: pa.RecordBatch, first: int) -> list[Record]:
    """A record batch as records; a row holding a string that is not valid UTF-8 (Parquet
    stores what the writer gave it) becomes an error record, the other rows are kept."""
    try:
        return [(first + i, r, None) for i, r in enumerate(batch.to_pylist())]
    except UnicodeDecodeError:  # find the row(s): the slow path, only for such a batch
        return [_row_record(batch.slice(i, 1), first + i) for i in range(batch.num_rows)]


def _row_record(row: pa.RecordBatch, n: int) -> Record:
    try:
        return n, row.to_pylist()[0], None
    except UnicodeDecodeError as exc:
        bad = [name for name, col in zip(row.schema.names, row.columns) if not _decodes(col)]
        return n, None, (f"bad_text: row {n} has text that is not valid UTF-8 in {', '.join(bad) or 'a column'} "
                         f"({exc.reason} at byte {exc.start})")


def _decodes(col: pa.Array) -> bool:
    try:
        col.to_pylist()
        return True
    except UnicodeDecodeError:
        return False


def _iter_records(uri: str, s3_endpoint: str | None, chunk_rows: int,
                  chunk_bytes: int = READ_CHUNK_BYTES,
                  max_line: int = max_line_bytes(DEFAULT_MAX_TEXT_BYTES, DEFAULT_MAX_IMAGE_BYTES)
                  ) -> Iterator[list[Record]]:
    """The rows (Parquet, by batches of row groups) or lines (JSONL, streamed) of one file, in
    chunks of at most ``chunk_rows`` rows and about ``chunk_bytes`` of input (one row larger
    than that is a chunk of its own): memory stays bounded by a chunk, not by the file. A
    JSONL line longer than ``max_line`` bytes is skipped as it streams by (never held) and
    becomes a ``line_too_long`` error record.

    Raises FileNotFoundError for a missing file and StorageError for a storage failure (the
    caller's task is retried); content problems are returned as records with a problem.
    """
    import pyarrow.parquet as pq

    from otmel.io.storage import StorageError, is_storage_error, resolve

    fs, path = resolve(uri, s3_endpoint)
    lower = uri.lower()
    try:
        if lower.endswith(".parquet"):
            with fs.open_input_file(path) as f:
                try:
                    pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)
                except (pa.ArrowInvalid, OSError) as exc:
                    if is_storage_error(exc):
                        raise
                    yield [(0, None, f"unreadable_file: not a readable Parquet file: {_first_line(exc)}")]
                    return
                yield from _parquet_records(pf, chunk_rows, chunk_bytes)
            return
        with fs.open_input_stream(path) as f:
            if lower.endswith(".json"):  # a JSON array (read whole) or JSON lines
                data = f.read()
                if data.lstrip()[:1] == b"[":
                    try:
                        items = json.loads(data)
                    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                        yield [(0, None, f"bad_json: the JSON array does not parse: {exc or 'nested too deeply'}")]
                        return
                    for start in range(0, len(items), chunk_rows):
                        yield [_json_record(n, rec, "element") for n, rec in
                               enumerate(items[start:start + chunk_rows], start=start + 1)]
                    return
                chunks: Iterator[bytes] = iter([data])
            else:
                chunks = iter(lambda: f.read(1 << 20), b"")
            yield from _jsonl_records(chunks, chunk_rows, chunk_bytes, max_line)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            raise FileNotFoundError(f"{uri}: no such file") from exc
        raise StorageError(f"{uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _jsonl_records(chunks: Iterator[bytes], chunk_rows: int, chunk_bytes: int, max_line: int) -> Iterator[list[Record]]:
    """JSON lines from a stream of byte chunks; a line's pieces are joined once it ends (not
    re-copied per chunk: a 200 MB line read in 1 MiB chunks was copied ~200 times), and a
    line past ``max_line`` bytes is dropped piece by piece as it streams by."""
    out: list[Record] = []
    pieces: list[bytes] = []
    held, lineno, out_bytes = 0, 0, 0
    too_long = -1  # the length so far of a line being skipped, or -1

    def end_line() -> None:
        nonlocal pieces, held, too_long, out_bytes
        if too_long >= 0:
            out.append((lineno, None, f"line_too_long: line {lineno} is {too_long} bytes, more than the {max_line} "
                                      f"a row may hold (--max-text-bytes, --max-image-bytes)"))
            out_bytes += 1
        else:
            raw = b"".join(pieces)
            if raw.strip():
                out.append(_json_record(lineno, raw, "line"))
                out_bytes += len(raw)
        pieces, held, too_long = [], 0, -1

    for chunk in chunks:
        start = 0
        while start <= len(chunk):
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if too_long >= 0:
                too_long += len(piece)
            elif held + len(piece) > max_line:
                too_long, pieces, held = held + len(piece), [], 0
            elif piece:
                pieces.append(piece)
                held += len(piece)
            if nl < 0:
                break
            lineno += 1
            end_line()
            if len(out) >= chunk_rows or out_bytes >= chunk_bytes:
                yield out
                out, out_bytes = [], 0
            start = nl + 1
    if pieces or too_long >= 0:
        lineno += 1
        end_line()
    if out:
        yield out


def _span_rows(rec: dict, post_id: str, text: str, spans, source: str, row: int, context_chars: int,
               image, image_uri, image_error) -> list[dict]:
    from otmel.linking.mention_detection import context_window

    rows = []
    if not isinstance(spans, (list, tuple)):
        return [_error_row(source, row, f"bad_span: mentions must be a list of {{mention, start, end}}, got "
                           f"{type(spans).__name__}", post_id, post_id)]
    for sp in spans:
        if isinstance(sp, dict):
            start, end, given = sp.get("start"), sp.get("end"), sp.get("mention")
        elif hasattr(sp, "start") and hasattr(sp, "end"):
            start, end, given = sp.start, sp.end, getattr(sp, "mention", None)
        else:
            rows.append(_error_row(source, row, f"bad_span: a span must be {{mention, start, end}}, got {sp!r:.60}",
                                   post_id, f"{post_id}:{len(rows)}"))
            continue
        mention_id = f"{post_id}:{start}-{end}"
        if (not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool)
                or not 0 <= start < end <= len(text)):
            rows.append(_error_row(source, row, f"bad_span: span {start}-{end} is not inside the post text "
                                   f"of {len(text)} chars", post_id, mention_id))
            continue
        rows.append({"mention_id": mention_id, "post_id": post_id, "mention": given or text[start:end],
                     "start": start, "end": end, "text": context_window(text, start, end, context_chars),
                     "image": image, "image_uri": image_uri, "preset": "error" if image_error else "",
                     "error": image_error, "warning": None, "source_file": source, "source_row": row})
    return rows


def iter_mention_rows(uri: str, s3_endpoint: str | None = None, detector=None,
                      context_chars: int = DEFAULT_CONTEXT_CHARS, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      chunk_bytes: int = READ_CHUNK_BYTES, require_text: bool = False,
                      max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES, truncate_text: bool = False,
                      max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Iterator[pa.Table]:
    """One input file -> its mention rows (:data:`MENTION_ROW_SCHEMA`), chunk by chunk; never
    raises on bad content (bad rows are error rows). Each record is read by its own columns: a
    ``mention`` column makes it a mentions row, ``post_id`` + ``text`` a post. A mentions row
    without text is linked on its mention string alone, with the warning ``no_context``
    (``require_text``: an ``empty_text`` error row instead). A text longer than
    ``max_text_bytes`` makes its row (a post: each of its rows) a ``text_too_long`` error, or
    with ``truncate_text`` is cut there (warning ``text_truncated``; a span past the cut is a
    ``bad_span``), before mention detection and the tokenizer see it."""
    limits = TextLimit(max_text_bytes, truncate_text)
    try:
        for records in _iter_records(uri, s3_endpoint, chunk_rows, chunk_bytes,
                                     max_line_bytes(max_text_bytes, max_image_bytes)):
            yield _mention_rows(uri, records, detector, context_chars, require_text, limits)
    except FileNotFoundError as exc:  # listed, then gone: the file itself is the bad input
        yield _mention_rows(uri, [(0, None, f"unreadable_file: {exc}")], detector, context_chars)
    # any other StorageError (throttling, a reset connection) propagates: Ray retries the read
    # task, and a failed job leaves no output claiming the file was handled


#: the warning of a mentions row linked without text (its mention string is all the model saw)
NO_CONTEXT = "no_context"


#: the warning of a row whose text was cut at ``--max-text-bytes`` (``--truncate-text``)
TEXT_TRUNCATED = "text_truncated"


def _has_text(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


@dataclass(frozen=True)
class TextLimit:
    """``--max-text-bytes`` and ``--truncate-text``."""

    max_bytes: int = DEFAULT_MAX_TEXT_BYTES
    truncate: bool = False

    def apply(self, text):
        """``(text, problem)``: the text as given, or cut (problem ``text_truncated``), or
        ``(None, "text_too_long: ...")``. A string of n characters is at most 4n UTF-8 bytes:
        only long ones are encoded to be measured."""
        if not isinstance(text, str) or 4 * len(text) <= self.max_bytes:
            return text, None
        data = text.encode("utf-8", "surrogatepass")
        if len(data) <= self.max_bytes:
            return text, None
        if self.truncate:
            return data[:self.max_bytes].decode("utf-8", "ignore"), TEXT_TRUNCATED
        return None, (f"text_too_long: the text is {len(data)} bytes, more than --max-text-bytes {self.max_bytes} "
                      "(--truncate-text cuts it there instead)")


def _mention_rows(uri: str, records: list[Record], detector, context_chars: int,
                  require_text: bool = False, limits: TextLimit = TextLimit()) -> pa.Table:
    rows: list[dict] = []
    for row, rec, problem in records:
        if rec is None:
            rows.append(_error_row(uri, row, problem))
            continue
        is_mentions = "mention" in rec
        is_posts = not is_mentions and "post_id" in rec and "text" in rec
        image, image_error = _image_bytes(rec.get("image"))
        image_uri = _first(rec.get("image_uri"))
        if is_mentions:
            mention_id = rec.get("mention_id")
            if mention_id is None or str(mention_id) == "":
                rows.append(_error_row(uri, row, "missing_id: the row has no mention_id", rec.get("post_id")))
                continue
            has_text = _has_text(rec.get("text"))
            if require_text and not has_text:
                rows.append(_error_row(uri, row, "empty_text: the mention row has no text (--require-text)",
                                       rec.get("post_id"), mention_id))
                continue
            text, problem = limits.apply(rec.get("text"))
            if text is None and problem:
                rows.append(_error_row(uri, row, problem, rec.get("post_id"), mention_id))
                continue
            rows.append({"mention_id": str(mention_id), "post_id": None if rec.get("post_id") is None else str(rec["post_id"]),
                         "mention": rec.get("mention"), "start": rec.get("start"), "end": rec.get("end"),
                         "text": text, "image": image, "image_uri": image_uri,
                         "preset": "error" if image_error else "", "error": image_error,
                         "warning": problem or (None if has_text else NO_CONTEXT), "source_file": uri,
                         "source_row": row})
        elif is_posts:
            post_id = rec.get("post_id")
            text = rec.get("text")
            if post_id is None or str(post_id) == "":
                rows.append(_error_row(uri, row, "missing_id: the post has no post_id"))
                continue
            post_id = str(post_id)
            if not isinstance(text, str) or not text.strip():
                rows.append(_error_row(uri, row, "empty_text: the post text is missing or empty", post_id, post_id))
                continue
            text, problem = limits.apply(text)
            if text is None:
                rows.append(_error_row(uri, row, problem, post_id, post_id))
                continue
            spans = rec.get("mentions")
            if spans is None:
                if detector is None:
                    rows.append(_error_row(uri, row, "no_spans: the post carries no mention spans and mention "
                                           "detection is off (pass --detect-mentions alias)", post_id, post_id))
                    continue
                spans = detector.find(text)
            if not spans:
                rows.append({"mention_id": post_id, "post_id": post_id, "mention": None, "start": None, "end": None,
                             "text": None, "image": None, "image_uri": None, "preset": "no_mention", "error": None,
                             "warning": None, "source_file": uri, "source_row": row})
                continue
            found = _span_rows(rec, post_id, text, spans, uri, row, context_chars, image, image_uri, image_error)
            if problem:  # cut: said on each of its rows that were linked
                for r in found:
                    r["warning"] = problem if r["preset"] != "error" else None
            rows.extend(found)
        else:
            rows.append(_error_row(uri, row, "unknown_columns: expected a posts row (post_id, text[, mentions]) or a "
                                   f"mentions row (mention_id, mention, text); found {', '.join(sorted(rec)) or 'none'}"))
    for r in rows:  # types a reader cannot be trusted with
        for key in ("start", "end"):
            v = r[key]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not -2**31 <= v < 2**31):
                r[key] = None
        for key in ("mention_id", "post_id", "mention", "text", "image_uri"):
            if r[key] is not None and not isinstance(r[key], str):
                r[key] = str(r[key])
    return pa.Table.from_pylist(rows, schema=MENTION_ROW_SCHEMA)
