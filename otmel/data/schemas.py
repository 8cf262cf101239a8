"""Arrow schemas of the data contracts (DESIGN.md "Data contracts") and their checks.

Four kinds of tables: the KB, mentions (train/eval splits), posts (raw dumps to link) and the
link output. Readers check the required columns and add the missing optional ones, cast to
the contract's types, so downstream code always sees one shape; a table that does not follow
its contract is a :class:`SchemaError` whose message is ONE line naming the file, the kind
and what is wrong (the CLI prints it as is).

Required vs optional columns per kind (:data:`REQUIRED`, :data:`OPTIONAL_DEFAULTS`):

* KB: ``entity_id`` (unique, non-null) and ``name``; ``attributes`` is optional (absent means
  ``""``); ``image`` / ``image_uri`` are both optional (an entity may have neither);
  ``aliases`` optional.
* mentions: ``mention_id`` (unique, non-null) and ``mention``; ``text`` (context) absent
  means ``""``; ``post_id``, ``image``, ``image_uri``, ``gold_entity_id`` optional (null).
* posts: ``post_id`` and ``text``; images and pre-found ``mentions`` spans optional.
* link output: every column (we write it; readers of our own output check it whole).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

KB_SCHEMA = pa.schema([
    ("entity_id", pa.string()),
    ("name", pa.string()),
    ("attributes", pa.string()),
    ("image", pa.binary()),  # encoded JPEG/PNG bytes
    ("image_uri", pa.string()),
    ("aliases", pa.list_(pa.string())),
])

MENTION_SCHEMA = pa.schema([
    ("mention_id", pa.string()),
    ("post_id", pa.string()),
    ("mention", pa.string()),
    ("text", pa.string()),  # the context
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("gold_entity_id", pa.string()),
])

#: a mention span found in (or given with) a post; character offsets into ``text``, end exclusive
SPAN = pa.struct([("mention", pa.string()), ("start", pa.int32()), ("end", pa.int32())])

POST_SCHEMA = pa.schema([
    ("post_id", pa.string()),
    ("text", pa.string()),
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("mentions", pa.list_(SPAN)),
])

CANDIDATE = pa.struct([("entity_id", pa.string()), ("score", pa.float32())])

LINK_OUTPUT_SCHEMA = pa.schema([
    ("mention_id", pa.string()),
    ("post_id", pa.string()),
    ("mention", pa.string()),
    ("start", pa.int32()),
    ("end", pa.int32()),
    ("entity_id", pa.string()),  # null = NIL
    ("score", pa.float32()),
    ("candidates", pa.list_(CANDIDATE)),  # top-k, best first
    ("status", pa.string()),  # one of LINK_STATUSES
    ("error", pa.string()),  # the reason; null unless status == "error"
    ("warning", pa.string()),  # null, or why a linked row had less to go on (no_context: the row had no text)
    ("model_version", pa.string()),
    ("index_version", pa.string()),
])

LINK_STATUSES = ("ok", "nil", "no_mention", "error")

SCHEMAS: dict[str, pa.Schema] = {
    "KB": KB_SCHEMA,
    "mentions": MENTION_SCHEMA,
    "posts": POST_SCHEMA,
    "link output": LINK_OUTPUT_SCHEMA,
}

#: columns a table of each kind must have; the others are optional (see OPTIONAL_DEFAULTS)
REQUIRED: dict[str, tuple[str, ...]] = {
    "KB": ("entity_id", "name"),
    "mentions": ("mention_id", "mention"),
    "posts": ("post_id", "text"),
    "link output": tuple(LINK_OUTPUT_SCHEMA.names),
}

#: value of an optional column that is absent from the file (any other absent column is null)
OPTIONAL_DEFAULTS: dict[str, dict[str, str]] = {
    "KB": {"attributes": ""},
    "mentions": {"text": ""},
}

#: id columns that must be non-null and unique, per kind
UNIQUE_IDS: dict[str, str] = {"KB": "entity_id", "mentions": "mention_id"}


class SchemaError(ValueError):
    """A table that does not follow its data contract (the message is one line)."""


def _kind_schema(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown table kind {kind!r}; expected one of {', '.join(SCHEMAS)}") from None


def check_columns(table_or_schema: pa.Table | pa.Schema, kind: str, where: str) -> None:
    """Raise :class:`SchemaError` if the ``kind`` table at ``where`` lacks required columns.

    ``kind`` is one of ``"KB"``, ``"mentions"``, ``"posts"``, ``"link output"``; ``where`` is
    the file or URI, named in the message together with the missing columns.
    """
    _kind_schema(kind)
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    missing = [c for c in REQUIRED[kind] if c not in schema.names]
    if missing:
        raise SchemaError(f"{where}: the {kind} table lacks required column(s) {', '.join(missing)} "
                          f"(it has: {', '.join(schema.names) or 'no columns'})")


def conform(table: pa.Table, kind: str, where: str) -> pa.Table:
    """The table in its contract's shape: required columns checked, absent optional columns
    added (default or null), contract columns cast to their types and placed first.

    Extra columns are kept after the contract's (a user's dump may carry more). A column that
    cannot be cast to its contract type is a :class:`SchemaError` naming it.
    """
    schema = _kind_schema(kind)
    check_columns(table, kind, where)
    defaults = OPTIONAL_DEFAULTS.get(kind, {})
    columns: list[pa.ChunkedArray | pa.Array] = []
    for field in schema:
        if field.name not in table.column_names:
            default = defaults.get(field.name)
            columns.append(pa.nulls(table.num_rows, field.type) if default is None
                           else pa.array([default] * table.num_rows, field.type))
            continue
        col = table.column(field.name)
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaError(f"{where}: column {field.name} of type {col.type} cannot be read as "
                                  f"{field.type} ({kind} table)") from exc
        columns.append(col)
    extra = [name for name in table.column_names if name not in schema.names]
    out_schema = pa.schema(list(schema) + [table.schema.field(name) for name in extra])
    return pa.Table.from_arrays(columns + [table.column(name) for name in extra], schema=out_schema)


def bad_utf8_rows(column: pa.Array | pa.ChunkedArray) -> list[int]:
    """Rows of a string (or list of strings) column whose bytes are not valid UTF-8: Parquet
    stores what its writer gave it, and decoding fails only when a value is turned into a Python
    string. Checked in C++ first (a valid column costs one pass), row by row only when that fails."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    bad, first = [], 0
    for chunk in chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):  # the rows of the bad items
                parents = pc.list_parent_indices(chunk).to_numpy()
                bad += sorted({first + int(parents[i]) for i in bad_utf8_rows(chunk.flatten())})
                first += len(chunk)
                continue
            for i in range(len(chunk)):
                try:
                    chunk.slice(i, 1).validate(full=True)
                except pa.ArrowInvalid:
                    bad.append(first + i)
        first += len(chunk)
    return bad


