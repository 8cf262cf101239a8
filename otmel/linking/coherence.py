"""Collective disambiguation: a post's mentions vote for each other's candidates through KGE
entity embeddings (``otmel link --kge-embeddings URI [--coherence-weight W]``).

Posts often name several related entities (the OT-MEL paper's "Robert" and "Holland",
co-stars). OT-MEL scores each mention alone (S_O); OTKGE embeddings (``otmel kge embed``)
place entities related in the knowledge graph near each other. For a post P with mentions
i, each with its top-k candidates c and their scores S_O(i, c) (best first):

    t_j        = the top-1 candidate of mention j by S_O (before coherence)
    O_i        = { j in P : j != i, t_j has a KGE vector }
    coh(i, c)  = (1 / |O_i|) * sum_{j in O_i} cos(v_c, v_{t_j})       (0 if O_i is empty
                                                                         or c has no vector)
    S(i, c)    = S_O(i, c) + W * coh(i, c)

The k candidates of each mention are re-ordered by S (ties by entity id, as everywhere) and
the NIL decision is taken on the new top-1 score with the threshold calibrated FOR W
(``otmel calibrate --kge-embeddings`` chooses W on dev data, the one of highest top-1
accuracy, then the threshold on S; both are stored in the model with the embeddings'
version). Only the k candidates written are re-ordered: raise ``--top-k`` to let coherence
reach further down the list.

Why the top-1 of the other mentions and not all their candidates: the others' wrong
candidates would vote too, and in a KB where namesakes are spread over many communities
most candidates of a mention have SOME relative among another mention's candidates. Why a
cosine and not a relation's triple score: it needs one vector per entity (what ``embed``
writes), works for every ``--model``, and OTKGE's 1-N training places entities with shared
neighbours close (measured in tests/test_coherence.py and bench/results/kge.md).

The rows of a post are together only when an input file's output is committed (the link
stage sees batches, which may split a post), so the link job applies coherence in the
commit (:func:`otmel.linking.link_output.commit_output_file`): a first pass over the file's staged
parts collects every mention's top-1, the second re-scores while writing. Mentions without
a ``post_id`` are their own post (no coherence).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

class EmbeddingsError(ValueError):
    """A KGE embeddings file that cannot be used (the message says why)."""


@dataclass
class EntityVectors:
    """Unit-length KGE vectors by entity id. ``ids`` is a sorted fixed-width bytes array and
    ``vectors`` a float32 matrix: both are read from Ray's object store without a copy."""

    ids: np.ndarray  # (n,) |S sorted
    vectors: np.ndarray  # (n, d) float32, rows of norm 1
    version: str  # sha256 of the file, first 16 hex digits

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, entity_ids) -> np.ndarray:
        """Row of each entity id (-1: no vector; None ids have none)."""
        keys = np.array([b"" if e is None else str(e).encode() for e in entity_ids], dtype=self.ids.dtype
                        if len(self.ids) else "S1")
        if not len(self.ids) or not len(keys):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, keys), 0, len(self.ids) - 1)
        found = (self.ids[pos] == keys) & np.array([e is not None and len(str(e).encode()) <= self.ids.itemsize
                                                    for e in entity_ids])
        return np.where(found, pos, -1).astype(np.int64)


def _missing(uri: str) -> EmbeddingsError:
    return EmbeddingsError(f"{uri}: no such KGE embeddings file (write one with `otmel kge embed`)")


def embeddings_version(uri: str, s3_endpoint: str | None = None) -> str:
    """The content hash of an embeddings file (streamed: the driver never holds the file)."""
    from otmel.io.storage import exists, sha256_of

    if not exists(uri, s3_endpoint):
        raise _missing(uri)
    return sha256_of(uri, s3_endpoint)[:16]


def load_entity_vectors(uri: str, s3_endpoint: str | None = None) -> EntityVectors:
    """Read ``entity_id`` + ``vector`` Parquet (``otmel kge embed``), its version hashed from
    the same bytes. Duplicate ids, vectors of other lengths or non-finite values are errors;
    all-zero vectors are dropped, counted."""
    import pyarrow.parquet as pq

    from otmel.io.storage import read_bytes

    try:
        data = read_bytes(uri, s3_endpoint)
    except FileNotFoundError:
        raise _missing(uri) from None
    version = hashlib.sha256(data).hexdigest()[:16]
    table = pq.read_table(pa.BufferReader(data))
    missing = {"entity_id", "vector"} - set(table.column_names)
    if missing:
        raise EmbeddingsError(f"{uri}: KGE embeddings need columns entity_id and vector; missing {sorted(missing)}")
    ids = table.column("entity_id").to_pylist()
    if any(e is None for e in ids):
        raise EmbeddingsError(f"{uri}: {sum(e is None for e in ids)} row(s) without an entity_id")
    if len(set(ids)) != len(ids):
        raise EmbeddingsError(f"{uri}: {len(ids) - len(set(ids))} duplicate entity_id(s)")
    col = table.column("vector").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type)):
        raise EmbeddingsError(f"{uri}: vector must be a list of floats, got {col.type}")
    lengths = set(_list_lengths(col))
    if len(lengths) > 1 or col.null_count:
        raise EmbeddingsError(f"{uri}: vectors of different lengths {sorted(lengths)[:5]} or null vectors")
    dim = lengths.pop() if lengths else 0
    matrix = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), dim)
    if not np.isfinite(matrix).all():
        raise EmbeddingsError(f"{uri}: {int((~np.isfinite(matrix)).any(axis=1).sum())} vector(s) with NaN or inf")
    norms = np.linalg.norm(matrix, axis=1)
    keep = norms > 0
    if (~keep).any():
        log.warning("%s: %d all-zero KGE vector(s) dropped (those entities get no coherence)", uri, int((~keep).sum()))
    keys = np.array([str(e).encode() for e, k in zip(ids, keep) if k], dtype="S")
    order = np.argsort(keys, kind="stable")
    unit = (matrix[keep] / norms[keep, None])[order]
    return EntityVectors(keys[order], np.ascontiguousarray(unit, dtype=np.float32), version)


