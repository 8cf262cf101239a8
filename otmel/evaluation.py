"""Evaluation over all KB entities (the paper's protocol) and retrieve-then-rerank.

Exhaustive: every mention is scored with the full S_O against every KB entity; ranks follow
``otmel.metrics`` (ties count against). Memory is bounded by chunking: entities are
encoded in chunks of ``batch_size`` and a mention chunk is scored against entity chunks of
``entity_chunk``, so the largest score block is ``mention_chunk x E`` floats (the row block
of the current mention chunk) and the largest OT problem batch ``mention_chunk x
entity_chunk``.

Retrieve (``retrieve=K``): stage 1 takes the top K entities by the separable part of S_O
(``retrieval_query . retrieval_key``), stage 2 reranks them with the full S_O (DESIGN.md
"Retrieval then rerank"); a gold entity outside the K candidates has rank inf. Reported
beside H@k/MRR: recall@K of the gold and, when the exhaustive pass is also run, of the
exhaustive top-1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from otmel.metrics import gold_rank_counts, ranking_metrics
from otmel.model.otmel import ENTITY_FEATURES, MENTION_FEATURES, OTMEL
from otmel.model.preprocessing import IssueCounter, Preprocessor

log = logging.getLogger(__name__)


def _cat(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def _take(features: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``index`` (any shape) of every feature: (N, ...) -> (*index.shape, ...)."""
    return {k: v[index] for k, v in features.items()}


@torch.inference_mode()
def encode_rows(model: OTMEL, preprocessor: Preprocessor, table: pa.Table, kind: str, batch_size: int = 64,
                keys: tuple[str, ...] | None = None, issues: IssueCounter | None = None) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Encode a KB (``kind='entity'``) or mention table; returns (features, ok mask)."""
    model.eval()
    if keys is None:
        keys = ENTITY_FEATURES if kind == "entity" else MENTION_FEATURES
    cols = ["name", "attributes", "image"] if kind == "entity" else ["mention", "text", "image"]
    chunks, oks = [], []
    for start in range(0, table.num_rows, batch_size):
        rows = table.slice(start, batch_size).select(cols).to_pydict()
        batch = preprocessor.entities(rows) if kind == "entity" else preprocessor.mentions(rows)
        if issues is not None:
            issues.add(batch)
        feats = model.encode(**batch.model_inputs())
        chunks.append({k: feats[k] for k in keys})
        oks.append(batch.ok)
    return _cat(chunks), np.concatenate(oks)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    ranks: np.ndarray  # (M,) rank of the gold entity per evaluated mention (inf = missed)
    top1: np.ndarray  # (M,) KB row of the top-scored entity


@torch.inference_mode()
def rank_exhaustive(model: OTMEL, mention_feats, entity_feats, gold: torch.Tensor,
                    mention_chunk: int = 64, entity_chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gold ranks under the full S_O against every entity (``otmel.metrics``: ties against,
    a non-finite gold is a miss), the competitors tied with each gold, and top-1 KB rows."""
    M = gold.shape[0]
    E = entity_feats["fused"].shape[0]
    ranks, tied, top1 = np.empty(M), np.empty(M, dtype=np.int64), np.empty(M, dtype=np.int64)
    for ms in range(0, M, mention_chunk):
        m = _take(mention_feats, torch.arange(ms, min(M, ms + mention_chunk)))
        block = torch.cat([
            model.score(m, _take(entity_feats, torch.arange(es, min(E, es + entity_chunk)))).overall
            for es in range(0, E, entity_chunk)
        ], dim=1)  # (m, E)
        g = gold[ms:ms + mention_chunk]
        rows = torch.arange(block.shape[0])
        is_gold = torch.zeros_like(block, dtype=torch.bool)
        is_gold[rows, g] = True
        beaten, t = gold_rank_counts(block, block[rows, g], is_gold)
        ranks[ms:ms + len(g)] = 1.0 + beaten + t
        tied[ms:ms + len(g)] = t
        top1[ms:ms + len(g)] = block.nan_to_num(nan=-float("inf")).argmax(1).numpy()
    return ranks, tied, top1


