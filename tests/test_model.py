"""Model components: shapes, masking invariances, modes, the stage-1/rerank contracts."""

from __future__ import annotations

import pytest
import torch

from conftest import TEXT_LENGTH, make_model, random_inputs
from otmel.model.correlation import assign
from otmel.model.otmel import ENTITY_FEATURES, FEATURE_NAMES, MENTION_FEATURES
from otmel.model.pooling import AttentionPool, softpool


# ---------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("pool", ["softpool", "attnpool"])
def test_pooling_ignores_padding_and_empty_sets_are_zero(pool):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [0] * 7, [1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    fn = softpool if pool == "softpool" else AttentionPool(8)
    out = fn(x, mask)
    assert out.shape == (4, 8)
    # same result when padded elements are changed arbitrarily
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 100)
    torch.testing.assert_close(fn(x2, mask), out)
    # same result as pooling only the real elements
    torch.testing.assert_close(out[0], fn(x[0:1, :3], None)[0])
    torch.testing.assert_close(out[3], fn(x[3:4, mask[3]], None)[0])
    assert torch.all(out[2] == 0)


def test_softpool_is_a_per_dimension_soft_max():
    x = torch.tensor([[[0.0, 10.0], [10.0, 0.0]]])  # two elements, each dominates one dim
    out = softpool(x)
    assert out[0, 0] > 9.99 and out[0, 1] > 9.99  # soft max per dimension, not a mean (5)


# ---------------------------------------------------------------------------- correlation
@pytest.mark.parametrize("method", ["ot", "att"])
def test_assignment_masks(method):
    torch.manual_seed(0)
    B, n, m, d = 3, 6, 5, 8
    q, k, v = torch.randn(B, n, d), torch.randn(B, m, d), torch.randn(B, m, d)
    qm = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    km = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [0] * 5], dtype=torch.bool)
    a = assign(q, k, v, qm, km, method)
    assert a.transported.shape == (B, n, d) and a.weights.shape == (B, n, m)
    assert torch.all(a.weights[1, 3:] == 0) and torch.all(a.weights[1, :, 2:] == 0)
    assert torch.all(a.transported[2] == 0)  # no real key: nothing transported, no NaN
    assert torch.isfinite(a.transported).all()
    # rows of G are convex combinations of the real values: ones in -> ones out
    ones = assign(q, k, torch.ones_like(v), qm, km, method).transported
    torch.testing.assert_close(ones[0], torch.ones(n, d))
    torch.testing.assert_close(ones[1, :3], torch.ones(3, d))
    # padded keys carry no information
    k2 = torch.where(km.unsqueeze(-1), k, torch.randn_like(k))
    v2 = torch.where(km.unsqueeze(-1), v, torch.randn_like(v))
    torch.testing.assert_close(assign(q, k2, v2, qm, km, method).transported, a.transported)


