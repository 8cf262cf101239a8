"""NIL threshold calibration (``otmel calibrate``): max linking F1 on a dev split.

Every dev mention is linked as the link job links it (retrieve K per shard, rerank with S_O,
global top-1). A threshold T links a mention when its top-1 score is >= T, else says NIL.
With G = mentions whose gold entity is in the index:

    precision(T) = correct links / links made,   recall(T) = correct links / G,
    F1(T) = 2 P R / (P + R)

(a NIL answer for a mention whose gold is outside the KB is never a wrong link). The T of
maximal F1 is stored as ``nil_threshold`` in the model: ``export.json`` of an ONNX export, or
``config.json`` ``extra`` of a checkpoint (metadata: the model_version does not change).

With ``--kge-embeddings`` (collective disambiguation, :mod:`otmel.linking.coherence`) the dev
mentions keep their top-k candidates and their posts: coh(i, c) is computed once, the
coherence weight W is the one of highest top-1 accuracy over the mentions whose gold is in
the index (on a grid W = 0 and 41 values from 0.01 to 100 times the dev lists' mean score
spread, top-1 minus top-k: coh is a cosine in [-1, 1], W is in score units; ties go to the
smaller W), and a second NIL threshold is calibrated on S = S_O + W coh. Both go into the
model as ``coherence`` with the embeddings' content hash; ``nil_threshold`` stays the one
for linking without coherence.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class CalibrateConfig:
    model: str  # ONNX export dir or checkpoint dir (local or s3://); the threshold is written here
    index: str  # index built with that model
    data: str  # dataset dir: kb.parquet + mentions/SPLIT.parquet
    split: str = "dev"
    candidates: int = 20
    batch_size: int = 64
    s3_endpoint: str | None = None
    write: bool = True
    kge_embeddings: str | None = None  # also choose the coherence weight for these KGE vectors
    top_k: int = 5  # candidates kept per mention for coherence (= otmel link --top-k)


def best_threshold(top_scores: np.ndarray, top1_correct: np.ndarray, gold_in_kb: int) -> dict:
    """Threshold of max F1 given each mention's top-1 score and whether that top-1 is its gold."""
    n = len(top_scores)
    if n == 0 or gold_in_kb == 0:
        raise ValueError("calibration needs mentions whose gold entity is in the index")
    order = np.argsort(-top_scores, kind="stable")
    s = top_scores[order]
    correct = np.cumsum(top1_correct[order].astype(np.float64))
    linked = np.arange(1, n + 1, dtype=np.float64)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # T = s[i] links every mention scoring >= s[i]
    precision = correct / linked
    recall = correct / gold_in_kb
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    f1 = np.where(last_of_tie, f1, -1.0)
    i = int(np.argmax(f1))
    full = n - 1
    return {"nil_threshold": float(s[i]), "f1": float(f1[i]), "precision": float(precision[i]),
            "recall": float(recall[i]), "f1_no_threshold": float(f1[full]), "linked": int(linked[i])}


def calibrate(cfg: CalibrateConfig) -> dict:
    from otmel.backend import load_backend
    from otmel.data.pairs import load_split
    from otmel.linking.entity_index import check_compatible, open_shards
    from otmel.linking.linker import LINK_MENTION_FEATURES, ShardLinker, link_locally
    from otmel.model.preprocessing import MODEL_INPUTS
    from otmel.io.storage import local_copy

    backend = load_backend(cfg.model, cfg.s3_endpoint)
    _, mentions = load_split(cfg.data, cfg.split, cfg.s3_endpoint)
    with local_copy(cfg.index, cfg.s3_endpoint) as index_dir:
        manifest, shards = open_shards(index_dir, verify=True)
        check_compatible(manifest, backend.model_version, where=f"index {cfg.index}")
        linkers = [ShardLinker(s, backend) for s in shards]
        indexed = {e for s in shards for e in s.entity_ids}
        keep = cfg.top_k if cfg.kge_embeddings else 1
        scores, ids, gold, posts, mention_ids = [], [], [], [], []
        for start in range(0, mentions.num_rows, cfg.batch_size):
            rows = mentions.slice(start, cfg.batch_size).to_pydict()
            batch = backend.preprocessor.mentions(rows)
            sel = np.flatnonzero(batch.ok)
            if not len(sel):
                continue
            feats = backend.encode({k: getattr(batch, k)[sel] for k in MODEL_INPUTS}, LINK_MENTION_FEATURES)
            result = link_locally(linkers, feats, cfg.candidates, keep)
            scores.extend(result.scores.tolist())
            ids.extend(result.entity_ids.tolist())
            gold.extend(rows["gold_entity_id"][i] for i in sel)
            posts.extend(rows["post_id"][i] if "post_id" in rows else None for i in sel)
            mention_ids.extend(rows["mention_id"][i] for i in sel)
    lists = [[(e, s) for e, s in zip(r, sc) if e is not None] for r, sc in zip(ids, scores)]
    gold_known = np.array([g is not None and g in indexed for g in gold])
    result = _threshold_of(lists, gold, int(gold_known.sum()))
    result.update(mentions=len(gold), nil_gold=int((~gold_known).sum()), split=cfg.split)
    stored = {"nil_threshold": result["nil_threshold"]}
    if cfg.kge_embeddings:
        result["coherence"] = calibrate_coherence(lists, gold, posts, mention_ids, gold_known, cfg)
        stored["coherence"] = {k: result["coherence"][k] for k in ("weight", "nil_threshold", "embeddings",
                                                                   "embeddings_version", "top_k")}
    if cfg.write:
        result["stored_in"] = store_calibration(cfg.model, stored, cfg.s3_endpoint)
    log.info("NIL threshold %.4f: F1 %.4f (no threshold: %.4f)", result["nil_threshold"], result["f1"],
             result["f1_no_threshold"])
    return result


