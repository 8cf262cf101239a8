"""The shard format without Ray: the stage-1 key stored once, where FAISS keeps it or not."""

from __future__ import annotations

import numpy as np
import pytest

from otmel.linking.entity_index import (AUTO_EXACT_MAX, AUTO_GPU_FLAT_MAX, STORED_FEATURES, Shard, ShardWriter,
                                auto_factory, keeps_keys_exactly, new_manifest)
from otmel.model.otmel import KEY_FEATURES, retrieval_key_of

SHAPES = {"text_mask": [8], "vision_mask": [5], "has_image": [], "text_query": [8, 16], "vision_query": [5, 16],
          "text_summary": [24], "vision_summary": [24], "fused": [32]}


def _features(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        if name in ("text_mask", "vision_mask", "has_image"):
            out[name] = rng.random((n, *shape)) < 0.8
        else:
            out[name] = rng.standard_normal((n, *shape)).astype(np.float32)
    for name in ("text_summary", "vision_summary"):
        out[name] /= np.linalg.norm(out[name], axis=1, keepdims=True)
    return out


def _shard(tmp_path, factory: str, feature_dtype: str, in_faiss: bool, n: int = 400, refine: int = 4):
    feats = _features(n, seed=0)
    ids = [f"Q{i:04d}" for i in np.random.default_rng(1).permutation(n)]  # arrive out of id order
    writer = ShardWriter(tmp_path / "shard-00000", "shard-00000", feature_dtype, "zeros", in_faiss)
    for start in range(0, n, 150):
        writer.append(ids[start:start + 150], {k: v[start:start + 150] for k, v in feats.items()})
    entry = writer.close(factory, train_size=n)
    manifest = new_manifest(1, factory, feature_dtype, "v", SHAPES, [entry], "kb", {}, missing_image="zeros",
                            key_in_faiss=in_faiss, refine=refine)
    order = np.argsort(np.asarray(ids))  # the shard's rows are in entity-id order
    return Shard(tmp_path / "shard-00000", entry, manifest, verify=True, use_gpu=False), entry, \
        {k: v[order] for k, v in feats.items()}


def test_auto_picks_exact_search_for_small_shards_and_ivf_pq_past_the_limit():
    assert auto_factory(1000, 1216, "fp16") == "SQfp16" and auto_factory(AUTO_EXACT_MAX, 1216, "fp32") == "Flat"
    for dtype in ("fp16", "fp32"):  # small shards: the keys kept exactly, served to the reranker
        assert keeps_keys_exactly(auto_factory(1000, 64, dtype), 64, dtype), dtype
    assert auto_factory(1_000_000, 1216, "fp16") == "IVF1024,PQ76"  # ~sqrt(n) lists; 16 dims per 8-bit code
    assert auto_factory(4_000_000, 1824, "fp16") == "IVF2048,PQ114"  # mask: R = 3 (96 + 512)
    assert not keeps_keys_exactly("IVF1024,PQ76", 1216, "fp16")  # lossy: the key's features stay on disk
    assert auto_factory(AUTO_GPU_FLAT_MAX, 1216, "fp16", gpu=True) == "Flat"  # faiss-gpu: brute force
    assert auto_factory(AUTO_GPU_FLAT_MAX + 1, 1216, "fp16", gpu=True).startswith("IVF")


@pytest.mark.parametrize("factory,dtype,kept", [("Flat", "fp32", True), ("Flat", "fp16", True),
                                                ("SQfp16", "fp16", True), ("SQfp16", "fp32", False),
                                                ("HNSW16,SQfp16", "fp16", True), ("IVF16,Flat", "fp16", False),
                                                ("PQ8", "fp16", False), ("SQ8", "fp16", False)])
def test_which_factories_keep_the_keys_exactly(factory, dtype, kept):
    assert keeps_keys_exactly(factory, 64, dtype) is kept


def test_an_exact_index_serves_the_key_features_from_faiss_and_stores_nothing_twice(tmp_path):
    shard, entry, feats = _shard(tmp_path, "SQfp16", "fp16", in_faiss=True)
    assert set(entry["files"]) == {"index.faiss", "entity_ids.parquet"} | {
        f"{n}.bin" for n in STORED_FEATURES if n not in KEY_FEATURES}
    rows = np.array([[0, 7, 399], [12, 12, 3]])
    got = shard.gather(rows, STORED_FEATURES)
    for name in STORED_FEATURES:  # the features as stored (fp16), from the files or from FAISS
        want = feats[name][rows].astype(np.float16).astype(np.float32) if feats[name].dtype == np.float32 \
            else feats[name][rows]
        assert np.array_equal(got[name], want), name
    # FAISS searches the keys of the stored features: its scores are the exact inner products
    q = np.random.default_rng(2).standard_normal((6, 32 + 48)).astype(np.float32)
    stored = {n: feats[n].astype(np.float16).astype(np.float32) for n in KEY_FEATURES}
    keys = retrieval_key_of(stored["fused"], stored["text_summary"], stored["vision_summary"], feats["has_image"], "zeros")
    scores, top = shard.search(q, 5)
    exact = q @ keys.T
    assert np.array_equal(top, np.argsort(-exact, axis=1, kind="stable")[:, :5])
    assert np.allclose(scores, np.take_along_axis(exact, top, 1), atol=1e-5)


def test_a_lossy_index_keeps_the_key_features_on_disk_and_re_scores_its_candidates_exactly(tmp_path):
    q = np.random.default_rng(3).standard_normal((20, 32 + 48)).astype(np.float32)
    shard, entry, feats = _shard(tmp_path, "IVF4,PQ8x4", "fp32", in_faiss=False, refine=100)  # k x refine >= n
    assert {f"{n}.bin" for n in KEY_FEATURES} <= set(entry["files"])
    keys = retrieval_key_of(feats["fused"], feats["text_summary"], feats["vision_summary"], feats["has_image"], "zeros")
    exact = q @ keys.T
    scores, top = shard.search(q, 4)
    # every candidate re-scored from the stored features: the exact top 4, exact scores
    assert np.array_equal(top, np.argsort(-exact, axis=1, kind="stable")[:, :4])
    assert np.allclose(scores, np.take_along_axis(exact, top, 1), atol=1e-5)
    # without the re-scoring the PQ codes' scores are approximations
    shard.refine = 1
    approx, rows = shard.search(q, 4)
    assert not np.allclose(approx, np.take_along_axis(exact, rows, 1), atol=1e-3)
