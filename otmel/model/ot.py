r"""Entropic optimal transport for OT-MEL: a batched, masked, differentiable Sinkhorn.

OT-MEL (eqs 9-12) assigns the tokens of one set to those of another with the entropic
optimal-transport plan between them, computed by Sinkhorn-Knopp (Cuturi 2013) on
thousands of small problems at once: a (B, K, n, m) grid of (text tokens x image patches)
problems, typically (256, 256, 40, 50) in training. This module solves

.. math::
    \Pi^* = \mathop{\arg\min}_{\Pi \geq 0} \quad \langle C, \Pi \rangle_F - \varepsilon H(\Pi)
    \quad \text{s.t.} \quad \Pi \mathbf{1} = \mu, \quad \Pi^T \mathbf{1} = \nu,
    \qquad H(\Pi) = -\sum_{ij} \Pi_{ij} (\log \Pi_{ij} - 1),

for every problem of the batch, with uniform marginals over the real (unpadded) elements.

On the regularisation: the paper's Algorithm 1 writes the kernel ``K = exp(-lambda C)``
with lambda = 0.6. On costs in [0, 1] (eq. 10: ``C = (1 - cos) / 2``) that kernel varies
by a factor exp(0.6) < 2 across a whole matrix, so the plan is nearly the uniform
``mu nu^T`` whatever the similarities. The authors' release instead uses
``exp(sim / 0.05)``, i.e. epsilon = 0.05 in POT's convention (kernel ``exp(-C / epsilon)``,
POT's ``reg``), which is our default; with it ``C / epsilon`` spans up to 20, which is why
everything here runs in fp32 (fp64 for fp64 costs) even under bf16 autocast.

Implementation: log-domain Sinkhorn. The potentials ``f = log u`` and ``g = log v`` are
kept in the log domain and updated as

.. math::
    g \leftarrow \log \nu - \mathrm{LSE}_i(-C_{ij}/\varepsilon + f_i), \qquad
    f \leftarrow \log \mu - \mathrm{LSE}_j(-C_{ij}/\varepsilon + g_j),

padded elements having ``log mu_i = -inf`` (so ``f_i = -inf`` and their plan entries are
``exp(-inf) = 0`` exactly). Two evaluations of the log-sum-exp are used:

* the *kernel* path (the fast one, used whenever it is exact): the kernel
  ``K = exp(-(C - min C) / epsilon)`` is built once per problem (shifted so its largest
  entry is 1) and ``LSE_i(-C_ij/eps + f_i) = s + log sum_i K_ij exp(f_i - s)`` with
  ``s = max_i f_i``: one batched mat-vec product per half-iteration instead of a
  logsumexp pass (add, max, subtract, exp, sum, log) over the whole (n, m) grid. It is
  exact as long as no kernel entry underflows, which is checked (one host sync per call):
  ``(max C - min C) / epsilon`` of every problem must be at most 50 in fp32 (600 in fp64),
  so the smallest kernel entry, ``exp(-50)``, is a normal float with a wide margin. The
  default (costs in [0, 1], epsilon 0.05) has at most 20. Its gradient is the exact
  gradient of the unrolled iterations, written by hand (``_KernelSinkhorn``): autograd
  would materialise one (n, m) outer product per half-iteration, the hand-written reverse
  pass adds them all up in one rank-2T batched product (tested equal to autograd's).
* the *logsumexp* path (``torch.logsumexp`` on ``-C / epsilon`` precomputed once, plain
  autograd), the general fallback for costs whose range over epsilon exceeds that bound
  (or with ``+inf`` entries, i.e. forbidden pairs, as long as every real row and column
  keeps a finite one).

Both give the same plan and gradient up to float rounding (tested). Without autograd the
kernel path writes the plan into the kernel's memory (one (n, m)-sized allocation per
call). ``bench/sinkhorn.py`` measures both against POT's batched solver.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["sinkhorn", "barycentric_map", "CHECK_EVERY"]

#: with ``tol``, the marginal error is checked every CHECK_EVERY iterations (POT's convention)
CHECK_EVERY = 10

# Largest per-problem range of C / epsilon for which the kernel path is exact: the smallest
# kernel entry exp(-range) stays a normal float with a wide margin (fp32 underflows below
# exp(-87), fp64 below exp(-708)), so every mat-vec sum keeps full relative precision.
_KERNEL_MAX_RANGE = {torch.float32: 50.0, torch.float64: 600.0}


def sinkhorn(
    cost: Tensor,
    mask_a: Tensor | None = None,
    mask_b: Tensor | None = None,
    epsilon: float = 0.05,
    n_iters: int = 3,
    tol: float | None = None,
) -> Tensor:
    r"""Entropic OT plans of a batch of problems with uniform marginals on the real elements.

    Solves, for every problem of the batch (Cuturi 2013),

    .. math::
        \Pi^* = \mathop{\arg\min}_{\Pi \geq 0} \quad \langle C, \Pi \rangle_F
        - \varepsilon H(\Pi)
        \quad \text{s.t.} \quad \Pi \mathbf{1} = \mu, \quad \Pi^T \mathbf{1} = \nu

    with :math:`H(\Pi) = -\sum_{ij} \Pi_{ij} (\log \Pi_{ij} - 1)`,
    :math:`\mu_i = 1 / n_{real}` on the real rows and 0 on the padded ones, :math:`\nu`
    likewise on the columns, by log-domain Sinkhorn-Knopp iterations. Each iteration is a
    column update followed by a row update, so the returned plan meets the row marginal
    exactly (up to float rounding) and the column marginal up to the convergence error.

    Parameters
    ----------
    cost : Tensor, shape (..., n, m)
        Cost matrices :math:`C`; any number of leading batch dims. Entries of padded
        rows/columns may hold any finite value: they do not affect the result.
    mask_a : BoolTensor, shape (..., n), optional
        True for the real rows (Hugging Face attention-mask polarity; 0/1 integer masks
        are accepted). Its leading dims broadcast against ``cost``'s, e.g. (B, 1, n)
        against a (B, K, n, m) cost. None: all rows are real.
    mask_b : BoolTensor, shape (..., m), optional
        Same for the columns.
    epsilon : float, default 0.05
        Entropic regularisation :math:`\varepsilon`, POT's ``reg``: kernel
        ``exp(-C / epsilon)``. Must be > 0.
    n_iters : int, default 3
        Number of full iterations (column update + row update). With ``tol``, the
        maximum number of iterations.
    tol : float, optional
        If given, stop as soon as the column-marginal error of the plan is below ``tol``,
        the error being the largest L1 violation over the batch,
        :math:`\max_b \| \Pi_b^T \mathbf{1} - \nu_b \|_1`, checked every
        :data:`CHECK_EVERY` (10) iterations (POT's convention; the check reuses the
        next column update's sums, so it costs no extra pass over the plan). The number
        of iterations run and the error are logged at DEBUG level (``extra`` fields
        ``sinkhorn_iters`` and ``sinkhorn_err`` on the log record); a WARNING is logged
        if ``n_iters`` is reached first.

    Returns
    -------
    plan : Tensor, shape (..., n, m)
        The plans :math:`\Pi`, leading dims broadcast from ``cost``, ``mask_a`` and
        ``mask_b``. Rows and columns of padded elements are exactly 0, and a problem
        without any real row or column (e.g. an entity without image whose visual tokens
        are all masked) gets an all-zero plan, with finite gradients.

    Notes
    -----
    Precision: computed in fp64 when ``cost`` is fp64, otherwise in fp32 — also for fp16 /
    bf16 costs and under ``torch.autocast`` (disabled inside): ``C / epsilon`` reaches 20,
    where bf16's spacing is 0.125, i.e. up to ~6% error on every kernel entry. The plan
    is returned in the cost's dtype: fp16/bf16 costs get an fp16/bf16 plan (cast at the
    end, so the padded zeros stay exact), fp32/fp64 costs an fp32/fp64 plan; other dtypes
    give an fp32 plan.

    Differentiable through the iterations (unrolled: no implicit or envelope gradient), so
    the gradient is that of the ``n_iters`` (or, with ``tol``, the iterations actually run)
    truncated iterations: plain autograd on the logsumexp path, an equivalent hand-written
    backward on the kernel path (module docstring). Once differentiable: no double
    backward on the kernel path.

    Examples
    --------
    >>> cost = torch.rand(8, 5, 40, 50)
    >>> text_mask = torch.ones(8, 1, 40, dtype=torch.bool)
    >>> plan = sinkhorn(cost, text_mask, None, epsilon=0.05, n_iters=3)
    >>> plan.shape
    torch.Size([8, 5, 40, 50])
    """
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., n, m), got {tuple(cost.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")
    n, m = cost.shape[-2:]
    mask_a = _check_mask(mask_a, n, "mask_a")
    mask_b = _check_mask(mask_b, m, "mask_b")
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32

    with torch.autocast(device_type=cost.device.type, enabled=False):
        c = cost.to(dtype)
        owned = c is not cost  # a private copy: may be overwritten in place
        shape = _batch_shape(cost, mask_a, mask_b) + (n, m)
        if c.shape != shape:  # masks with more leading dims than the cost
            c, owned = c.expand(shape), False
        if n == 0 or m == 0:
            plan = c.new_zeros(shape)
        else:
            marg = _Marginals(mask_a, mask_b, n, m, dtype, cost.device)
            # ONNX export traces the plain logsumexp iterations: the kernel path's custom
            # autograd Function and host-side range check do not trace
            exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
            plan = None if exporting else _sinkhorn_kernel(c, owned, marg, epsilon, n_iters, tol)
            if plan is None:  # the kernel could underflow: general log-domain path
                log.debug("sinkhorn: (max C - min C) / epsilon > %g, using the logsumexp path",
                          _KERNEL_MAX_RANGE[dtype])
                plan = _sinkhorn_lse(c, owned, marg, epsilon, n_iters, tol)
    if cost.dtype in (torch.float16, torch.bfloat16):
        plan = plan.to(cost.dtype)
    return plan


def barycentric_map(plan: Tensor, values: Tensor, mask_a: Tensor | None = None) -> Tensor:
    r"""Barycentric projection of ``values`` through a plan: :math:`G = \mathrm{diag}(1/\mu) \Pi H`.

    Row i of G is the average of the rows of H weighted by row i of the plan (the plan's
    rows sum to :math:`\mu_i = 1 / n_{real}`, so :math:`G_i = n_{real} \sum_j \Pi_{ij} H_j`).
    OT-MEL's eq. 12 multiplies H by the raw plan, whose rows sum to 1/n; we use the
    barycentric map instead so that G stays on the scale of H whatever the number of real
    rows (and the OT path is interchangeable with attention, whose rows sum to 1).

    Parameters
    ----------
    plan : Tensor, shape (..., n, m)
        Plans from :func:`sinkhorn`.
    values : Tensor, shape (..., m, d)
        The rows :math:`H_j` to transport; leading dims broadcast against ``plan``'s.
    mask_a : BoolTensor, shape (..., n), optional
        The row mask given to :func:`sinkhorn` (it defines :math:`\mu`). None: all real.

    Returns
    -------
    G : Tensor, shape (..., n, d)
        Padded rows (``1/mu_i`` taken as 0) and rows of problems without real columns
        (all-zero plan) are exactly 0. Dtype: the promotion of ``plan``'s and
        ``values``' dtypes (autocast applies as for any matmul).
    """
    n = plan.shape[-2]
    dtype = torch.promote_types(plan.dtype, values.dtype)
    out = torch.matmul(plan.to(dtype), values.to(dtype))  # (..., n, d)
    if mask_a is None:
        return out * n
    mask_a = _check_mask(mask_a, n, "mask_a")
    inv_mu = mask_a.sum(-1, keepdim=True) * mask_a  # (..., n): n_real on real rows, 0 on padded
    return out * inv_mu.unsqueeze(-1).to(out.dtype)


# --------------------------------------------------------------------------- internals


def _check_mask(mask: Tensor | None, size: int, name: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.dim() < 1 or mask.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _batch_shape(cost: Tensor, mask_a: Tensor | None, mask_b: Tensor | None) -> tuple[int, ...]:
    shapes = [cost.shape[:-2]] + [mk.shape[:-1] for mk in (mask_a, mask_b) if mk is not None]
    return tuple(torch.broadcast_shapes(*shapes))


class _Marginals:
    """Uniform marginals over the real elements, in the forms the iterations need.

    A problem without any real row or column ("empty") is solved as if all its elements
    were real (so every intermediate stays finite, in value and gradient) and its plan is
    zeroed at the end through ``mu_out``/``empty``. Attributes (``...`` = the masks' own
    leading dims, broadcastable against the cost's):

    log_mu : (..., n)  log mu_i, -inf on padded rows      mu : (..., n)  mu_i (0 on padded)
    log_nu : (..., m)  log nu_j, -inf on padded columns   nu : (..., m)
    mu_out : (..., n)  mu with empty problems zeroed      empty : (...) bool or None
    """

    def __init__(self, mask_a, mask_b, n, m, dtype, device):
        if mask_a is None and mask_b is None:  # fast common case: no padding at all
            self.empty = None
            self.log_mu = torch.full((n,), -math.log(n), dtype=dtype, device=device)
            self.log_nu = torch.full((m,), -math.log(m), dtype=dtype, device=device)
            self.mu = self.mu_out = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
            self.nu = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
            return
        if mask_a is None:
            mask_a = torch.ones(n, dtype=torch.bool, device=device)
        if mask_b is None:
            mask_b = torch.ones(m, dtype=torch.bool, device=device)
        self.empty = ~(mask_a.any(-1) & mask_b.any(-1))  # (...)
        real = ~self.empty.unsqueeze(-1)
        mask_a = mask_a | ~real  # empty problems: all real (zeroed at the end)
        mask_b = mask_b | ~real
        self.log_mu, self.mu = _log_uniform(mask_a, dtype)
        self.log_nu, self.nu = _log_uniform(mask_b, dtype)
        self.mu_out = self.mu * real

    def zero_empty_rows(self, f: Tensor) -> Tensor:
        """Row potentials with the rows of empty problems set to -inf (their plan -> 0)."""
        if self.empty is None:
            return f
        return f.masked_fill(self.empty.unsqueeze(-1), -math.inf)


def _log_uniform(mask: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """(log p, p) of the uniform distribution on the True entries of each row of mask."""
    count = mask.sum(-1, keepdim=True).to(dtype)  # >= 1 (empty problems were filled)
    p = mask / count
    log_p = torch.where(mask, -torch.log(count), -math.inf)
    return log_p, p


def _col_error(g_prev: Tensor, lse: Tensor, nu: Tensor) -> float:
    """Largest L1 column-marginal error over the batch of the plan exp(-C/eps + f + g_prev).

    ``lse = LSE_i(-C_ij/eps + f_i)`` is the next column update's sum, so the plan's
    column sums are ``exp(g_prev + lse)`` (0 on padded columns, where g_prev = -inf).
    """
    col = torch.exp(g_prev.detach() + lse.detach())
    return float((col - nu).abs().sum(-1).max())


def _log_done(n_done: int, n_iters: int, err: float, tol: float) -> None:
    extra = {"sinkhorn_iters": n_done, "sinkhorn_err": err}
    if err < tol:
        log.debug("sinkhorn: column-marginal error %.3g < tol %.3g after %d iterations",
                  err, tol, n_done, extra=extra)
    else:
        log.debug("sinkhorn: %d iterations, column-marginal error %.3g", n_done, err, extra=extra)
        log.warning("sinkhorn did not converge: column-marginal L1 error %.3g >= tol %.3g after "
                    "n_iters=%d iterations", err, tol, n_iters)


def _sinkhorn_kernel(c: Tensor, owned: bool, marg: _Marginals, epsilon: float, n_iters: int,
                     tol: float | None) -> Tensor | None:
    """Log-domain Sinkhorn with the log-sum-exps as mat-vecs on a precomputed kernel.

    ``c`` has the full batch shape; ``owned``: it is a private copy that may be overwritten.
    Returns None (without iterating) if the kernel could underflow (module docstring).
    """
    cd = c.detach()
    cmin = cd.amin(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    span = float((cd.amax(dim=(-2, -1), keepdim=True) - cmin).max()) / epsilon  # the one host sync
    if not span <= _KERNEL_MAX_RANGE[c.dtype]:  # also catches NaN
        return None
    if torch.is_grad_enabled() and c.requires_grad:
        return _KernelSinkhorn.apply(c, cmin, marg, epsilon, n_iters, tol)
    if owned:
        K = c.sub_(cmin).mul_(-1.0 / epsilon).exp_()  # no new allocation
    else:
        K = _kernel(c, cmin, epsilon)
    return _kernel_iterations(K, marg, n_iters, tol, keep=False)[0]


def _kernel(c: Tensor, cmin: Tensor, epsilon: float) -> Tensor:
    """K = exp(-(C - min C) / eps): largest entry 1 in each problem. The shift is a constant per
    problem, absorbed by the potentials: it changes neither the plan nor its gradient."""
    return torch.add(cmin / epsilon, c, alpha=-1.0 / epsilon).exp_()


def _kernel_iterations(K: Tensor, marg: _Marginals, n_iters: int, tol: float | None, keep: bool):
    """The iterations of the kernel path, without autograd (see _KernelSinkhorn for gradients).

    Returns ``(plan, saved)``; with ``keep``, ``saved = (r, ws, cols, zs, rows)``: the plan's row
    factor and, per iteration, w = exp(f - s), a = w K, z = exp(g - t), b = K z. Without
    ``keep``, the plan is written into K's memory.
    """
    Kt = K.transpose(-1, -2)  # (..., m, n) view (not .mT: ONNX export has no aten::mT): vector-on-the-left mat-vecs are the fast ones on CPU
    n = K.shape[-2]
    f = marg.log_mu.expand(K.shape[:-2] + (n,))  # (..., n) row potential log u, -inf on padded rows
    g = z = b = None
    ws, cols, zs, rows = [], [], [], []
    n_done, err = n_iters, math.inf
    for it in range(n_iters):
        # column update: g = log nu - LSE_i(-C_ij/eps + f_i), with LSE = s + log(exp(f - s)^T K)
        s = f.amax(-1, keepdim=True)  # finite: every problem has a real row
        w = (f - s).exp_()  # (..., n), 0 on padded rows
        a = torch.matmul(w.unsqueeze(-2), K).squeeze(-2)  # (..., m), > 0
        lse = torch.log(a).add_(s)
        if tol is not None and it > 0 and it % CHECK_EVERY == 0:
            err = _col_error(g, lse, marg.nu)
            if err < tol:  # return the plan of the previous iteration (f, g, z, b)
                n_done = it
                break
        g = marg.log_nu - lse  # (..., m), -inf on padded columns
        # row update: f = log mu - LSE_j(-C_ij/eps + g_j), with LSE = t + log(K exp(g - t))
        t = g.amax(-1, keepdim=True)
        z = (g - t).exp_()  # (..., m), 0 on padded columns
        b = torch.matmul(z.unsqueeze(-2), Kt).squeeze(-2)  # (..., n), > 0
        f = marg.log_mu - torch.log(b).add_(t)
        if keep:
            ws.append(w), cols.append(a), zs.append(z), rows.append(b)
    if tol is not None:
        if n_done == n_iters:  # error of the returned plan: one more column sum
            s = f.amax(-1, keepdim=True)
            w = (f - s).exp_()
            err = _col_error(g, torch.log(torch.matmul(w.unsqueeze(-2), K).squeeze(-2)).add_(s), marg.nu)
        _log_done(n_done, n_iters, err, tol)
    # plan = diag(r) K diag(z), r = mu / (K z): rows sum to mu up to rounding; padded rows (mu = 0),
    # padded columns (z = 0) and empty problems (mu_out = 0) are exactly 0.
    r = marg.mu_out / b  # (..., n)
    if keep:
        return (K * z.unsqueeze(-2)).mul_(r.unsqueeze(-1)), (r, ws, cols, zs, rows)
    return K.mul_(z.unsqueeze(-2)).mul_(r.unsqueeze(-1)), None


class _KernelSinkhorn(torch.autograd.Function):
    """The kernel path with a hand-written backward: the exact gradient of the unrolled
    iterations (what autograd through them computes, checked against it in the tests),
    without materialising one (..., n, m) outer product per half-iteration.

    Reverse pass, with G = dL/dPi, P = diag(r) K diag(z_T), r = mu / b_T and per iteration
    a_t = w_t K, g_t = log nu - log a_t - s_t, z_t = exp(g_t - t_t), b_t = K z_t,
    f_t = log mu - log b_t - t_t, w_{t+1} = exp(f_t - s_{t+1}) (shifts s, t are constants)::

        dr = (G * K) z_T          dz_T = r (G * K)           db_T = -dr r / b_T
        for t = T..1:  dz_t += db_t K      da_t = -dz_t z_t / a_t
                       dw_t = K da_t       db_{t-1} = -dw_t w_t / b_{t-1}
        dK = G * (r z_T^T) + sum_t (db_t z_t^T + w_t da_t^T)      (one rank-2T bmm)
        dC = -dK * K / eps

    Once differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx, c, cmin, marg, epsilon, n_iters, tol):
        K = _kernel(c, cmin, epsilon)
        plan, (r, ws, cols, zs, rows) = _kernel_iterations(K, marg, n_iters, tol, keep=True)
        ctx.epsilon, ctx.n_done = epsilon, len(ws)
        ctx.save_for_backward(K, r, *ws, *cols, *zs, *rows)
        return plan

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        K, r, *vec = ctx.saved_tensors
        T = ctx.n_done
        ws, cols, zs, rows = (vec[i * T:(i + 1) * T] for i in range(4))
        Kt = K.transpose(-1, -2)
        GK = G * K  # (..., n, m)
        dr = torch.matmul(zs[-1].unsqueeze(-2), GK.transpose(-1, -2)).squeeze(-2)  # (..., n)
        dz = torch.matmul(r.unsqueeze(-2), GK).squeeze(-2)  # (..., m): z_T in the plan
        del GK
        db = -dr * r / rows[-1]
        left, right = [], []  # rank-1 terms of dK: left (..., n), right (..., m)
        for t in reversed(range(T)):
            dz = torch.matmul(db.unsqueeze(-2), K).squeeze(-2) + (dz if t == T - 1 else 0)  # b_t = K z_t
            da = -dz * zs[t] / cols[t]  # z_t = exp(log nu - log a_t - const)
            left += [db, ws[t]]
            right += [zs[t], da]
            if t > 0:
                dw = torch.matmul(da.unsqueeze(-2), Kt).squeeze(-2)  # a_t = w_t K
                db = -dw * ws[t] / rows[t - 1]  # w_t = exp(log mu - log b_{t-1} - const)
        scale = -1.0 / ctx.epsilon
        n, m = K.shape[-2:]
        dC = (G * (r * scale).unsqueeze(-1)).mul_(zs[-1].unsqueeze(-2))  # G * (r z_T^T), scaled
        if not dC.is_contiguous():  # G with an unusual layout
            dC = dC.contiguous()
        L = torch.stack(left, -1).mul_(scale).reshape(-1, n, 2 * T)
        R = torch.stack(right, -2).reshape(-1, 2 * T, m)
        dC.view(-1, n, m).baddbmm_(L, R)
        return dC.mul_(K), None, None, None, None, None


