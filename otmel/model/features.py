"""The feature contract of OT-MEL's encoder: what ``OTMEL.encode`` outputs, what an index
stores per entity, what a mention carries to be scored, and the stage-1 key built from
stored features. Plain names and numpy, no torch: the index shard and link-stage actors,
which only score with the ONNX matcher and merge, import this instead of ``otmel.model.otmel``
(importing torch cost each of them ~2-4 s of CPU at start, or at its first batch, taken from
the encoder on a small node). ``otmel.model.otmel`` re-exports all of it.
"""

from __future__ import annotations

import numpy as np

#: name -> shape of every encode() output (B = batch, Lt = text length, Lv = visual tokens,
#: d = ModelConfig.dim, P = CLIP projection dim, R = 2d + 2P).
FEATURE_SHAPES = {
    "text_mask": "(B, Lt) bool",
    "vision_mask": "(B, Lv) bool",
    "has_image": "(B,) bool",
    "text_query": "(B, Lt, d)  entity side of unimodal matching: T_e W'_q",
    "text_key": "(B, Lt, d)    mention side: T_m W'_k",
    "text_value": "(B, Lt, d)  mention side: T_m W'_v",
    "vision_query": "(B, Lv, d)",
    "vision_key": "(B, Lv, d)",
    "vision_value": "(B, Lv, d)",
    "text_summary": "(B, P) t, unit norm",
    "vision_summary": "(B, P) v, unit norm (zero for a masked missing image)",
    "fused": "(B, 2d) g^t (+) g^v, eq. 18",
    "retrieval_query": "(B, R) stage-1 query, see OTMEL.retrieval_vectors",
    "retrieval_key": "(B, R) stage-1 key; R = 2(d + P) (zeros) or 3(d + P) (mask)",
}
FEATURE_NAMES = tuple(FEATURE_SHAPES)
#: what an entity needs at score time (stored in each index shard). The summaries' projections
#: to d that eq. 24 pairs with the pooled g_m are computed at score time from t_e / v_e (one
#: small matmul per candidate), not stored: 384 bytes per entity less at ViT-B/32 size.
ENTITY_FEATURES = (
    "text_mask", "vision_mask", "has_image", "text_query", "vision_query", "text_summary",
    "vision_summary", "fused",
)
#: the entity features the stage-1 key is made of (:func:`retrieval_key_of`): an index that
#: holds the key exactly serves them from it instead of storing them twice
KEY_FEATURES = ("fused", "text_summary", "vision_summary")
#: what a mention needs at score time
MENTION_FEATURES = (
    "text_mask", "vision_mask", "has_image", "text_key", "text_value", "vision_key",
    "vision_value", "text_summary", "vision_summary", "fused",
)


# ---------------------------------------------------------------------- stage-1 keys from stored features
def retrieval_key_of(fused, text_summary, vision_summary, has_image, missing_image: str):
    """The stage-1 key of :meth:`OTMEL.retrieval_vectors` from an entity's features (numpy):
    the index builds its FAISS keys from the features AS STORED (fp16 or fp32), so the key
    and the reranking features never disagree and an index rebuilt from its own files equals
    the original. ``tests/test_model.py`` checks it against the model's ``retrieval_key``.

    fused : (N, 2d)   text_summary, vision_summary : (N, P)   has_image : (N,) bool
    -> (N, R) float32; R = 2d + 2P (zeros) or 3(d + P) (mask)
    """
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    fused, t, v = f32(fused), f32(text_summary), f32(vision_summary)
    if missing_image == "zeros":
        return np.concatenate([fused, t, v], axis=1)
    d = fused.shape[1] // 2
    image = np.asarray(has_image, dtype=bool)[:, None].astype(np.float32)  # (N, 1)
    text_e = np.concatenate([fused[:, :d], t], axis=1)  # (N, d + P)
    vision_e = np.concatenate([fused[:, d:], v], axis=1)
    return np.concatenate([image * text_e, (1.0 - image) * text_e, vision_e], axis=1)


def key_features_of(key, fused_dim: int, missing_image: str) -> dict:
    """The inverse of :func:`retrieval_key_of`: ``{fused, text_summary, vision_summary}`` of
    keys ``(N, R)`` (exact: the key holds them as they are; under ``mask`` one of the two text
    blocks is zero, so their sum is the entity's text block)."""
    key = np.asarray(key, dtype=np.float32)
    d = fused_dim // 2
    if missing_image == "zeros":
        P = (key.shape[1] - fused_dim) // 2
        return {"fused": key[:, :fused_dim], "text_summary": key[:, fused_dim:fused_dim + P],
                "vision_summary": key[:, fused_dim + P:]}
    w = key.shape[1] // 3  # d + P
    text_e = key[:, :w] + key[:, w:2 * w]
    vision_e = key[:, 2 * w:]
    return {"fused": np.concatenate([text_e[:, :d], vision_e[:, :d]], axis=1), "text_summary": text_e[:, d:],
            "vision_summary": vision_e[:, d:]}