def _threshold_of(lists: list[list[tuple]], gold: list, gold_in_kb: int) -> dict:
    """:func:`best_threshold` of candidate lists [(entity id, score)], best first."""
    top_scores = np.array([lst[0][1] if lst else -np.inf for lst in lists], dtype=np.float64)
    correct = np.array([bool(lst) and lst[0][0] == g for lst, g in zip(lists, gold)])
    has = np.isfinite(top_scores)
    return best_threshold(top_scores[has], correct[has], gold_in_kb)


def calibrate_coherence(lists: list[list[tuple]], gold: list, posts: list, mention_ids: list, gold_known: np.ndarray,
                        cfg: CalibrateConfig) -> dict:
    """The coherence weight of highest dev top-1 accuracy, and the NIL threshold for it."""
    from otmel.linking.coherence import load_entity_vectors, mention_coherence, post_tops, reorder

    vectors = load_entity_vectors(cfg.kge_embeddings, cfg.s3_endpoint)
    ids = [[e for e, _ in lst] for lst in lists]
    scores = [[s for _, s in lst] for lst in lists]
    tops = post_tops(posts, mention_ids, ids)
    coh = mention_coherence(posts, mention_ids, ids, tops, vectors)  # once for the whole grid
    spread = [lst[0][1] - lst[-1][1] for lst in lists if len(lst) > 1]
    scale = float(np.mean(spread)) if spread and np.mean(spread) > 0 else 1.0
    grid = [0.0] + (scale * np.geomspace(0.01, 100, 41)).tolist()

    def rescored(w: float) -> list[list[tuple]]:
        return [list(zip(i, s)) for i, s in zip(*reorder(ids, scores, coh, w))]

    def h1(lsts: list[list[tuple]]) -> float:
        hits = sum(bool(lst) and lst[0][0] == g for lst, g, known in zip(lsts, gold, gold_known) if known)
        return hits / max(1, int(gold_known.sum()))

    accuracy = [h1(rescored(w)) for w in grid]
    best = int(np.argmax(accuracy))  # the first of the best: the smallest W
    weight = grid[best]
    with_weight = _threshold_of(rescored(weight), gold, int(gold_known.sum()))
    in_posts = sum(len(v) > 1 for v in tops.values())
    log.info("coherence weight %.4g: dev H@1 %.4f (without %.4f) over %d posts of several mentions",
             weight, accuracy[best], accuracy[0], in_posts)
    return {"weight": weight, "h1": accuracy[best], "h1_without": accuracy[0], "nil_threshold": with_weight["nil_threshold"],
            "f1": with_weight["f1"], "embeddings": cfg.kge_embeddings, "embeddings_version": vectors.version,
            "top_k": cfg.top_k, "posts_with_several_mentions": in_posts, "vectors": len(vectors)}


def store_calibration(model_uri: str, values: dict, s3_endpoint: str | None = None) -> str:
    """Write calibrated values (``nil_threshold``, ``coherence``) into export.json (ONNX dir)
    or config.json extra (checkpoint)."""
    from otmel.io.integrity import CHECKSUMS_FILE, digest_entry
    from otmel.io.storage import exists, join, read_bytes, write_bytes

    export_json = join(model_uri, "export.json")
    if exists(export_json, s3_endpoint):
        meta = json.loads(read_bytes(export_json, s3_endpoint))
        meta.update(values)
        target, body = export_json, meta
    else:
        config_json = join(model_uri, "config.json")
        body = json.loads(read_bytes(config_json, s3_endpoint))
        body.setdefault("extra", {}).update(values)
        target = config_json
    if not target.startswith("s3://"):
        target = str(Path(target))
    data = json.dumps(body, indent=2, sort_keys=True).encode()
    write_bytes(target, data, s3_endpoint)
    sums = join(model_uri, CHECKSUMS_FILE)
    if target.endswith("config.json") and exists(sums, s3_endpoint):  # a checkpoint: re-record the file we changed
        table = json.loads(read_bytes(sums, s3_endpoint))
        table["config.json"] = digest_entry(data)
        write_bytes(sums, json.dumps(table, indent=2, sort_keys=True).encode(), s3_endpoint)
    return target
