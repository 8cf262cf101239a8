"""Tests of otmel.model.ot: batched masked log-domain Sinkhorn and the barycentric map.

Most tests run on both evaluation paths of the log-sum-exps (the precomputed-kernel one and
the torch.logsumexp fallback), selected through the ``path`` fixture.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import ot as pot
import pytest
import torch

import otmel.model.ot as otm
from otmel.model.ot import CHECK_EVERY, barycentric_map, sinkhorn


@pytest.fixture(params=["kernel", "lse"])
def path(request, monkeypatch):
    """Force one evaluation path: 'lse' makes every cost "too wide" for the kernel path."""
    if request.param == "lse":
        monkeypatch.setitem(otm._KERNEL_MAX_RANGE, torch.float32, -1.0)
        monkeypatch.setitem(otm._KERNEL_MAX_RANGE, torch.float64, -1.0)
    taken = {"kernel": 0, "lse": 0}
    kernel, lse = otm._sinkhorn_kernel, otm._sinkhorn_lse

    def spy_kernel(*a, **k):
        out = kernel(*a, **k)
        taken["kernel"] += out is not None
        return out

    def spy_lse(*a, **k):
        taken["lse"] += 1
        return lse(*a, **k)

    monkeypatch.setattr(otm, "_sinkhorn_kernel", spy_kernel)
    monkeypatch.setattr(otm, "_sinkhorn_lse", spy_lse)
    yield request.param
    # the forced path was the one taken (guards the fixture itself)
    assert taken[request.param] > 0
    if request.param == "lse":
        assert taken["kernel"] == 0


def rand_mask(shape, p_real=0.7, gen=None, min_real=1):
    """Random boolean mask with at least ``min_real`` True per row."""
    m = torch.rand(shape, generator=gen) < p_real
    m[..., :min_real] = True
    return m[..., torch.randperm(shape[-1], generator=gen)]


def uniform(mask, dtype=torch.float64):
    """mu for a mask: 1/n_real on real entries, 0 elsewhere (0 everywhere if none is real)."""
    mask = mask.to(dtype)
    return mask / mask.sum(-1, keepdim=True).clamp(min=1)


def col_l1(plan, nu):
    return (plan.sum(-2) - nu).abs().sum(-1)


def pot_plan(cost, epsilon, iters=20000, thr=1e-13):
    """POT's independent log-domain solver on one unpadded problem (numpy float64)."""
    n, m = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    return pot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", numItermax=iters, stopThr=thr)


def sinkhorn_numpy(cost, mu, nu, epsilon, n_iters):
    """Textbook Sinkhorn-Knopp in the scaling domain (float64 numpy, unmasked)."""
    K = np.exp(-cost / epsilon)
    u = np.ones(len(mu))
    for _ in range(n_iters):
        v = nu / (K.T @ u)
        u = mu / (K @ v)
    return u[:, None] * K * v[None, :]


# --------------------------------------------------------------------------- marginals


@pytest.mark.parametrize("masked", [False, True])
def test_marginals_rows_exact_columns_converged(path, masked):
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        n, m = (int(x) for x in torch.randint(1, 13, (2,), generator=gen))
        cost = torch.rand(3, n, m, generator=gen, dtype=torch.float64)
        ma = rand_mask((3, n), gen=gen) if masked else None
        mb = rand_mask((3, m), gen=gen) if masked else None
        mu = uniform(ma) if masked else torch.full((3, n), 1.0 / n, dtype=torch.float64)
        nu = uniform(mb) if masked else torch.full((3, m), 1.0 / m, dtype=torch.float64)
        # fixed iterations, fp32: rows exact (the last half-step is the row update)
        plan32 = sinkhorn(cost.float(), ma, mb, epsilon=0.1, n_iters=3)
        assert torch.allclose(plan32.sum(-1).double(), mu, atol=1e-6, rtol=0)
        # converged, fp64: columns within tol, rows still exact
        plan = sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=20000, tol=1e-9)
        assert torch.allclose(plan.sum(-1), mu, atol=1e-12, rtol=0)
        assert col_l1(plan, nu).max() < 1e-9
        assert (plan >= 0).all()