def test_ot_and_attention_share_projections():
    """eq. 6 and eq. 9 use the same W_q, W_k: the kd logits come from the OT path's Q/K."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ones_q, ones_k = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    a_ot = assign(q, k, v, ones_q, ones_k, "ot", with_logits=True)
    a_att = assign(q, k, v, ones_q, ones_k, "att", with_logits=True)
    torch.testing.assert_close(a_ot.logits, a_att.logits)
    torch.testing.assert_close(a_att.weights, torch.softmax(a_att.logits, -1))


# ---------------------------------------------------------------------------- encode / score
@pytest.mark.parametrize("missing_image", ["zeros", "mask"])
def test_encode_shapes_and_padding_invariance(missing_image):
    model, _ = make_model("ot", missing_image=missing_image)
    model.eval()
    x = random_inputs(5)
    with torch.no_grad():
        f = model.encode(**x)
    assert set(f) == set(FEATURE_NAMES)
    d, P, Lv = model.config.dim, model.projection_dim, model.num_vision_tokens
    assert f["text_query"].shape == (5, TEXT_LENGTH, d)
    assert f["vision_key"].shape == (5, Lv, d)
    assert f["fused"].shape == (5, 2 * d)
    R = 2 * (d + P) if missing_image == "zeros" else 3 * (d + P)  # mask: the text block twice
    assert f["retrieval_query"].shape == f["retrieval_key"].shape == (5, R)
    # changing padded token ids (and, under mask, the pixels of image-less rows) changes nothing
    x2 = dict(x)
    x2["input_ids"] = torch.where(x["attention_mask"].bool(), x["input_ids"], torch.randint(2, 400, x["input_ids"].shape))
    if missing_image == "mask":
        keep = x["has_image"][:, None, None, None]
        x2["pixel_values"] = torch.where(keep, x["pixel_values"], torch.randn_like(x["pixel_values"]))
    with torch.no_grad():
        f2 = model.encode(**x2)
    tm = f["text_mask"]
    for name in ("fused", "text_summary", "vision_summary", "retrieval_key", "retrieval_query"):
        torch.testing.assert_close(f2[name], f[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f2["text_key"][tm], f["text_key"][tm], atol=1e-5, rtol=1e-5)
    if missing_image == "mask":
        no_img = ~x["has_image"]
        assert not f["vision_mask"][no_img].any()
        assert torch.all(f["vision_summary"][no_img] == 0)


@pytest.mark.parametrize("mode", ["ot", "att", "kd"])
def test_grid_and_candidate_layouts_agree(mode):
    model, _ = make_model(mode, missing_image="mask")
    model.eval()
    with torch.no_grad():
        m = model.encode(**random_inputs(4, seed=1))
        e = model.encode(**random_inputs(6, seed=2))
        grid = model.score(m, e)
        cand_idx = torch.tensor([[5, 0, 2], [1, 1, 3], [4, 2, 0], [3, 5, 1]])
        cands = model.score(m, {k: v[cand_idx] for k, v in e.items()})
    assert grid.overall.shape == (4, 6) and cands.overall.shape == (4, 3)
    for part in ("overall", "fused", "text", "visual"):
        expected = torch.gather(getattr(grid, part), 1, cand_idx)
        torch.testing.assert_close(getattr(cands, part), expected, atol=1e-5, rtol=1e-5)


def test_score_is_invariant_to_padded_entity_tokens():
    model, _ = make_model("ot")
    model.eval()
    with torch.no_grad():
        m = model.encode(**random_inputs(3, seed=1))
        e = model.encode(**random_inputs(4, seed=2))
        s = model.score(m, e).overall
        e2 = dict(e)
        pad = ~e["text_mask"]
        e2["text_query"] = torch.where(pad.unsqueeze(-1), torch.randn_like(e["text_query"]) * 50, e["text_query"])
        s2 = model.score(m, e2).overall
    torch.testing.assert_close(s2, s)


def test_missing_image_mask_drops_visual_score_and_renormalises():
    model, _ = make_model("att", missing_image="mask")
    model.eval()
    x = random_inputs(4, seed=3)
    x["has_image"] = torch.tensor([True, False, True, False])
    with torch.no_grad():
        f = model.encode(**x)
        s = model.score(f, f)
    both = x["has_image"][:, None] & x["has_image"][None, :]
    assert torch.equal(s.visual_valid, both)
    torch.testing.assert_close(s.overall[~both], ((s.fused + s.text) / 2)[~both])
    torch.testing.assert_close(s.overall[both], ((s.fused + s.text + s.visual) / 3)[both])


@pytest.mark.parametrize("missing_image", ["zeros", "mask"])
def test_stage1_inner_product_is_the_separable_part_of_S_O_for_every_pair(missing_image):
    """q.k == S_O minus its pair-dependent OT halves, for pairs with and without images on
    either side (half of the mentions and half of the entities have none)."""
    model, _ = make_model("ot", missing_image=missing_image)
    model.eval()
    with torch.no_grad():
        m = model.encode(**random_inputs(8, seed=4, image_rate=0.5))
        e = model.encode(**random_inputs(10, seed=5, image_rate=0.5))
        s = model.score(m, e)
        qk = m["retrieval_query"] @ e["retrieval_key"].T
        t_term = 0.5 * m["text_summary"] @ e["text_summary"].T  # the summary half of S_T (eq. 24)
        v_term = 0.5 * m["vision_summary"] @ e["vision_summary"].T
    valid = s.visual_valid.to(qk.dtype)
    if missing_image == "mask":  # the data has every kind of pair
        kinds = {(bool(a), bool(b)) for a in m["has_image"] for b in e["has_image"]}
        assert kinds == {(True, True), (True, False), (False, True), (False, False)}
        assert 0 < valid.mean() < 1
    # S_O = (S_F + S_T + valid S_V) / (2 + valid); stage 1 drops the OT halves of S_T and S_V
    ot_halves = (s.text - t_term) + valid * (s.visual - v_term)
    separable = s.overall - ot_halves / (2 + valid)
    torch.testing.assert_close(qk, separable, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qk, model.separable_score(m, e), atol=1e-5, rtol=1e-5)
    # candidates layout: the same numbers for the same pairs
    idx = torch.tensor([[0, 3, 9], [1, 1, 2], [5, 4, 0], [8, 7, 6], [2, 2, 2], [9, 0, 1], [3, 6, 8], [4, 5, 7]])
    cand = model.separable_score(m, {k: v[idx] for k, v in e.items()})
    torch.testing.assert_close(cand, torch.gather(separable, 1, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("missing_image", ["zeros", "mask"])
def test_the_stage1_key_is_built_from_the_stored_features_and_gives_them_back(missing_image):
    """The index stores k_e once (in FAISS) and builds it from the entity's fused and summary
    features (otmel.model.otmel.retrieval_key_of): it must equal the model's own key, bit for bit,
    and key_features_of must give those features back, for entities with and without images."""
    import numpy as np

    from otmel.model.otmel import KEY_FEATURES, key_features_of, retrieval_key_of

    model, _ = make_model("ot", missing_image=missing_image)
    model.eval()
    with torch.no_grad():
        e = {k: v.numpy() for k, v in model.encode(**random_inputs(9, seed=8, image_rate=0.5)).items()}
    assert 0 < e["has_image"].mean() < 1
    key = retrieval_key_of(e["fused"], e["text_summary"], e["vision_summary"], e["has_image"], missing_image)
    assert np.array_equal(key, e["retrieval_key"])
    back = key_features_of(key, e["fused"].shape[1], missing_image)
    for name in KEY_FEATURES:
        assert np.array_equal(back[name], e[name]), name


def test_kd_model_uses_ot_in_training_and_attention_at_inference():
    model, _ = make_model("kd")
    model.train()
    assert model.assignment_method() == "ot"
    model.eval()
    assert model.assignment_method() == "att"
    ot_model, _ = make_model("ot")
    ot_model.eval()
    assert ot_model.assignment_method() == "ot"
    model.inference_method = "ot"  # the exporter's switch for the teacher path
    assert model.assignment_method() == "ot"


def test_entity_and_mention_feature_lists_cover_score_inputs():
    model, _ = make_model("ot")
    model.eval()
    with torch.no_grad():
        m_full = model.encode(**random_inputs(3, seed=6))
        e_full = model.encode(**random_inputs(4, seed=7))
        m = {k: m_full[k] for k in MENTION_FEATURES}
        e = {k: e_full[k] for k in ENTITY_FEATURES}
        torch.testing.assert_close(model.score(m, e).overall, model.score(m_full, e_full).overall)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["ot", "att", "kd"])
def test_modes_train_with_finite_decreasing_loss(mode):
    model, _ = make_model(mode, missing_image="mask")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    m_in, e_in = random_inputs(6, seed=10), random_inputs(6, seed=11)
    ids = ["a", "b", "c", "a", "d", "e"]  # a repeated gold: masked out of the negatives
    losses = []
    for _ in range(12):
        out = model(m_in, e_in, ids)
        assert torch.isfinite(out["loss"])
        assert ("kd" in out) == (mode == "kd")
        opt.zero_grad()
        out["loss"].backward()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_kd_gradient_reaches_attention_not_the_teacher_only_path():
    """L_KD trains the attention path (W_q/W_k) and never pushes gradient through the plans."""
    from otmel.model.losses import distillation_kl

    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, requires_grad=True)
    k = torch.randn(2, 5, 8, requires_grad=True)
    v = torch.randn(2, 5, 8)
    ones_q, ones_k = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    a = assign(q, k, v, ones_q, ones_k, "ot", with_logits=True)
    loss = distillation_kl(a)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # the same gradient as distilling towards a constant copy of the plan
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    from otmel.model.correlation import Assignment, attention_logits

    a2 = Assignment(a.transported, a.weights.detach().clone(), attention_logits(q2, k2), ones_q, ones_k)
    distillation_kl(a2).backward()
    torch.testing.assert_close(q.grad, q2.grad)


def test_tiny_tokenizer_keeps_every_vocabulary_word_whole(tmp_path):
    from transformers import AutoTokenizer

    from otmel.model.encoders import build_tiny_tokenizer
    from otmel.data.synth import SYNTH_VOCABULARY

    tok = build_tiny_tokenizer(SYNTH_VOCABULARY)
    split = [w for w in SYNTH_VOCABULARY if w.isalpha() and len(tok(w)["input_ids"]) != 3]
    assert split == []  # <|startoftext|> word <|endoftext|>
    ids = tok("was washing")["input_ids"]
    assert len(ids) > 4  # "was" is whole, "washing" falls back to characters
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("Was washing")["input_ids"] == ids


def test_in_batch_copies_of_the_gold_entity_are_not_negatives():
    """Rows 0 and 3 link to the same entity: in each of their softmaxes the other copy of
    that entity is left out of the denominator (it is not a negative); other rows keep it."""
    from otmel.model.losses import allowed_columns

    ids = ["a", "b", "c", "a", "d", "e"]
    target = torch.arange(6)
    allowed = allowed_columns(ids, ids, target)
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[0, 3] = expected[3, 0] = False
    assert torch.equal(allowed, expected)

    model, _ = make_model("att", missing_image="mask", seed=0)
    model.train()
    m, e = random_inputs(6, seed=1), random_inputs(6, seed=2)
    losses = model(m, e, ids)
    scores = model.score(model.encode(**m), model.encode(**e))
    for name in ("overall", "fused", "text"):
        S = getattr(scores, name)  # (6, 6); row i's gold is column i
        masked = torch.logsumexp(S.masked_fill(~expected, float("-inf")), 1) - S.diagonal()
        unmasked = torch.logsumexp(S, 1) - S.diagonal()
        assert float(losses[name]) == pytest.approx(float(masked.mean()), rel=1e-5, abs=1e-6), name
        assert abs(float(masked.mean() - unmasked.mean())) > 1e-4  # the copies mattered
