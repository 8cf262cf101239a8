"""Linking mention features against index shards: retrieve K, rerank with the full S_O, merge.

DESIGN.md "Retrieval then rerank": each shard takes its top K entities by the separable part
of S_O (FAISS inner product of ``retrieval_query`` and ``retrieval_key``), scores those K with
the model's full S_O (``backend.score`` on the stored entity features), and returns its top k;
:func:`merge_topk` keeps the global top k over shards (S*K candidates in all, one round trip).
Ties are broken by entity id so the result does not depend on shard order.

This module has no Ray: the link job wraps :class:`ShardLinker` in an actor; calibration and
tests call it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from otmel.linking.entity_index import Shard
from otmel.model.features import ENTITY_FEATURES, MENTION_FEATURES

log = logging.getLogger(__name__)

#: what a mention batch must carry to be linked
LINK_MENTION_FEATURES = MENTION_FEATURES + ("retrieval_query",)


@dataclass
class Candidates:
    """Top candidates per mention: ids (M, k) object (None = no candidate), scores (M, k) float32 (-inf = none)."""

    entity_ids: np.ndarray
    scores: np.ndarray


class ShardLinker:
    """One shard + the matcher: retrieve K by FAISS, rerank with S_O, keep the top k."""

    def __init__(self, shard: Shard, backend, mention_chunk: int = 64):
        self.shard = shard
        self.backend = backend
        self.mention_chunk = mention_chunk

    def link(self, mentions: dict[str, np.ndarray], candidates: int, top_k: int) -> Candidates:
        M = len(mentions["retrieval_query"])
        K = min(candidates, self.shard.count)
        k = min(top_k, K)
        ids = np.full((M, k), None, dtype=object)
        scores = np.full((M, k), -np.inf, dtype=np.float32)
        if K == 0:
            return Candidates(ids, scores)
        for start in range(0, M, self.mention_chunk):
            sl = slice(start, min(M, start + self.mention_chunk))
            _, rows = self.shard.search(mentions["retrieval_query"][sl], K)  # (m, K), -1 = not found
            found = rows >= 0
            cand = self.shard.gather(rows, ENTITY_FEATURES)  # (m, K, ...)
            overall = self.backend.score({n: mentions[n][sl] for n in MENTION_FEATURES}, cand)["overall"]
            overall = np.where(found, overall.astype(np.float32), -np.inf)  # (m, K)
            order = _order(overall, self.shard.entity_ids[np.clip(rows, 0, None)], k)
            take = np.take_along_axis(rows, order, 1)
            ids[sl] = np.where(np.take_along_axis(found, order, 1), self.shard.entity_ids[np.clip(take, 0, None)], None)
            scores[sl] = np.take_along_axis(overall, order, 1)
        return Candidates(ids, scores)


def _order(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Column order of the top ``k`` per row: score descending, then entity id ascending."""
    if scores.size == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    codes = np.unique(ids.astype(str), return_inverse=True)[1].reshape(ids.shape)  # id order as ints
    return np.lexsort((codes, -scores.astype(np.float64)), axis=1)[:, :k]


def merge_topk(parts: list[Candidates], top_k: int) -> Candidates:
    """Global top ``k`` of per-shard candidate lists (same mentions, same order)."""
    ids = np.concatenate([p.entity_ids for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1)
    k = min(top_k, ids.shape[1])
    order = _order(scores, ids, k)
    return Candidates(np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1))


def link_locally(linkers: list[ShardLinker], mentions: dict[str, np.ndarray], candidates: int, top_k: int) -> Candidates:
    """All shards in this process (calibration, tests, benchmarks)."""
    return merge_topk([lk.link(mentions, candidates, top_k) for lk in linkers], top_k)


def nil_decision(top_scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """True where the mention is linked (top-1 exists and scores >= threshold)."""
    linked = np.isfinite(top_scores)
    if threshold is not None:
        linked &= top_scores >= threshold
    return linked