def without_rows(column: pa.Array | pa.ChunkedArray, rows: list[int]) -> pa.Array:
    """``column`` with ``rows`` set to null, without decoding its strings (their bytes may not
    be UTF-8)."""
    import numpy as np

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    mask = np.zeros(len(column), dtype=bool)
    mask[rows] = True
    nulls = pa.nulls(len(column), column.type)
    if pa.types.is_string(column.type):  # through binary: neither side is decoded
        kept = pc.if_else(pa.array(mask), nulls.cast(pa.binary()), column.cast(pa.binary()))
        return kept.cast(pa.string())
    return pc.if_else(pa.array(mask), nulls, column)


def check_unique_ids(table: pa.Table, kind: str, where: str) -> None:
    """Raise :class:`SchemaError` on null or duplicate ids (``entity_id`` / ``mention_id``),
    naming a few of the duplicates."""
    id_column = UNIQUE_IDS[kind]
    ids = table.column(id_column)
    if ids.null_count:
        raise SchemaError(f"{where}: {ids.null_count} {kind} row(s) have a null {id_column}")
    if len(pc.unique(ids)) == len(ids):
        return
    counts = pc.value_counts(ids)
    dups = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    examples = ", ".join(repr(v) for v in dups.field("values").to_pylist()[:5])
    raise SchemaError(f"{where}: {len(dups)} duplicate {id_column}(s) in the {kind} table, e.g. {examples}")


def check_kb(table: pa.Table, where: str) -> pa.Table:
    """A conformed KB table with non-null, unique entity ids."""
    table = conform(table, "KB", where)
    check_unique_ids(table, "KB", where)
    return table


def check_mentions(table: pa.Table, where: str) -> pa.Table:
    """A conformed mentions table with non-null, unique mention ids (link output is
    accounted per mention_id)."""
    table = conform(table, "mentions", where)
    check_unique_ids(table, "mentions", where)
    return table


def _read_local_parquet(path: str | Path, kind: str) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({kind}): {exc}") from exc


def read_kb(path: str | Path) -> pa.Table:
    """Read a local KB Parquet file, checked and conformed (see :func:`check_kb`)."""
    return check_kb(_read_local_parquet(path, "KB"), str(path))


def read_mentions(path: str | Path) -> pa.Table:
    """Read a local mentions Parquet file, checked and conformed (see :func:`check_mentions`)."""
    return check_mentions(_read_local_parquet(path, "mentions"), str(path))