def _sinkhorn_lse(c: Tensor, owned: bool, marg: _Marginals, epsilon: float, n_iters: int,
                  tol: float | None) -> Tensor:
    """Log-domain Sinkhorn with ``torch.logsumexp`` (general: any cost range, +inf allowed)."""
    logK = c.mul_(-1.0 / epsilon) if owned else c * (-1.0 / epsilon)  # (..., n, m), computed once
    f = marg.log_mu
    g = None
    n_done, err = n_iters, math.inf
    for it in range(n_iters):
        lse = torch.logsumexp(logK + f.unsqueeze(-1), dim=-2)  # (..., m)
        if tol is not None and it > 0 and it % CHECK_EVERY == 0:
            err = _col_error(g, lse, marg.nu)
            if err < tol:
                n_done = it
                break
        g = marg.log_nu - lse
        f = marg.log_mu - torch.logsumexp(logK + g.unsqueeze(-2), dim=-1)  # (..., n)
    if tol is not None:
        if n_done == n_iters:  # error of the returned plan: one more column sum
            with torch.no_grad():
                err = _col_error(g, torch.logsumexp(logK + f.unsqueeze(-1), dim=-2), marg.nu)
        _log_done(n_done, n_iters, err, tol)
    f = marg.zero_empty_rows(f)
    log_plan = logK + f.unsqueeze(-1)
    if log_plan.shape == torch.broadcast_shapes(log_plan.shape, g.unsqueeze(-2).shape):
        return log_plan.add_(g.unsqueeze(-2)).exp_()
    return torch.exp(log_plan + g.unsqueeze(-2))