@torch.inference_mode()
def rank_retrieve_rerank(model: OTMEL, mention_feats, entity_feats, entity_keys: torch.Tensor,
                         mention_queries: torch.Tensor, gold: torch.Tensor, k: int,
                         mention_chunk: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stage 1 top-k by q.k, stage 2 full S_O on the candidates.

    Returns (gold ranks among the reranked candidates (inf if not retrieved or not finite),
    competitors tied with the gold, top-1 KB rows, candidate KB rows (M, k)).
    """
    M = gold.shape[0]
    k = min(k, entity_keys.shape[0])
    ranks, tied, top1 = np.empty(M), np.empty(M, dtype=np.int64), np.empty(M, dtype=np.int64)
    cands = np.empty((M, k), dtype=np.int64)
    for ms in range(0, M, mention_chunk):
        idx = torch.arange(ms, min(M, ms + mention_chunk))
        stage1 = mention_queries[idx] @ entity_keys.T  # (m, E)
        cand = stage1.topk(k, dim=1).indices  # (m, k)
        scores = model.score(_take(mention_feats, idx), _take(entity_feats, cand)).overall  # (m, k)
        is_gold = cand == gold[idx].unsqueeze(1)  # (m, k)
        found = is_gold.any(1)
        gold_score = torch.where(is_gold, scores, torch.zeros_like(scores)).sum(1)  # one gold column per row
        gold_score[~found] = float("nan")  # not retrieved: a miss
        beaten, t = gold_rank_counts(scores, gold_score, is_gold)
        ranks[idx.numpy()] = 1.0 + beaten + t
        tied[idx.numpy()] = t
        best = scores.nan_to_num(nan=-float("inf")).argmax(1)
        top1[idx.numpy()] = cand[torch.arange(len(idx)), best].numpy()
        cands[idx.numpy()] = cand.numpy()
    return ranks, tied, top1, cands


def evaluate(
    model: OTMEL,
    preprocessor: Preprocessor,
    mentions: pa.Table,
    kb: pa.Table,
    batch_size: int = 64,
    mention_chunk: int = 64,
    entity_chunk: int = 512,
    retrieve: int | None = None,
    compare_exhaustive: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """H@1/3/5 and MRR of ``mentions`` against all entities of ``kb`` (``otmel.metrics``).

    Mentions whose gold entity is unknown to the KB, or that cannot be encoded (empty
    mention), are not scored: they stay in the count N as misses (rank inf) and are
    counted in ``skipped_*`` keys, so skipping can never raise H@k. Also reported:
    ``tied_golds`` and ``H@1_random_ties`` (ties broken at random with ``seed``).
    With ``retrieve=K``: metrics of retrieve-then-rerank, plus ``recall@K`` (gold among the
    candidates, over the scored mentions) and, if ``compare_exhaustive``, ``recall@K_top1``
    (the exhaustive top-1 among the candidates) and the exhaustive metrics under
    ``exhaustive_*``.
    """
    t0 = time.perf_counter()
    issues = IssueCounter()
    keys_e = ENTITY_FEATURES + ("retrieval_key",)
    keys_m = MENTION_FEATURES + ("retrieval_query",)
    entity_feats, _ = encode_rows(model, preprocessor, kb, "entity", batch_size, keys_e, issues)
    kb_index = {e: i for i, e in enumerate(kb.column("entity_id").to_pylist())}
    gold_ids = mentions.column("gold_entity_id").to_pylist()
    keep = [i for i, g in enumerate(gold_ids) if g is not None and g in kb_index]
    skipped_unknown = len(gold_ids) - len(keep)
    table = mentions.take(pa.array(keep, type=pa.int64()))
    mention_feats, ok = encode_rows(model, preprocessor, table, "mention", batch_size, keys_m, issues)
    skipped_bad = int((~ok).sum())
    sel = torch.from_numpy(np.flatnonzero(ok))
    mention_feats = _take(mention_feats, sel)
    gold = torch.tensor([kb_index[gold_ids[keep[i]]] for i in sel.tolist()], dtype=torch.long)
    if gold.numel() == 0:
        raise ValueError("no mention to evaluate (all gold ids unknown or rows unusable)")
    t_enc = time.perf_counter() - t0
    skipped = skipped_unknown + skipped_bad

    def metrics_of(ranks: np.ndarray, tied: np.ndarray) -> dict[str, float]:
        """Over every input mention: the skipped ones appended as misses."""
        return ranking_metrics(np.r_[ranks, np.full(skipped, np.inf)], tied=np.r_[tied, np.zeros(skipped, np.int64)],
                               seed=seed)

    result: dict[str, float] = {}
    if retrieve is None or compare_exhaustive:
        ranks_x, tied_x, top1_x = rank_exhaustive(model, mention_feats, entity_feats, gold, mention_chunk, entity_chunk)
        exhaustive = metrics_of(ranks_x, tied_x)
    if retrieve is None:
        result.update(exhaustive)
    else:
        ranks_r, tied_r, _, cands = rank_retrieve_rerank(
            model, mention_feats, entity_feats, entity_feats["retrieval_key"],
            mention_feats["retrieval_query"], gold, retrieve, mention_chunk)
        result.update(metrics_of(ranks_r, tied_r))
        result[f"recall@{retrieve}"] = float(np.mean((cands == gold.numpy()[:, None]).any(1)))
        if compare_exhaustive:
            result[f"recall@{retrieve}_top1"] = float(np.mean((cands == top1_x[:, None]).any(1)))
            result.update({f"exhaustive_{k}": v for k, v in exhaustive.items() if k != "count"})
    result["entities"] = int(kb.num_rows)
    result["scored"] = int(gold.numel())
    result["skipped_unknown_gold"] = int(skipped_unknown)
    result["skipped_unusable"] = skipped_bad
    result["encode_seconds"] = round(t_enc, 3)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if issues.counts:
        log.info("evaluation input issues: %s", issues.summary())
    return result
