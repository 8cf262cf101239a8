"""Import the MIMIC release of WikiMEL, RichpediaMEL and WikiDiverse as an otmel dataset (one
cohesive thing over ~500 lines: one release format, three datasets' quirks).

OT-MEL (ACL Findings 2024) trains and evaluates on the cleaned releases published with MIMIC
(Luo et al., KDD 2023, github.com/pengfei-luo/MIMIC). :func:`import_mimic` converts one such
release directory into the dataset layout of DESIGN.md: ``out/kb.parquet`` and
``out/mentions/{train,dev,test}.parquet`` (schemas in :mod:`otmel.data.schemas`), images embedded
as bytes.

Release layout relied on (from the MIMIC repository's ``config/*.yaml`` and
``codes/utils/dataset.py``, read for format facts only; see also the notes below):

* ``kb_entity.json``: a JSON list of entity records with ``qid`` (Wikidata id), ``id`` (dense
  integer row id), ``entity_name`` (URL-quoted), ``attr`` (the attributes, already one text
  "attribute value. attribute value. ...", the paper's "attributes as texts separated by
  period"), ``image_list`` (file names under ``kb_image/``; may be empty) and ``type``.
* ``qid2id.json``: one JSON object QID -> ``id``. Used only to recover the QID of records
  that lack ``qid``.
* ``{PREFIX}_{train,dev,test}.json`` with PREFIX ``WIKIMEL``, ``RichpediaMEL`` or
  ``wiki_diverse``: JSON lists of mention records with ``mentions`` (the mention string,
  URL-quoted), ``sentence`` (the context), ``imgPath`` (the post image, ``""`` if none),
  ``answer`` (the gold QID, or ``"nil"`` for mentions without a KB entity) and often ``id``.
* ``kb_image/`` and ``mention_image/`` (``mention_images/`` in the RichpediaMEL archive).
  MIMIC converted every mention image to JPEG, so ``imgPath`` "a/b/name.png" is the file
  ``mention_image/name.jpg`` (the name up to its first dot, plus ``.jpg``); the original
  basename is tried as well.

Conversion rules:

* ``entity_id`` = the QID; names and mention strings are URL-unquoted (MIMIC unquotes them;
  the sentences are not quoted). ``attr`` given as a list or a mapping (other tools' dumps)
  is joined into the same period-separated text. ``aliases`` are taken if a record has them.
* The entity image is the first file of ``image_list`` that exists and decodes (MIMIC
  evaluates with the first). Every image is checked with :func:`otmel.io.images.decode_image`
  and stored as the file's original bytes. A referenced file that is absent is counted as
  *missing*, one that does not decode (or is too large) as *unreadable*; either way the
  cell is null and the import goes on.
* ``"nil"`` answers are skipped and counted (MIMIC drops them too), as are answers whose QID
  is not in the KB, records lacking required fields, and repeated KB QIDs (first kept).
* ``mention_id`` is the record's ``id`` when every record has one and they are unique across
  the splits, else ``<split>-<position in the file>``. MIMIC has no post ids: ``post_id`` is
  a hash of (sentence, imgPath), so mentions of one sentence+image share a post.

A root missing required files (or a parent directory holding the release under its usual
name, e.g. ``WikiMEL/``) gives a one-line FileNotFoundError naming what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from otmel.io.images import ImageDecodeError, decode_image
from otmel.data.schemas import KB_SCHEMA, MENTION_SCHEMA

log = logging.getLogger(__name__)

DatasetName = Literal["wikimel", "richpediamel", "wikidiverse"]
SPLITS = ("train", "dev", "test")
KB_FILE = "kb_entity.json"
QID2ID_FILE = "qid2id.json"
KB_IMAGE_DIRS = ("kb_image", "kb_images")
MENTION_IMAGE_DIRS = ("mention_image", "mention_images")
NIL = "nil"
#: image files larger than this are refused as unreadable (no real dataset image is this big)
MAX_IMAGE_FILE_BYTES = 64 << 20
#: rows per Parquet row group (images make rows large)
BATCH_ROWS = 256
#: how many skipped/missing items are logged one by one before only counting
_LOG_EXAMPLES = 5


@dataclass(frozen=True)
class _Layout:
    folder: str  # the release's directory name
    prefix: str  # split files are "{prefix}_{split}.json"


LAYOUTS: dict[str, _Layout] = {
    "wikimel": _Layout("WikiMEL", "WIKIMEL"),
    "richpediamel": _Layout("RichpediaMEL", "RichpediaMEL"),
    "wikidiverse": _Layout("WikiDiverse", "wiki_diverse"),
}


class MimicFormatError(ValueError):
    """A release file whose content is not in the expected format (one-line message)."""


@dataclass
class ImportReport:
    """Counts of an import (the CLI prints ``str(report)``)."""

    dataset: str
    entities: int = 0
    entities_with_image: int = 0
    mentions: dict[str, int] = field(default_factory=dict)  # rows written per split
    mentions_with_image: int = 0
    nil_skipped: int = 0
    unknown_gold_skipped: int = 0
    malformed_skipped: int = 0  # KB or mention records lacking required fields
    duplicate_entities_skipped: int = 0
    kb_images_missing: int = 0
    kb_images_unreadable: int = 0
    mention_images_missing: int = 0
    mention_images_unreadable: int = 0

    @property
    def images_missing(self) -> int:
        return self.kb_images_missing + self.mention_images_missing

    @property
    def images_unreadable(self) -> int:
        return self.kb_images_unreadable + self.mention_images_unreadable

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.mentions.items())
        return (f"{self.entities} entities ({self.entities_with_image} with image); mentions: {splits} "
                f"({self.mentions_with_image} with image); skipped: {self.nil_skipped} nil, "
                f"{self.unknown_gold_skipped} unknown gold entity, {self.malformed_skipped} malformed, "
                f"{self.duplicate_entities_skipped} duplicate entities; images missing: "
                f"{self.kb_images_missing} KB, {self.mention_images_missing} mentions; images unreadable: "
                f"{self.kb_images_unreadable} KB, {self.mention_images_unreadable} mentions")


@dataclass(frozen=True)
class Release:
    """The files of one release directory."""

    root: Path
    kb: Path
    qid2id: Path | None
    splits: dict[str, Path]
    kb_images: Path | None
    mention_images: Path | None


def locate_release(root: str | Path, dataset: DatasetName) -> Release:
    """Find the release files of ``dataset`` under ``root`` (the release directory itself or
    its parent); FileNotFoundError naming every missing required file otherwise."""
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[dataset]
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (the {dataset} release root)")
    if not (root / KB_FILE).is_file() and (root / layout.folder / KB_FILE).is_file():
        root = root / layout.folder
    splits = {split: _split_file(root, layout, split) for split in SPLITS}
    missing = ([KB_FILE] if not (root / KB_FILE).is_file() else []) + [
        f"{layout.prefix}_{split}.json" for split, path in splits.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{root}: not a {dataset} MIMIC release, missing {', '.join(missing)} "
                                f"(expected {KB_FILE}, {layout.prefix}_{{train,dev,test}}.json, kb_image/, "
                                "mention_image/)")
    return Release(
        root=root,
        kb=root / KB_FILE,
        qid2id=root / QID2ID_FILE if (root / QID2ID_FILE).is_file() else None,
        splits={k: v for k, v in splits.items() if v is not None},
        kb_images=_first_dir(root, KB_IMAGE_DIRS),
        mention_images=_first_dir(root, MENTION_IMAGE_DIRS),
    )


def _split_file(root: Path, layout: _Layout, split: str) -> Path | None:
    """``{prefix}_{split}.json``, else the one file whose name ends (case-insensitively) so."""
    exact = root / f"{layout.prefix}_{split}.json"
    if exact.is_file():
        return exact
    suffix = f"_{split}.json"
    matches = [p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _load_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MimicFormatError(f"{path}: not valid JSON ({exc})") from exc


def _load_records(path: Path) -> list[dict]:
    """A JSON list of record objects (a mapping of records is accepted too)."""
    data = _load_json(path)
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MimicFormatError(f"{path}: expected a JSON list of objects (records)")
    return data


# ---------------------------------------------------------------------------- field conversion
def attributes_text(attr: Any) -> str:
    """Entity attributes as one text, attributes separated by periods (the paper's form)."""
    if attr is None:
        return ""
    if isinstance(attr, str):
        return attr.strip()
    if isinstance(attr, dict):
        parts = [f"{k}: {_join_value(v)}" for k, v in attr.items()]
    elif isinstance(attr, (list, tuple)):
        parts = [_join_value(a) for a in attr]
    else:
        parts = [str(attr)]
    parts = [p.strip().rstrip(".").strip() for p in parts]
    return ". ".join(p for p in parts if p) + ("." if any(parts) else "")


def _join_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else (None if value is None else str(value))


def _post_id(sentence: str, img_path: str) -> str:
    digest = hashlib.sha1(f"{sentence}\x00{img_path}".encode("utf-8")).hexdigest()
    return f"post-{digest[:16]}"


# ---------------------------------------------------------------------------- images
def _inside(directory: Path, name: str) -> Path | None:
    """``directory / name`` if that stays inside ``directory`` (names come from data files)."""
    if not name or name in (".", ".."):
        return None
    path = directory / name
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return None
    return path


def kb_image_candidates(directory: Path | None, name: str) -> list[Path]:
    """Files an ``image_list`` entry may be: the name as given, its basename, unquoted."""
    if directory is None or not name:
        return []
    base = name.replace("\\", "/").split("/")[-1]
    return _unique_paths(directory, [name, base, unquote(base)])


def mention_image_candidates(directory: Path | None, img_path: str) -> list[Path]:
    """Files an ``imgPath`` may be: MIMIC's JPEG rename (basename up to its first dot +
    ``.jpg``) first, then the basename as given, each also URL-unquoted."""
    if directory is None or not img_path:
        return []
    base = img_path.replace("\\", "/").split("/")[-1]
    jpg = base.split(".")[0] + ".jpg"
    return _unique_paths(directory, [jpg, base, unquote(jpg), unquote(base)])


def _unique_paths(directory: Path, names: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for n in names:
        p = _inside(directory, n)
        if p is not None and p not in out:
            out.append(p)
    return out


@dataclass(frozen=True)
class _ImageResult:
    data: bytes | None
    status: Literal["ok", "none", "missing", "unreadable"]
    detail: str = ""


def _load_image(groups: Sequence[Sequence[Path]]) -> _ImageResult:
    """The first decodable file among the candidate groups (one group per referenced image,
    tried in order; a group lists the spellings of one file name). ``none`` when nothing was
    referenced, ``missing`` when no referenced file exists, ``unreadable`` when files exist
    but none decodes."""
    if not groups:
        return _ImageResult(None, "none")
    unreadable = ""
    for candidates in groups:
        for path in candidates:
            if not path.is_file():
                continue
            try:
                size = path.stat().st_size
                if size > MAX_IMAGE_FILE_BYTES:
                    raise ImageDecodeError(f"{size} bytes exceeds the {MAX_IMAGE_FILE_BYTES} byte limit")
                data = path.read_bytes()
                decode_image(data)
                return _ImageResult(data, "ok")
            except (OSError, ImageDecodeError) as exc:
                unreadable = unreadable or f"{path}: {exc}"
            break  # the first existing candidate is the file; do not try the other spellings
    if unreadable:
        return _ImageResult(None, "unreadable", unreadable)
    tried = [str(g[0]) for g in groups if g]
    return _ImageResult(None, "missing", ", ".join(tried) if tried else "no image folder or no usable file name")


class _Counter:
    """Counts one kind of skipped or degraded item, logging the first few examples at
    ``level`` (the rest at DEBUG)."""

    def __init__(self, what: str, level: int = logging.WARNING):
        self.what = what
        self.level = level
        self.n = 0

    def add(self, detail: str) -> None:
        self.n += 1
        log.log(self.level if self.n <= _LOG_EXAMPLES else logging.DEBUG, "%s: %s", self.what, detail)


# ---------------------------------------------------------------------------- writing
class _ParquetOut:
    """Writes row batches to ``path`` through a temporary file, renamed on success."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.schema = schema
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.rows = 0

    def write(self, columns: dict[str, list]) -> None:
        batch = pa.record_batch([pa.array(columns[f.name], f.type) for f in self.schema], schema=self.schema)
        self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------- import
@dataclass
class _EntityRecord:
    qid: str
    name: str
    attributes: str
    images: list[list[Path]]
    aliases: list[str] | None


@dataclass
class _MentionRecord:
    mention_id: str
    post_id: str
    mention: str
    text: str
    images: list[list[Path]]
    gold: str


def import_mimic(root: str | Path, dataset: DatasetName, out: str | Path, workers: int | None = None) -> ImportReport:
    """Convert the MIMIC release of ``dataset`` at ``root`` into an otmel dataset at ``out``.

    ``dataset`` is ``"wikimel"``, ``"richpediamel"`` or ``"wikidiverse"``; ``root`` is the
    release directory (``kb_entity.json``, split files, image folders) or its parent. Writes
    ``out/kb.parquet`` and ``out/mentions/{train,dev,test}.parquet``; ``workers`` threads
    read and check images (default: up to 4). Returns the counts as an :class:`ImportReport`.
    """
    release = locate_release(root, dataset)
    report = ImportReport(dataset=dataset)
    out = Path(out)
    (out / "mentions").mkdir(parents=True, exist_ok=True)
    if release.kb_images is None:
        log.warning("%s: no %s directory; KB entities get no image", release.root, " or ".join(KB_IMAGE_DIRS))
    if release.mention_images is None:
        log.warning("%s: no %s directory; mentions get no image", release.root, " or ".join(MENTION_IMAGE_DIRS))

    malformed = _Counter("malformed record skipped")
    entities = _read_entities(release, report, malformed)
    if not entities:
        raise MimicFormatError(f"{release.kb}: no usable entity (each needs a qid, or an id listed in "
                               f"{QID2ID_FILE}, and an entity_name)")
    mentions = _read_mentions(release, {e.qid for e in entities}, report, malformed)

    n_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        _write_kb(entities, out / "kb.parquet", pool, report)
        for split, records in mentions.items():
            _write_mentions(records, out / "mentions" / f"{split}.parquet", pool, report)
            report.mentions[split] = len(records)
    report.malformed_skipped = malformed.n
    log.info("imported %s from %s to %s: %s", dataset, release.root, out, report)
    return report


def _read_entities(release: Release, report: ImportReport, malformed: _Counter) -> list[_EntityRecord]:
    records = _load_records(release.kb)
    id2qid: dict[str, str] = {}
    if release.qid2id is not None:
        mapping = _load_json(release.qid2id)
        if not isinstance(mapping, dict):
            raise MimicFormatError(f"{release.qid2id}: expected a JSON object QID -> id")
        id2qid = {str(v): str(k) for k, v in mapping.items()}
    numbered = list(enumerate(records))  # (position in the file, record)
    if records and all(isinstance(r.get("id"), int) for r in records):
        numbered.sort(key=lambda item: item[1]["id"])  # MIMIC's KB order
    seen: set[str] = set()
    entities = []
    duplicates = _Counter("duplicate KB entity skipped")
    for pos, rec in numbered:
        qid = _text(rec.get("qid")) or id2qid.get(str(rec.get("id")))
        name = _text(rec.get("entity_name"))
        if not qid or name is None:
            malformed.add(f"{release.kb} record {pos}: needs a qid (or an id in {QID2ID_FILE}) and an entity_name")
            continue
        if qid in seen:
            duplicates.add(f"{release.kb} record {pos}: {qid} again")
            continue
        seen.add(qid)
        image_list = rec.get("image_list") or []
        if isinstance(image_list, str):
            image_list = [image_list]
        aliases = rec.get("aliases")
        aliases = [unquote(a) for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else None
        entities.append(_EntityRecord(
            qid=qid, name=unquote(name), attributes=attributes_text(rec.get("attr")),
            images=[kb_image_candidates(release.kb_images, str(n)) for n in image_list if n],
            aliases=aliases or None,
        ))
    report.duplicate_entities_skipped = duplicates.n
    return entities


def _read_mentions(release: Release, kb_qids: set[str], report: ImportReport,
                   malformed: _Counter) -> dict[str, list[_MentionRecord]]:
    nil = _Counter("nil answer skipped", logging.DEBUG)  # expected: the releases carry NIL mentions
    unknown = _Counter("mention whose gold entity is not in the KB skipped")
    raw = {split: _load_records(path) for split, path in release.splits.items()}
    ids = [_text(r.get("id")) for records in raw.values() for r in records]
    use_record_ids = all(ids) and len(set(ids)) == len(ids)
    out: dict[str, list[_MentionRecord]] = {}
    for split, records in raw.items():
        path = release.splits[split]
        kept = []
        for pos, rec in enumerate(records):
            mention, sentence, answer = _text(rec.get("mentions")), _text(rec.get("sentence")), _text(rec.get("answer"))
            if mention is None or sentence is None or not answer:
                malformed.add(f"{path} record {pos}: needs mentions, sentence and answer")
                continue
            if answer.strip().lower() == NIL:
                nil.add(f"{path} record {pos}")
                continue
            if answer not in kb_qids:
                unknown.add(f"{path} record {pos}: {answer}")
                continue
            img_path = _text(rec.get("imgPath")) or ""
            images = [mention_image_candidates(release.mention_images, img_path)] if img_path else []
            kept.append(_MentionRecord(
                mention_id=str(rec["id"]) if use_record_ids else f"{split}-{pos}",
                post_id=_post_id(sentence, img_path), mention=unquote(mention), text=sentence,
                images=images, gold=answer,
            ))
        out[split] = kept
    report.nil_skipped = nil.n
    report.unknown_gold_skipped = unknown.n
    return out


def _count_image(result: _ImageResult, missing: _Counter, unreadable: _Counter) -> None:
    if result.status == "missing":
        missing.add(result.detail)
    elif result.status == "unreadable":
        unreadable.add(result.detail)


def _write_kb(entities: list[_EntityRecord], path: Path, pool: ThreadPoolExecutor, report: ImportReport) -> None:
    missing, unreadable = _Counter("KB image missing"), _Counter("KB image unreadable")
    writer = _ParquetOut(path, KB_SCHEMA)
    try:
        for batch in _batches(entities, BATCH_ROWS):
            images = list(pool.map(_load_image, [e.images for e in batch]))
            for result in images:
                _count_image(result, missing, unreadable)
            writer.write({
                "entity_id": [e.qid for e in batch],
                "name": [e.name for e in batch],
                "attributes": [e.attributes for e in batch],
                "image": [r.data for r in images],
                "image_uri": [None] * len(batch),
                "aliases": [e.aliases for e in batch],
            })
            report.entities_with_image += sum(r.data is not None for r in images)
            if writer.rows % (BATCH_ROWS * 40) == 0:
                log.info("KB: %d of %d entities", writer.rows, len(entities))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    report.entities = writer.rows
    report.kb_images_missing = missing.n
    report.kb_images_unreadable = unreadable.n


def _write_mentions(records: list[_MentionRecord], path: Path, pool: ThreadPoolExecutor,
                    report: ImportReport) -> None:
    missing, unreadable = _Counter("mention image missing"), _Counter("mention image unreadable")
    writer = _ParquetOut(path, MENTION_SCHEMA)
    try:
        for batch in _batches(records, BATCH_ROWS):
            images = list(pool.map(_load_image, [m.images for m in batch]))
            for result in images:
                _count_image(result, missing, unreadable)
            writer.write({
                "mention_id": [m.mention_id for m in batch],
                "post_id": [m.post_id for m in batch],
                "mention": [m.mention for m in batch],
                "text": [m.text for m in batch],
                "image": [r.data for r in images],
                "image_uri": [None] * len(batch),
                "gold_entity_id": [m.gold for m in batch],
            })
            report.mentions_with_image += sum(r.data is not None for r in images)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    report.mention_images_missing += missing.n
    report.mention_images_unreadable += unreadable.n
