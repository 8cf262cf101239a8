"""Knowledge-graph triples and per-entity modal features.

Input format (as WN9-IMG and FB-IMG ship): a directory with files ``train``, ``valid`` and
``test`` (``.txt`` / ``.tsv`` accepted too), one ``head<TAB>relation<TAB>tail`` per line.
Entities are named by their KB ``entity_id`` (or mapped with an entity-map file:
``name<TAB>entity_id`` per line).

The vocabulary is built from the training triples. A valid/test triple naming a relation or
an entity the training split never saw cannot be scored: it is skipped and counted (and the
count reported), never silently dropped. Duplicate triples are counted and kept once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SUFFIXES = ("", ".txt", ".tsv")


class KGFormatError(ValueError):
    """A triples directory or feature file that cannot be used (the message says why)."""


@dataclass
class KGData:
    """Triples as id arrays (n, 3) of (head, relation, tail), the vocabularies, and what was
    skipped while reading."""

    entities: list[str]
    relations: list[str]
    splits: dict[str, np.ndarray]
    skipped: dict[str, Counter] = field(default_factory=dict)  # split -> reason -> count
    _filters: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def entity_index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entities)}

    def filters(self) -> tuple[dict[tuple[int, int], np.ndarray], dict[tuple[int, int], np.ndarray]]:
        """Every known true tail of (head, relation) and true head of (relation, tail) over all
        splits: the filtered setting ranks a test triple only against corrupted triples that
        are not true. Built once (every validation of a run asks for them)."""
        if self._filters is None:
            self._filters = self._build_filters()
        return self._filters

    def _build_filters(self):
        tails: dict[tuple[int, int], set] = {}
        heads: dict[tuple[int, int], set] = {}
        for arr in self.splits.values():
            for h, r, t in arr.tolist():
                tails.setdefault((h, r), set()).add(t)
                heads.setdefault((r, t), set()).add(h)
        return ({k: np.fromiter(v, np.int64) for k, v in tails.items()},
                {k: np.fromiter(v, np.int64) for k, v in heads.items()})

    def summary(self) -> dict:
        return {"entities": self.num_entities, "relations": self.num_relations,
                **{f"{s}_triples": int(len(a)) for s, a in self.splits.items()},
                "skipped": {s: dict(c) for s, c in self.skipped.items() if c}}


def _split_uri(directory: str, split: str, s3_endpoint: str | None) -> str | None:
    from otmel.io.storage import exists, join

    for suffix in SUFFIXES:
        uri = join(directory, split + suffix)
        if exists(uri, s3_endpoint):
            return uri
    return None


def read_entity_map(uri: str | None, s3_endpoint: str | None = None) -> dict[str, str] | None:
    """``name<TAB>entity_id`` lines -> {name: entity_id}."""
    if not uri:
        return None
    from otmel.io.storage import read_bytes

    out: dict[str, str] = {}
    for n, line in enumerate(read_bytes(uri, s3_endpoint).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2:
            raise KGFormatError(f"{uri}: line {n} is not name<TAB>entity_id")
        out[parts[0]] = parts[1]
    return out


def parse_triples(text: str, where: str) -> list[tuple[str, str, str]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise KGFormatError(f"{where}: line {n} is not head<TAB>relation<TAB>tail: {line[:80]!r}")
        rows.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return rows


def load_triples(directory: str, s3_endpoint: str | None = None, entity_map: dict[str, str] | None = None,
                 splits: tuple[str, ...] = SPLITS) -> KGData:
    """Read ``train`` (required) and the other splits present; ids from the training split."""
    from otmel.io.storage import read_bytes

    raw: dict[str, list[tuple[str, str, str]]] = {}
    for split in splits:
        uri = _split_uri(directory, split, s3_endpoint)
        if uri is None:
            if split == "train":
                raise KGFormatError(f"{directory}: no train file (expected train, train.txt or train.tsv)")
            continue
        rows = parse_triples(read_bytes(uri, s3_endpoint).decode("utf-8"), uri)
        if entity_map is not None:
            rows = [(entity_map.get(h, h), r, entity_map.get(t, t)) for h, r, t in rows]
        raw[split] = rows
    if not raw["train"]:
        raise KGFormatError(f"{directory}: the train split holds no triples")
    entities = sorted({e for h, _, t in raw["train"] for e in (h, t)})
    relations = sorted({r for _, r, _ in raw["train"]})
    eid = {e: i for i, e in enumerate(entities)}
    rid = {r: i for i, r in enumerate(relations)}
    out, skipped = {}, {}
    for split, rows in raw.items():
        reasons: Counter = Counter()
        seen, ids = set(), []
        for h, r, t in rows:
            if r not in rid:
                reasons["unknown_relation"] += 1
                continue
            if h not in eid or t not in eid:
                reasons["unknown_entity"] += 1
                continue
            key = (eid[h], rid[r], eid[t])
            if key in seen:
                reasons["duplicate"] += 1
                continue
            seen.add(key)
            ids.append(key)
        out[split] = np.asarray(ids, dtype=np.int64).reshape(-1, 3)
        skipped[split] = reasons
        if reasons:
            log.warning("%s split: skipped %s (of %d triples)", split, dict(reasons), len(rows))
    return KGData(entities, relations, out, skipped)


def with_reciprocals(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """(h, r, t) -> also (t, r + R, h): every query becomes "predict the tail", the recipe of
    Lacroix et al. (2018) the OTKGE release builds on."""
    inverse = np.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], axis=1)
    return np.concatenate([triples, inverse], axis=0)


# ---------------------------------------------------------------------------- modal features
@dataclass
class EntityFeatures:
    """Per-entity feature matrices aligned with a :class:`KGData` entity list; ``present``
    marks the rows the feature file had (the others are zeros)."""

    matrices: dict[str, np.ndarray]  # modality -> (num_entities, n_k) float32
    present: dict[str, np.ndarray]  # modality -> (num_entities,) bool
    unknown_ids: int = 0  # feature rows whose entity_id is not in the KG


#: a features DIRECTORY (the .npy form): the entity id of each matrix row, one per line
NPY_ENTITIES = "entities.txt"


def _npy_features(uri: str, modalities: tuple[str, ...], s3_endpoint: str | None):
    """A directory with ``entities.txt`` (row order) and ``<modality>.npy`` (rows x dims) as
    the table :func:`load_features` reads."""
    import io

    import pyarrow as pa

    from otmel.io.storage import join, read_bytes

    try:
        ids = read_bytes(join(uri, NPY_ENTITIES), s3_endpoint).decode().splitlines()
    except FileNotFoundError:
        raise KGFormatError(f"{uri}: a features directory needs {NPY_ENTITIES} (the entity id of each .npy row); a Parquet file's name ends in .parquet") from None
    columns = {"entity_id": pa.array(ids, pa.string())}
    for m in modalities:
        try:
            matrix = np.load(io.BytesIO(read_bytes(join(uri, f"{m}.npy"), s3_endpoint)), allow_pickle=False)
        except FileNotFoundError:
            raise KGFormatError(f"{uri}: no {m}.npy for --modalities including {m}") from None
        except ValueError as exc:
            raise KGFormatError(f"{uri}/{m}.npy: not a numeric .npy array ({exc})") from None
        if matrix.ndim != 2 or matrix.shape[0] != len(ids):
            raise KGFormatError(f"{uri}/{m}.npy: shape {matrix.shape}, expected ({len(ids)} rows of {NPY_ENTITIES}, "
                                f"dims): rows must match the entity list")
        columns[m] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float32).reshape(-1)), matrix.shape[1])
    return pa.table(columns)


def load_features(uri: str, entities: list[str], modalities: tuple[str, ...],
                  s3_endpoint: str | None = None) -> EntityFeatures:
    """A Parquet file with ``entity_id`` and one list<float> column per modality (``ling``,
    ``visual``), all vectors of a column the same length; or a directory of ``<modality>.npy``
    matrices whose rows ``entities.txt`` names (one id per line, in row order). Entities
    without a row get zeros (counted); rows of entities not in the KG are counted and
    ignored; a missing column, a duplicate id, vectors of different lengths or a matrix
    whose rows do not match the entity list are errors."""
    from otmel.io.storage import read_parquet

    if uri.rstrip("/").endswith(".parquet"):
        table = read_parquet(uri, s3_endpoint)
    else:
        table = _npy_features(uri, modalities, s3_endpoint)
    if "entity_id" not in table.column_names:
        raise KGFormatError(f"{uri}: no entity_id column")
    ids = [str(x) for x in table.column("entity_id").to_pylist()]
    dup = [k for k, c in Counter(ids).items() if c > 1]
    if dup:
        raise KGFormatError(f"{uri}: {len(dup)} entity_id(s) appear more than once, e.g. {dup[0]!r}")
    index = {e: i for i, e in enumerate(entities)}
    rows = np.array([index.get(e, -1) for e in ids], dtype=np.int64)
    matrices, present = {}, {}
    for m in modalities:
        col = m  # the Parquet column is named after the modality
        if col not in table.column_names:
            raise KGFormatError(f"{uri}: no {col!r} column for --modalities including {m}")
        values = table.column(col).to_pylist()
        lengths = {len(v) for v in values if v is not None}
        if len(lengths) != 1:
            raise KGFormatError(f"{uri}: {col} vectors have lengths {sorted(lengths)[:5]}: need one length")
        dim = lengths.pop()
        mat = np.zeros((len(entities), dim), dtype=np.float32)
        has = np.zeros(len(entities), dtype=bool)
        for r, v in zip(rows, values):
            if r >= 0 and v is not None:
                mat[r] = np.asarray(v, dtype=np.float32)
                has[r] = True
        if not np.isfinite(mat).all():
            raise KGFormatError(f"{uri}: {col} holds NaN or infinite values")
        if (~has).any():
            log.warning("%s: %d of %d KG entities have no %s vector (zeros used)", uri, int((~has).sum()),
                        len(entities), col)
        matrices[m], present[m] = mat, has
    unknown = int((rows < 0).sum())
    if unknown:
        log.warning("%s: %d feature rows name entities absent from the triples (ignored)", uri, unknown)
    return EntityFeatures(matrices, present, unknown)