def test_few_iterations_leave_a_column_error():
    """Guards the test above: after 1 iteration the columns are *not* yet at nu."""
    cost = torch.rand(4, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = sinkhorn(cost, epsilon=0.05, n_iters=1)
    assert col_l1(plan, torch.full((11,), 1 / 11, dtype=torch.float64)).max() > 1e-3


def test_padded_entries_exactly_zero_and_ignored(path):
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(4, 7, 9, generator=gen, dtype=torch.float64)
    ma, mb = rand_mask((4, 7), 0.6, gen), rand_mask((4, 9), 0.6, gen)
    pad = ~(ma.unsqueeze(-1) & mb.unsqueeze(-2))
    plan = sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=5)
    assert pad.any()
    assert (plan[pad] == 0).all()  # exactly zero, not tiny
    assert (plan[~pad] > 0).all()
    # any finite values in the padded entries: same real part
    for garbage in (torch.rand(4, 7, 9, generator=gen, dtype=torch.float64) * 3 - 1,
                    torch.full((4, 7, 9), 1e3, dtype=torch.float64)):
        other = torch.where(pad, garbage, cost)
        plan2 = sinkhorn(other, ma, mb, epsilon=0.1, n_iters=5)
        assert (plan2[pad] == 0).all()
        torch.testing.assert_close(plan2, plan, atol=1e-14, rtol=1e-12)


# --------------------------------------------------------------------------- POT agreement


@pytest.mark.parametrize("epsilon", [0.05, 0.2, 1.0])
def test_matches_pot_unmasked(path, epsilon):
    gen = torch.Generator().manual_seed(3)
    cost = torch.rand(2, 6, 8, generator=gen, dtype=torch.float64)
    plan = sinkhorn(cost, epsilon=epsilon, n_iters=20000, tol=1e-13)
    for b in range(2):
        ref = pot_plan(cost[b].numpy(), epsilon)
        np.testing.assert_allclose(plan[b].numpy(), ref, atol=1e-9, rtol=0)
        assert np.abs(plan[b].numpy() - ref).max() < 1e-6  # the brief's bar, with room


def test_matches_pot_masked(path):
    gen = torch.Generator().manual_seed(4)
    B, K, n, m = 2, 3, 7, 9
    cost = torch.rand(B, K, n, m, generator=gen, dtype=torch.float64)
    ma = rand_mask((B, 1, n), 0.6, gen)  # broadcast over K, like an entity's text mask
    mb = rand_mask((1, K, m), 0.6, gen)
    plan = sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=20000, tol=1e-13)
    for b in range(B):
        for k in range(K):
            ra, rb = ma[b, 0], mb[0, k]
            ref = pot_plan(cost[b, k][ra][:, rb].numpy(), 0.1)
            np.testing.assert_allclose(plan[b, k][ra][:, rb].numpy(), ref, atol=1e-9, rtol=0)
            assert plan[b, k][~ra].abs().sum() == 0 and plan[b, k][:, ~rb].abs().sum() == 0


def test_wide_cost_falls_back_to_logsumexp_fp32(monkeypatch):
    """(max C - min C)/eps = 200 would underflow an fp32 kernel: the logsumexp path is taken."""
    calls = []
    real = otm._sinkhorn_lse
    monkeypatch.setattr(otm, "_sinkhorn_lse", lambda *a, **k: calls.append(1) or real(*a, **k))
    cost = torch.rand(3, 6, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 10
    plan = sinkhorn(cost.float(), epsilon=0.05, n_iters=50)
    assert calls and plan.isfinite().all()
    ref = sinkhorn(cost, epsilon=0.05, n_iters=50)  # fp64: kernel path (range 200 < 600)
    assert len(calls) == 1
    torch.testing.assert_close(plan.double(), ref, atol=1e-6, rtol=1e-4)


def test_paths_agree_fp32_default_settings():
    gen = torch.Generator().manual_seed(6)
    cost = torch.rand(5, 4, 40, 50, generator=gen)
    ma, mb = rand_mask((5, 1, 40), 0.8, gen), rand_mask((1, 4, 50), 0.8, gen)
    fast = sinkhorn(cost, ma, mb)
    ref = otm._sinkhorn_lse(cost, False, otm._Marginals(ma, mb, 40, 50, torch.float32, "cpu"), 0.05, 3, None)
    torch.testing.assert_close(fast, ref, atol=1e-7, rtol=1e-4)


# --------------------------------------------------------------------------- batching


def test_batched_equals_looped(path):
    gen = torch.Generator().manual_seed(7)
    B, K, n, m = 3, 4, 6, 5
    cost = torch.rand(B, K, n, m, generator=gen)
    ma = rand_mask((B, 1, n), 0.6, gen)
    mb = rand_mask((1, K, m), 0.6, gen)
    plan = sinkhorn(cost, ma, mb, epsilon=0.05, n_iters=7)
    assert plan.shape == (B, K, n, m)
    for b in range(B):
        for k in range(K):
            one = sinkhorn(cost[b, k], ma[b, 0], mb[0, k], epsilon=0.05, n_iters=7)
            torch.testing.assert_close(plan[b, k], one, atol=1e-7, rtol=1e-5)
    # one cost shared by a batch of masks: the plan takes the masks' batch shape
    shared = sinkhorn(cost[0, 0], ma[:, 0], None, epsilon=0.05, n_iters=7)
    assert shared.shape == (B, n, m)
    for b in range(B):
        torch.testing.assert_close(shared[b], sinkhorn(cost[0, 0], ma[b, 0], epsilon=0.05, n_iters=7))


def test_integer_masks_accepted():
    gen = torch.Generator().manual_seed(8)
    cost = torch.rand(2, 5, 6, generator=gen)
    ma, mb = rand_mask((2, 5), 0.6, gen), rand_mask((2, 6), 0.6, gen)
    assert torch.equal(sinkhorn(cost, ma.long(), mb.int()), sinkhorn(cost, ma, mb))


# --------------------------------------------------------------------------- gradients


def test_gradcheck(path):
    gen = torch.Generator().manual_seed(9)
    cost = torch.rand(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    ma = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    mb = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)

    def f(c, h):
        plan = sinkhorn(c, ma, mb, epsilon=0.3, n_iters=4)
        return plan, barycentric_map(plan, h, ma)

    assert torch.autograd.gradcheck(f, (cost, values))
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, epsilon=0.5, n_iters=3), (cost,))