def _list_lengths(col: pa.Array) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(col).to_numpy(zero_copy_only=False).tolist()


def post_tops(post_ids, mention_ids, candidate_ids) -> dict[str, list[tuple[str, str]]]:
    """Per post, (mention id, top-1 entity id) of its mentions that have a candidate."""
    tops: dict[str, list[tuple[str, str]]] = {}
    for post, mention, cands in zip(post_ids, mention_ids, candidate_ids):
        if post is not None and cands:
            tops.setdefault(str(post), []).append((str(mention), cands[0]))
    return tops


def coherence(candidate_ids: list, others: list[str], vectors: EntityVectors) -> np.ndarray:
    """coh(i, c) for one mention's candidates given the other mentions' top-1 ids."""
    out = np.zeros(len(candidate_ids), dtype=np.float64)
    rows = vectors.rows(others)
    rows = rows[rows >= 0]
    if not len(rows) or not len(candidate_ids):
        return out
    mine = vectors.rows(candidate_ids)
    has = mine >= 0
    if has.any():
        out[has] = (vectors.vectors[mine[has]] @ vectors.vectors[rows].T).mean(axis=1)
    return out


def mention_coherence(post_ids, mention_ids, candidate_ids: list[list], tops: dict[str, list[tuple[str, str]]],
                      vectors: EntityVectors) -> list[np.ndarray]:
    """coh(i, c) of every mention's candidates (it does not depend on W: calibration
    computes it once for its whole grid)."""
    out = []
    for post, mention, ids in zip(post_ids, mention_ids, candidate_ids):
        others = [] if post is None else [e for m, e in tops.get(str(post), ()) if m != str(mention)]
        out.append(coherence(ids, others, vectors))
    return out


def reorder(candidate_ids: list[list], candidate_scores: list[list], coh: list[np.ndarray],
            weight: float) -> tuple[list[list], list[list]]:
    """Each mention's candidates re-ordered by S = S_O + W * coh (ties by entity id);
    returns (ids, scores) lists in the new order."""
    new_ids, new_scores = [], []
    for ids, scores, c in zip(candidate_ids, candidate_scores, coh):
        s = np.asarray(scores, dtype=np.float64) + weight * c
        order = sorted(range(len(ids)), key=lambda k: (-s[k], str(ids[k])))
        new_ids.append([ids[k] for k in order])
        new_scores.append([float(s[k]) for k in order])
    return new_ids, new_scores


def rescore(post_ids, mention_ids, candidate_ids: list[list], candidate_scores: list[list],
            tops: dict[str, list[tuple[str, str]]], vectors: EntityVectors,
            weight: float) -> tuple[list[list], list[list]]:
    """:func:`reorder` by the coherence of each mention's post (:func:`mention_coherence`)."""
    return reorder(candidate_ids, candidate_scores,
                   mention_coherence(post_ids, mention_ids, candidate_ids, tops, vectors), weight)


# ---------------------------------------------------------------------------- link output rows
def post_tops_of_table(table: pa.Table) -> dict[str, list[tuple[str, str]]]:
    """:func:`post_tops` of link output rows (``post_id``, ``mention_id``, ``candidates``)."""
    cands = [[c["entity_id"] for c in row] if row else [] for row in table.column("candidates").to_pylist()]
    return post_tops(table.column("post_id").to_pylist(), table.column("mention_id").to_pylist(), cands)


def apply_to_rows(table: pa.Table, tops: dict[str, list[tuple[str, str]]], vectors: EntityVectors, weight: float,
                  nil_threshold: float | None) -> pa.Table:
    """Link output rows with coherence: candidates re-ordered and re-scored, ``entity_id``,
    ``score`` and the ok/nil ``status`` decided again (other rows unchanged)."""
    from otmel.data.schemas import CANDIDATE

    status = table.column("status").to_pylist()
    rows = table.column("candidates").to_pylist()
    live = [i for i, s in enumerate(status) if s in ("ok", "nil") and rows[i]]
    if not live:
        return table
    posts, mentions = table.column("post_id").to_pylist(), table.column("mention_id").to_pylist()
    ids, scores = rescore([posts[i] for i in live], [mentions[i] for i in live],
                          [[c["entity_id"] for c in rows[i]] for i in live],
                          [[c["score"] for c in rows[i]] for i in live], tops, vectors, weight)
    entity = table.column("entity_id").to_pylist()
    score = table.column("score").to_pylist()
    for i, cid, cs in zip(live, ids, scores):
        rows[i] = [{"entity_id": e, "score": s} for e, s in zip(cid, cs)]
        linked = nil_threshold is None or cs[0] >= nil_threshold
        status[i] = "ok" if linked else "nil"
        entity[i] = cid[0] if linked else None
        score[i] = cs[0]
    out = table
    for name, values, typ in (("candidates", rows, pa.list_(CANDIDATE)), ("entity_id", entity, pa.string()),
                              ("score", score, pa.float32()), ("status", status, pa.string())):
        out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, typ))
    return out
