"""Metrics, chunked evaluation, retrieve-then-rerank guarantees, checkpoints, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import make_model, png_bytes, random_inputs
from otmel.evaluation import evaluate, rank_exhaustive, rank_retrieve_rerank
from otmel.metrics import ranking_metrics, ranks_from_scores
from otmel.model.otmel import CheckpointError, load_checkpoint, model_version


# ---------------------------------------------------------------------------- metrics
def test_ranks_count_ties_against_the_model():
    scores = torch.tensor([[1.0, 1.0, 0.5], [0.2, 0.9, 0.9], [3.0, 2.0, 1.0]])
    gold = torch.tensor([0, 1, 2])
    assert ranks_from_scores(scores, gold).tolist() == [2, 2, 3]
    # a constant scorer is ranked last, never first
    assert ranks_from_scores(torch.zeros(2, 5), torch.tensor([0, 3])).tolist() == [5, 5]


def test_non_finite_scores_cannot_flatter_the_model():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([
        [nan, 0.1, 0.2],   # NaN gold: a miss, not rank 1
        [inf, 0.1, 0.2],   # +inf gold: a miss
        [0.5, nan, 0.1],   # a NaN competitor counts against the gold
        [0.5, -inf, inf],  # so do infinite ones, whatever their sign
        [0.5, 0.1, 0.2],   # a clean row for reference
    ])
    gold = torch.zeros(5, dtype=torch.long)
    ranks = ranks_from_scores(scores, gold).tolist()
    assert ranks == [inf, inf, 2, 3, 1]
    m = ranking_metrics(ranks)
    assert m["H@1"] == pytest.approx(0.2) and np.isfinite(m["MRR"]) and m["MRR"] <= 1
    assert m["misses"] == 2


def test_hits_and_mrr():
    m = ranking_metrics([1, 2, 3, 6, float("inf")])
    assert m["H@1"] == pytest.approx(0.2)
    assert m["H@3"] == pytest.approx(0.6)
    assert m["H@5"] == pytest.approx(0.6)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 6 + 0) / 5)
    with pytest.raises(ValueError):
        ranking_metrics([])


def test_ties_are_reported_and_broken_at_random_reproducibly():
    from otmel.metrics import gold_rank_counts

    # 2000 mentions whose gold ties with exactly one competitor at the top: ties-against
    # H@1 is 0, random tie-breaking gives ~0.5 (the argsort protocol would give 1 or 0)
    M = 2000
    scores = torch.zeros(M, 3)
    scores[:, :2] = 1.0
    is_gold = torch.zeros(M, 3, dtype=torch.bool)
    is_gold[:, 0] = True
    beaten, tied = gold_rank_counts(scores, scores[:, 0], is_gold)
    assert (beaten == 0).all() and (tied == 1).all()
    ranks = 1 + beaten + tied
    m = ranking_metrics(ranks, tied=tied, seed=7)
    assert m["H@1"] == 0.0 and m["tied_golds"] == M
    assert 0.45 < m["H@1_random_ties"] < 0.55
    assert ranking_metrics(ranks, tied=tied, seed=7)["H@1_random_ties"] == m["H@1_random_ties"]
    # without ties the random figure is the headline
    clean = ranking_metrics([1, 2, 1, np.inf], tied=[0, 0, 0, 3])
    assert clean["H@1_random_ties"] == clean["H@1"] == 0.5 and clean["tied_golds"] == 0


# ---------------------------------------------------------------------------- rank functions
@pytest.fixture(scope="module")
def encoded():
    model, _ = make_model("ot", missing_image="mask", seed=3)
    model.eval()
    with torch.no_grad():
        m = model.encode(**random_inputs(9, seed=20))
        e = model.encode(**random_inputs(13, seed=21))
    gold = torch.tensor([0, 3, 5, 7, 12, 1, 1, 8, 2])
    return model, m, e, gold


def test_chunked_ranks_equal_unchunked(encoded):
    model, m, e, gold = encoded
    full = model.score(m, e).overall
    expected = ranks_from_scores(full, gold).numpy()
    for mc, ec in [(9, 13), (4, 5), (1, 1), (2, 7)]:
        ranks, _, top1 = rank_exhaustive(model, m, e, gold, mention_chunk=mc, entity_chunk=ec)
        np.testing.assert_array_equal(ranks, expected)
        np.testing.assert_array_equal(top1, full.argmax(1).numpy())


def test_rerank_scores_equal_exhaustive_for_the_same_pairs(encoded):
    model, m, e, _ = encoded
    full = model.score(m, e).overall  # (9, 13)
    stage1 = m["retrieval_query"] @ e["retrieval_key"].T
    cand = stage1.topk(4, dim=1).indices
    reranked = model.score(m, {k: v[cand] for k, v in e.items()}).overall  # (9, 4)
    torch.testing.assert_close(reranked, torch.gather(full, 1, cand), atol=1e-5, rtol=1e-5)


def test_retrieve_all_entities_equals_exhaustive(encoded):
    model, m, e, gold = encoded
    E = e["fused"].shape[0]
    ranks_x, tied_x, top1_x = rank_exhaustive(model, m, e, gold)
    ranks_r, tied_r, top1_r, cands = rank_retrieve_rerank(model, m, e, e["retrieval_key"], m["retrieval_query"], gold, k=E)
    np.testing.assert_array_equal(ranks_r, ranks_x)
    np.testing.assert_array_equal(tied_r, tied_x)
    np.testing.assert_array_equal(top1_r, top1_x)
    assert cands.shape == (9, E)


def test_topk_identical_when_exhaustive_topk_is_inside_the_candidates(encoded):
    model, m, e, gold = encoded
    full = model.score(m, e).overall
    k_top = 3
    exhaustive_topk = full.topk(k_top, dim=1).indices
    checked = 0
    for K in (5, 8, 11, 13):
        _, _, _, cands = rank_retrieve_rerank(model, m, e, e["retrieval_key"], m["retrieval_query"], gold, k=K)
        cands = torch.from_numpy(cands)
        inside = torch.stack([torch.isin(exhaustive_topk[i], cands[i]).all() for i in range(len(cands))])
        reranked = model.score(m, {k: v[cands] for k, v in e.items()}).overall
        rerank_topk = torch.gather(cands, 1, reranked.topk(k_top, dim=1).indices)
        assert torch.equal(rerank_topk[inside], exhaustive_topk[inside])
        checked += int(inside.sum())
    assert checked >= 12  # the property was exercised, not vacuously true


# ---------------------------------------------------------------------------- evaluate() on tables
def _tables(n_entities=12, n_mentions=10, seed=0):
    rng = np.random.default_rng(seed)
    words = "robert downey holland actor singer paris france tennis watch spider man red blue".split()
    kb = pa.table({
        "entity_id": [f"Q{i}" for i in range(n_entities)],
        "name": [str(rng.choice(words[:3])) for _ in range(n_entities)],
        "attributes": [" ".join(rng.choice(words, 4)) for _ in range(n_entities)],
        "image": [png_bytes(i) if i % 3 else None for i in range(n_entities)],
        "image_uri": pa.array([None] * n_entities, pa.string()),
        "aliases": pa.array([None] * n_entities, pa.list_(pa.string())),
    })
    mentions = pa.table({
        "mention_id": [f"m{i}" for i in range(n_mentions)],
        "post_id": [f"p{i}" for i in range(n_mentions)],
        "mention": [str(rng.choice(words[:3])) for _ in range(n_mentions)],
        "text": [" ".join(rng.choice(words, 6)) for _ in range(n_mentions)],
        "image": [png_bytes(100 + i) if i % 4 else None for i in range(n_mentions)],
        "image_uri": pa.array([None] * n_mentions, pa.string()),
        "gold_entity_id": [f"Q{int(rng.integers(n_entities))}" for _ in range(n_mentions)],
    })
    return kb, mentions


def test_evaluate_chunk_sizes_and_retrieval_report():
    model, pre = make_model("kd", seed=1)
    kb, mentions = _tables()
    a = evaluate(model, pre, mentions, kb, batch_size=3, mention_chunk=2, entity_chunk=5)
    b = evaluate(model, pre, mentions, kb, batch_size=64, mention_chunk=64, entity_chunk=512)
    for k in ("H@1", "H@3", "H@5", "MRR", "count"):
        assert a[k] == pytest.approx(b[k])
    r = evaluate(model, pre, mentions, kb, retrieve=kb.num_rows)
    assert r["recall@12"] == 1.0 and r["recall@12_top1"] == 1.0
    assert r["MRR"] == pytest.approx(b["MRR"])
    r3 = evaluate(model, pre, mentions, kb, retrieve=3)
    assert 0 <= r3["recall@3"] <= 1 and r3["H@1"] <= r3["recall@3"] + 1e-9
    assert r3["exhaustive_MRR"] == pytest.approx(b["MRR"])


def test_evaluate_counts_unknown_gold_and_unusable_rows():
    model, pre = make_model("att", seed=1)
    kb, mentions = _tables()
    gold = mentions.column("gold_entity_id").to_pylist()
    gold[0] = "Q_missing"
    texts = mentions.column("mention").to_pylist()
    texts[1] = "   "  # empty mention: cannot be encoded, counted
    mentions = mentions.set_column(mentions.schema.get_field_index("gold_entity_id"), "gold_entity_id", pa.array(gold))
    mentions = mentions.set_column(mentions.schema.get_field_index("mention"), "mention", pa.array(texts))
    r = evaluate(model, pre, mentions, kb)
    assert r["skipped_unknown_gold"] == 1
    assert r["skipped_unusable"] == 1
    # skipped mentions stay in N as misses: dropping them would raise H@k
    assert r["count"] == mentions.num_rows and r["scored"] == mentions.num_rows - 2
    assert r["misses"] >= 2
    full = evaluate(model, pre, mentions.slice(2), kb)  # the same scored mentions, none skipped
    assert r["H@1"] == pytest.approx(full["H@1"] * full["count"] / r["count"])
    assert r["MRR"] == pytest.approx(full["MRR"] * full["count"] / r["count"])


# ---------------------------------------------------------------------------- preprocessing
def test_preprocessing_bad_input_is_reported_not_dropped():
    _, pre = make_model("att")
    long_text = " ".join(["tennis"] * 200)
    batch = pre.mentions({
        "mention": ["robert", "", "paris", "holland"],
        "text": ["actor", "x", long_text, None],
        "image": [png_bytes(1), png_bytes(2), b"\x89PNG not really", None],
    })
    assert len(batch) == 4  # nothing dropped
    assert batch.ok.tolist() == [True, False, True, True]
    assert "empty_mention" in batch.errors[1]
    assert batch.has_image.tolist() == [True, True, False, False]
    assert any(w.startswith("bad_image") for w in batch.warnings[2])
    assert any(w.startswith("truncated") for w in batch.warnings[2])
    assert batch.input_ids.shape == (4, pre.text_length)
    assert batch.attention_mask[2].sum() == pre.text_length  # truncated to the limit, not beyond
    assert np.all(batch.pixel_values[3] == 0)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    from otmel.model.factory import load_model, save_model

    model, pre = make_model("kd", missing_image="mask", seed=5)
    model.eval()
    save_model(model, pre, tmp_path / "ckpt")
    loaded, pre2 = load_model(tmp_path / "ckpt")
    assert loaded.config.to_dict() == {**model.config.to_dict(), "clip_config": loaded.config.clip_config}
    assert model_version(loaded) == model_version(model)
    x = random_inputs(3, seed=9)
    with torch.no_grad():
        a, b = model.encode(**x), loaded.encode(**x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    rows = {"mention": ["robert"], "text": ["actor paris"], "image": [png_bytes(3)]}
    np.testing.assert_array_equal(pre.mentions(rows).input_ids, pre2.mentions(rows).input_ids)
    np.testing.assert_allclose(pre.mentions(rows).pixel_values, pre2.mentions(rows).pixel_values)


def test_model_version_changes_with_weights(tmp_path):
    model, _ = make_model("att", seed=5)
    v1 = model_version(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_version(model) != v1


def test_loading_a_foreign_directory_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not an otmel checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path)