def _grad_via(lse: bool, monkeypatch, cost, *args, **kwargs):
    with monkeypatch.context() as mp:
        if lse:
            mp.setitem(otm._KERNEL_MAX_RANGE, cost.dtype, -1.0)
        c = cost.clone().requires_grad_()
        plan = sinkhorn(c, *args, **kwargs)
        W = torch.randn(plan.shape, generator=torch.Generator().manual_seed(0), dtype=plan.dtype)
        (plan * W).sum().backward()
    return plan.detach(), c.grad


@pytest.mark.parametrize("n_iters,tol", [(1, None), (3, None), (200, 1e-6)])
def test_kernel_backward_equals_autograd_of_logsumexp_path(monkeypatch, n_iters, tol):
    """The kernel path's hand-written backward = autograd through the logsumexp iterations."""
    gen = torch.Generator().manual_seed(18)
    B, K, n, m = 3, 4, 7, 9
    cost = torch.rand(B, K, n, m, generator=gen, dtype=torch.float64)
    ma, mb = rand_mask((B, 1, n), 0.6, gen), rand_mask((1, K, m), 0.6, gen)
    ma[2] = False  # empty problems too
    args = (cost, ma, mb)
    kw = dict(epsilon=0.1, n_iters=n_iters, tol=tol)
    plan_k, grad_k = _grad_via(False, monkeypatch, *args, **kw)
    plan_l, grad_l = _grad_via(True, monkeypatch, *args, **kw)
    torch.testing.assert_close(plan_k, plan_l, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(grad_k, grad_l, atol=1e-12, rtol=1e-9)
    assert grad_k.abs().max() > 1e-3 and (grad_k[2] == 0).all()
    # a cost shared by a batch of masks (expanded inside): gradients summed over the batch
    _, g_k = _grad_via(False, monkeypatch, cost[0, 0], ma[:, 0], mb[0, 0], **kw)
    _, g_l = _grad_via(True, monkeypatch, cost[0, 0], ma[:, 0], mb[0, 0], **kw)
    assert g_k.shape == (n, m)
    torch.testing.assert_close(g_k, g_l, atol=1e-12, rtol=1e-9)


def test_kernel_backward_fp32_close_to_fp64():
    gen = torch.Generator().manual_seed(19)
    cost = torch.rand(64, 40, 50, generator=gen, dtype=torch.float64)
    ma = rand_mask((64, 40), 0.8, gen)
    W = torch.randn(64, 40, 50, generator=gen, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        c = cost.to(dtype).requires_grad_()
        (sinkhorn(c, ma) * W.to(dtype)).sum().backward()
        grads.append(c.grad.double())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4 * grads[1].abs().max().item(), rtol=1e-3)


def test_all_padded_problem_zero_plan_finite_grads(path):
    """An entity without image (all visual tokens masked) and a mention without text."""
    gen = torch.Generator().manual_seed(10)
    cost = torch.rand(3, 5, 6, generator=gen, requires_grad=True)
    values = torch.randn(3, 6, 4, generator=gen, requires_grad=True)
    ma = torch.ones(3, 5, dtype=torch.bool)
    mb = torch.ones(3, 6, dtype=torch.bool)
    ma[0] = False  # no real row
    mb[1] = False  # no real column
    ma[2, 4] = mb[2, 0] = False
    plan = sinkhorn(cost, ma, mb, n_iters=5)
    assert plan.isfinite().all()
    assert (plan[:2] == 0).all()
    torch.testing.assert_close(plan[2], sinkhorn(cost[2].detach(), ma[2], mb[2], n_iters=5))
    G = barycentric_map(plan, values, ma)
    assert G.isfinite().all() and (G[:2] == 0).all()
    (plan * torch.randn(plan.shape, generator=gen)).sum().add(G.square().sum()).backward()
    assert cost.grad.isfinite().all() and values.grad.isfinite().all()
    assert (cost.grad[:2] == 0).all()  # nothing flows into an empty problem
    assert cost.grad[2].abs().sum() > 0
    # same under fp64 and when every problem of the batch is empty
    c64 = cost.detach().double().requires_grad_()
    p = sinkhorn(c64, torch.zeros(3, 5, dtype=torch.bool), mb, n_iters=5)
    p.sum().backward()
    assert (p == 0).all() and (c64.grad == 0).all()


# --------------------------------------------------------------------------- dtypes, autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_kept(dtype):
    cost = torch.rand(2, 3, 4, dtype=dtype)
    plan = sinkhorn(cost, torch.ones(2, 3, dtype=torch.bool))
    assert plan.dtype == dtype and plan.device == cost.device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(path, dtype):
    gen = torch.Generator().manual_seed(11)
    cost = torch.rand(4, 8, 10, generator=gen).to(dtype)
    ma = rand_mask((4, 8), 0.7, gen)
    plan = sinkhorn(cost, ma, None)
    assert plan.dtype == dtype
    # exactly the fp32 computation on the same (rounded) costs, cast at the end
    assert torch.equal(plan, sinkhorn(cost.float(), ma, None).to(dtype))
    assert (plan[~ma] == 0).all()


def test_bf16_autocast():
    gen = torch.Generator().manual_seed(12)
    q, k = torch.randn(6, 40, 16, generator=gen), torch.randn(6, 50, 16, generator=gen)
    ma, mb = rand_mask((6, 40), 0.8, gen), rand_mask((6, 50), 0.8, gen)
    cost32 = torch.rand(6, 40, 50, generator=gen)
    ref32 = sinkhorn(cost32, ma, mb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = (1 - q @ k.mT / 16) / 2  # a bf16 cost, as the model produces under autocast
        assert cost.dtype == torch.bfloat16
        plan = sinkhorn(cost, ma, mb)
        # an fp32 cost stays fp32: autocast is disabled inside (bf16 mat-vecs would differ)
        same = sinkhorn(cost32, ma, mb)
    assert plan.dtype == torch.bfloat16 and plan.isfinite().all()
    torch.testing.assert_close(plan.float(), sinkhorn(cost.float(), ma, mb), atol=1e-6, rtol=2**-8)
    assert same.dtype == torch.float32 and torch.equal(same, ref32)


# --------------------------------------------------------------------------- iterations


def test_one_iteration_by_hand():
    C = [[0.0, 1.0], [0.5, 0.2]]
    eps = 0.5
    K = [[math.exp(-c / eps) for c in row] for row in C]
    # u0 = 1; column update v = nu / K^T u; row update u = mu / K v
    v = [0.5 / (K[0][j] + K[1][j]) for j in range(2)]
    u = [0.5 / (K[i][0] * v[0] + K[i][1] * v[1]) for i in range(2)]
    expected = torch.tensor([[u[i] * K[i][j] * v[j] for j in range(2)] for i in range(2)],
                            dtype=torch.float64)
    plan = sinkhorn(torch.tensor(C, dtype=torch.float64), epsilon=eps, n_iters=1)
    torch.testing.assert_close(plan, expected, atol=1e-15, rtol=1e-13)


@pytest.mark.parametrize("n_iters", [1, 2, 7])
def test_fixed_iterations_match_textbook_sinkhorn(path, n_iters):
    gen = torch.Generator().manual_seed(13)
    cost = torch.rand(3, 5, 4, generator=gen, dtype=torch.float64)
    plan = sinkhorn(cost, epsilon=0.1, n_iters=n_iters)
    for b in range(3):
        ref = sinkhorn_numpy(cost[b].numpy(), np.full(5, 0.2), np.full(4, 0.25), 0.1, n_iters)
        np.testing.assert_allclose(plan[b].numpy(), ref, atol=1e-14, rtol=1e-11)
    other = sinkhorn(cost, epsilon=0.1, n_iters=n_iters + 1)
    assert (other - plan).abs().max() > 1e-8  # one more iteration does change the plan


def _iters_record(caplog):
    recs = [r for r in caplog.records if hasattr(r, "sinkhorn_iters")]
    assert len(recs) == 1
    return recs[0]


def test_tol_stops_early(path, caplog):
    caplog.set_level(logging.DEBUG, logger="otmel.model.ot")
    gen = torch.Generator().manual_seed(14)
    cost = torch.rand(4, 3, 8, 9, generator=gen, dtype=torch.float64)
    ma, mb = rand_mask((4, 1, 8), 0.7, gen), rand_mask((1, 3, 9), 0.7, gen)
    nu = uniform(mb)
    tol = 1e-8
    plan = sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=5000, tol=tol)
    rec = _iters_record(caplog)
    k = rec.sinkhorn_iters
    assert 0 < k < 5000 and k % CHECK_EVERY == 0
    err = col_l1(plan, nu).max().item()
    assert err < tol and rec.sinkhorn_err == pytest.approx(err, rel=1e-6, abs=1e-15)
    # the returned plan is the k-iteration plan, and the check 10 iterations earlier had failed
    assert torch.equal(plan, sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=k))
    assert col_l1(sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=k - CHECK_EVERY), nu).max() >= tol
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tol_not_reached_runs_n_iters_and_warns(path, caplog):
    caplog.set_level(logging.DEBUG, logger="otmel.model.ot")
    cost = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    plan = sinkhorn(cost, epsilon=0.05, n_iters=23, tol=1e-14)
    rec = _iters_record(caplog)
    assert rec.sinkhorn_iters == 23
    nu = torch.full((7,), 1 / 7, dtype=torch.float64)
    assert rec.sinkhorn_err == pytest.approx(col_l1(plan, nu).max().item())
    assert torch.equal(plan, sinkhorn(cost, epsilon=0.05, n_iters=23))
    assert any(r.levelno == logging.WARNING and "did not converge" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- barycentric map


def test_barycentric_map_of_ones_and_formula():
    gen = torch.Generator().manual_seed(16)
    B, K, n, m, d = 2, 3, 6, 7, 4
    cost = torch.rand(B, K, n, m, generator=gen, dtype=torch.float64)
    ma = rand_mask((1, K, n), 0.6, gen)
    mb = rand_mask((B, 1, m), 0.6, gen)
    mb[1, 0] = False  # a problem without real columns
    plan = sinkhorn(cost, ma, mb, epsilon=0.1, n_iters=4)
    ones = barycentric_map(plan, torch.ones(B, 1, m, d, dtype=torch.float64), ma)
    real_rows = (ma & mb.any(-1, keepdim=True)).expand(B, K, n)
    torch.testing.assert_close(ones[real_rows], torch.ones_like(ones[real_rows]), atol=1e-12, rtol=0)
    assert (ones[~real_rows] == 0).all()
    H = torch.randn(B, 1, m, d, generator=gen, dtype=torch.float64)
    G = barycentric_map(plan, H, ma)
    assert G.shape == (B, K, n, d)
    for b in range(B):
        for k in range(K):
            n_real = int(ma[0, k].sum())
            for i in range(n):
                want = sum(plan[b, k, i, j] * H[b, 0, j] for j in range(m)) * (n_real if ma[0, k, i] else 0)
                torch.testing.assert_close(G[b, k, i], want, atol=1e-13, rtol=1e-12)


def test_barycentric_map_unmasked_and_dtype():
    cost = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(17))
    plan = sinkhorn(cost, n_iters=3)
    H = torch.randn(3, 6, 2)
    G = barycentric_map(plan, H)
    torch.testing.assert_close(G, 5 * plan @ H)
    torch.testing.assert_close(barycentric_map(plan, torch.ones(3, 6, 2)), torch.ones(3, 5, 2))
    assert barycentric_map(plan.bfloat16(), H).dtype == torch.float32


# --------------------------------------------------------------------------- validation


def test_argument_validation():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError):
        sinkhorn(cost, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        sinkhorn(cost, None, torch.ones(2, 3, dtype=torch.bool))
    for bad in (dict(epsilon=0.0), dict(n_iters=0), dict(tol=0.0), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            sinkhorn(cost, **bad)
    with pytest.raises(ValueError):
        sinkhorn(torch.rand(3))
    empty = sinkhorn(torch.rand(2, 0, 4), None, torch.ones(5, 1, 4, dtype=torch.bool))
    assert empty.shape == (5, 2, 0, 4)
