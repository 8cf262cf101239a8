"""Correlation assignment (CA): attention (eqs 6-8) and optimal transport (eqs 9-12).

A CA module moves information from a *key* set (e.g. image patches) to a *query* set
(e.g. text tokens): ``Q = X_q W_q``, ``K = X_k W_k``, ``H = X_k W_h`` and

* ATT (eq. 7-8): ``A = softmax(Q K^T / sqrt(d))`` row-wise over the real keys, ``G = A H``;
* OT (eq. 10-12): cost ``C_ij = (1 - cos(Q_i, K_j)) / 2`` in [0, 1], plan
  ``Pi = Sinkhorn(C, mu, nu)`` with uniform marginals over the real elements, ``G`` = the
  barycentric map of the plan (see departure below).

Both paths share W_q and W_k (eq. 6 and eq. 9 use the same projections), which is what
OT -> attention distillation (eq. 28) needs: the attention logits ``S = Q K^T / sqrt(d)``
are computed from the same Q/K beside the OT plan and trained towards it.

Departure from eq. 12 (and from the release): eq. 12 multiplies H by the raw plan, whose
rows sum to 1/n, and the release L2-normalises the rows. We apply the plan as a barycentric
map ``G = diag(1/mu) Pi H`` (rows are weighted averages of H, zero on padded rows): G stays
on the scale of H and the OT and attention paths become interchangeable, which the KD
model relies on at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from otmel.model.ot import barycentric_map, sinkhorn

_NEG = -1e4  # finite "minus infinity" so fully padded rows give zeros, not NaN

METHODS = ("ot", "att")


@dataclass
class Assignment:
    """One correlation assignment (``...`` = any broadcast leading dims).

    transported : (..., n, d)  G, the key values moved onto the query elements
    weights : (..., n, m)      A, the OT plan or the attention weights
    logits : (..., n, m)       S = Q K^T / sqrt(d), for distillation (None unless asked)
    query_mask : (..., n)      key_mask : (..., m)
    """

    transported: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None
    query_mask: torch.Tensor
    key_mask: torch.Tensor


def _full_precision(x: torch.Tensor) -> torch.dtype:
    """fp32 for half/bfloat16 (and fp32) inputs, fp64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def cosine_cost(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """eq. 10: ``C_ij = (1 - cos(Q_i, K_j)) / 2``; query (..., n, d), key (..., m, d) -> (..., n, m).

    Always computed in fp32 (fp64 for fp64 inputs), with autocast disabled: the Sinkhorn
    divides C by epsilon = 0.05, so a bf16 matmul here (spacing 2^-8 near 1) would move the
    plan's entries by ~1% median, up to 6%, before the fp32 iterations even start.
    """
    dtype = torch.promote_types(_full_precision(query), key.dtype)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.to(dtype), key.to(dtype)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-12)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-12)
        return (1.0 - q @ k.transpose(-1, -2)) * 0.5


def attention_logits(query: torch.Tensor, key: torch.Tensor, full_precision: bool = False) -> torch.Tensor:
    """eq. 7: ``S = Q K^T / sqrt(d)``; query (..., n, d), key (..., m, d) -> (..., n, m).

    ``full_precision``: fp32 (fp64 kept) with autocast disabled, for the logits that KD
    trains towards the fp32 OT plan (eq. 28); attention used as attention follows autocast.
    """
    if not full_precision:
        return (query @ key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    dtype = torch.promote_types(_full_precision(query), key.dtype)
    with torch.autocast(device_type=query.device.type, enabled=False):
        return (query.to(dtype) @ key.to(dtype).transpose(-1, -2)) / math.sqrt(query.shape[-1])


def masked_attention(logits: torch.Tensor, query_mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Row softmax over the real keys; padded query rows and key-less rows are all zero."""
    km = key_mask.unsqueeze(-2)  # (..., 1, m)
    weights = torch.softmax(logits.masked_fill(~km, _NEG), dim=-1)
    keep = query_mask.unsqueeze(-1) & km  # (..., n, m)
    return weights * keep.to(weights.dtype)


def assign(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    method: str,
    epsilon: float = 0.05,
    n_iters: int = 3,
    with_logits: bool = False,
) -> Assignment:
    """Assign key elements to query elements with ATT or OT (projections already applied).

    Parameters
    ----------
    query : Tensor, shape (..., n, d)
    key, value : Tensor, shape (..., m, d)
    query_mask : BoolTensor, shape (..., n);  key_mask : BoolTensor, shape (..., m)
        True = real element; leading dims broadcast (e.g. (1, E, n) against (M, 1, m)).
    method : "ot" or "att"
    with_logits : also return ``S = Q K^T / sqrt(d)`` (distillation of an OT plan).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # the logits a KD student is trained on (with_logits) are fp32, like its OT teacher
    logits = attention_logits(query, key, full_precision=with_logits) if (with_logits or method == "att") else None
    if method == "att":
        weights = masked_attention(logits, query_mask, key_mask)  # (..., n, m)
        transported = weights @ value  # (..., n, d)
    else:
        cost = cosine_cost(query, key)  # (..., n, m)
        weights = sinkhorn(cost, query_mask, key_mask, epsilon=epsilon, n_iters=n_iters)
        transported = barycentric_map(weights, value, query_mask)  # (..., n, d)
    return Assignment(transported, weights, logits if with_logits else None, query_mask, key_mask)


class CorrelationAssignment(nn.Module):
    """Multimodal CA of one direction (eqs 6-12), e.g. image -> text: query = text tokens.

    W_q, W_k, W_h map the ``input_width`` token features to ``dim`` (the paper's d = 96).
    """

    def __init__(self, query_width: int, key_width: int, dim: int):
        super().__init__()
        self.w_q = nn.Linear(query_width, dim, bias=False)
        self.w_k = nn.Linear(key_width, dim, bias=False)
        self.w_h = nn.Linear(key_width, dim, bias=False)

    def forward(
        self,
        query_tokens: torch.Tensor,
        query_mask: torch.Tensor,
        key_tokens: torch.Tensor,
        key_mask: torch.Tensor,
        method: str,
        epsilon: float = 0.05,
        n_iters: int = 3,
        with_logits: bool = False,
    ) -> Assignment:
        Q = self.w_q(query_tokens)  # (B, n, d)
        K = self.w_k(key_tokens)  # (B, m, d)
        H = self.w_h(key_tokens)  # (B, m, d)
        return assign(Q, K, H, query_mask, key_mask, method, epsilon, n_iters, with_logits)


class UnimodalProjection(nn.Module):
    """The projections of unimodal matching (eq. 19): Q = X_e W'_q, K = X_m W'_k, H = X_m W'_v.

    The encoder applies all three to every item (mentions and entities share the encoder),
    so an entity's ``query`` and a mention's ``key``/``value`` can be stored and matched later.
    """

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.w_q = nn.Linear(width, dim, bias=False)
        self.w_k = nn.Linear(width, dim, bias=False)
        self.w_v = nn.Linear(width, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w_q(tokens), self.w_k(tokens), self.w_v(tokens)  # each (B, L, d)
