"""OT and KD stay in fp32 under autocast (``otmel train --gpu`` runs bf16 autocast)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, random_inputs
from otmel.model.correlation import assign
from otmel.model.losses import distillation_kl

IDS = ["a", "b", "c", "a", "d", "e"]


def _plans_and_losses(model, dtype=None):
    """Every OT plan of one kd training forward (captured in call order) and its losses."""
    import otmel.model.correlation as correlation
    import otmel.model.matching as matching

    plans, real = [], correlation.assign

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if args[5] == "ot":
            plans.append(out.weights.detach().float())
        return out

    correlation.assign, matching.assign = spy, spy
    try:
        m, e = random_inputs(6, seed=1), random_inputs(6, seed=2)  # padded texts, image-less rows
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = model(m, e, IDS)
    finally:
        correlation.assign, matching.assign = real, real
    return plans, losses


@pytest.fixture(scope="module")
def kd_train_model():
    model, _ = make_model("kd", missing_image="mask", seed=0)
    model.train()
    return model


def test_ot_plans_under_bf16_autocast_match_fp32(kd_train_model):
    ref_plans, ref = _plans_and_losses(kd_train_model)
    plans, got = _plans_and_losses(kd_train_model, torch.bfloat16)
    assert len(plans) == len(ref_plans) == 6  # 4 multimodal + 2 unimodal assignments
    for a, b in zip(plans, ref_plans):
        assert (a - b).abs().max().item() < 1e-3
    assert torch.isfinite(got["kd"]) and got["kd"].item() == pytest.approx(ref["kd"].item(), rel=2e-3)


def test_cost_and_kd_logits_are_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    Q, K, H = (torch.randn(4, n, 96, generator=g) for n in (40, 50, 50))
    qmask = torch.arange(40)[None] < torch.tensor([[40], [12], [3], [25]])
    kmask = torch.ones(4, 50, dtype=torch.bool)
    ref = assign(Q, K, H, qmask, kmask, "ot", with_logits=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = assign(Q, K, H, qmask, kmask, "ot", with_logits=True)
        kd = distillation_kl(got)
    assert got.weights.dtype == torch.float32 and got.logits.dtype == torch.float32
    torch.testing.assert_close(got.weights, ref.weights, atol=1e-6, rtol=1e-5)
    assert kd.dtype == torch.float32 and kd.item() == pytest.approx(distillation_kl(ref).item(), rel=1e-5)


def test_kd_loss_is_finite_in_fp16_with_padding(kd_train_model):
    _, losses = _plans_and_losses(kd_train_model, torch.float16)
    assert all(torch.isfinite(v) for v in losses.values()), {k: float(v) for k, v in losses.items()}
    # an fp16 assignment handed straight to the loss: padded rows are all-zero plan rows
    g = torch.Generator().manual_seed(3)
    Q, K, H = (torch.randn(2, n, 16, generator=g) for n in (8, 6, 6))
    qmask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    a = assign(Q, K, H, qmask, torch.ones(2, 6, dtype=torch.bool), "ot", with_logits=True)
    a.weights, a.logits = a.weights.half(), a.logits.half()
    assert torch.isfinite(distillation_kl(a))
