"""NIL threshold calibration (``otmel calibrate``): max linking F1 on a dev split.

Every dev mention is linked as the link job links it (retrieve K per shard, rerank with S_O,
global top-1). A threshold T links a mention when its top-1 score is >= T, else says NIL.
With G = mentions whose gold entity is in the index:

    precision(T) = correct links / links made,   recall(T) = correct links / G,
    F1(T) = 2 P R / (P + R)

(a NIL answer for a mention whose gold is outside the KB is never a wrong link). The T of
maximal F1 is stored as ``nil_threshold`` in the model: ``export.json`` of an ONNX export, or
``config.json`` ``extra`` of a checkpoint (metadata: the model_version does not change).
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
    from otmel.data import load_split
    from otmel.entity_index import check_compatible, open_shards
    from otmel.linking import LINK_MENTION_FEATURES, ShardLinker, link_locally
    from otmel.preprocessing import MODEL_INPUTS
    from otmel.storage import local_copy

    backend = load_backend(cfg.model, cfg.s3_endpoint)
    _, mentions = load_split(cfg.data, cfg.split, cfg.s3_endpoint)
    with local_copy(cfg.index, cfg.s3_endpoint) as index_dir:
        manifest, shards = open_shards(index_dir, verify=True)
        check_compatible(manifest, backend.model_version, where=f"index {cfg.index}")
        linkers = [ShardLinker(s, backend) for s in shards]
        indexed = {e for s in shards for e in s.entity_ids}
        scores, top1, gold = [], [], []
        for start in range(0, mentions.num_rows, cfg.batch_size):
            rows = mentions.slice(start, cfg.batch_size).to_pydict()
            batch = backend.preprocessor.mentions(rows)
            sel = np.flatnonzero(batch.ok)
            if not len(sel):
                continue
            feats = backend.encode({k: getattr(batch, k)[sel] for k in MODEL_INPUTS}, LINK_MENTION_FEATURES)
            result = link_locally(linkers, feats, cfg.candidates, 1)
            scores.append(result.scores[:, 0])
            top1.extend(result.entity_ids[:, 0].tolist())
            gold.extend(rows["gold_entity_id"][i] for i in sel)
    top_scores = np.concatenate(scores).astype(np.float64)
    gold_known = np.array([g is not None and g in indexed for g in gold])
    correct = np.array([t is not None and t == g for t, g in zip(top1, gold)])
    result = best_threshold(top_scores, correct, int(gold_known.sum()))
    result.update(mentions=len(gold), nil_gold=int((~gold_known).sum()), split=cfg.split)
    if cfg.write:
        result["stored_in"] = store_threshold(cfg.model, result["nil_threshold"], cfg.s3_endpoint)
    log.info("NIL threshold %.4f: F1 %.4f (no threshold: %.4f)", result["nil_threshold"], result["f1"],
             result["f1_no_threshold"])
    return result


def store_threshold(model_uri: str, threshold: float, s3_endpoint: str | None = None) -> str:
    """Write the threshold into export.json (ONNX dir) or config.json extra (checkpoint)."""
    from otmel.integrity import CHECKSUMS_FILE, digest_entry
    from otmel.storage import exists, join, read_bytes, write_bytes

    export_json = join(model_uri, "export.json")
    if exists(export_json, s3_endpoint):
        meta = json.loads(read_bytes(export_json, s3_endpoint))
        meta["nil_threshold"] = threshold
        target, body = export_json, meta
    else:
        config_json = join(model_uri, "config.json")
        body = json.loads(read_bytes(config_json, s3_endpoint))
        body.setdefault("extra", {})["nil_threshold"] = threshold
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
