"""Set pooling: softpool (OT-MEL eqs 13-17) and the release's attention pooling.

Both pool a set of d-dim elements ``x : (..., L, d)`` with a padding mask ``(..., L)``
(True = real element) into one ``(..., d)`` vector. Padded elements get zero weight; a set
with no real element pools to the zero vector (no NaN).
"""

from __future__ import annotations

import torch
from torch import nn

_NEG = -1e4  # finite "minus infinity": keeps softmax NaN-free when a whole set is padded


def softpool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softpool (eqs 13-14): ``sum_i w_i * g_i`` with ``w_i = exp(g_i) / sum_j exp(g_j)``.

    The softmax is element-wise, per feature dimension, over the set (a soft max-pool:
    each dimension is dominated by the elements that activate it most).

    Parameters
    ----------
    x : Tensor, shape (..., L, d)
    mask : BoolTensor, shape (..., L), optional. True = real element.

    Returns
    -------
    Tensor, shape (..., d)
    """
    if mask is None:
        return (torch.softmax(x, dim=-2) * x).sum(-2)
    m = mask.unsqueeze(-1)  # (..., L, 1)
    logits = x.masked_fill(~m, _NEG)
    w = torch.softmax(logits, dim=-2) * m.to(x.dtype)  # (..., L, d); all-padded -> 0
    return (w * x).sum(-2)


class AttentionPool(nn.Module):
    """The authors' release's pooling (offered as ``pooling = attnpool``).

    Departure from eq. 13-14 (which is an element-wise softmax over the set): the release
    scores each element with a linear map to one scalar, softmaxes the scores over the
    elements, takes the weighted sum and LayerNorms it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.score(x).squeeze(-1)  # (..., L)
        if mask is not None:
            scores = scores.masked_fill(~mask, _NEG)
        w = torch.softmax(scores, dim=-1)  # (..., L)
        if mask is not None:
            w = w * mask.to(x.dtype)
        pooled = (w.unsqueeze(-1) * x).sum(-2)  # (..., d)
        out = self.norm(pooled)
        if mask is not None:
            out = out * mask.any(-1, keepdim=True).to(x.dtype)  # empty set -> zero vector
        return out


class SoftPool(nn.Module):
    """Module wrapper of :func:`softpool` so both poolings plug in the same way."""

    def __init__(self, dim: int):
        super().__init__()
        del dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return softpool(x, mask)


def make_pool(kind: str, dim: int) -> nn.Module:
    if kind == "softpool":
        return SoftPool(dim)
    if kind == "attnpool":
        return AttentionPool(dim)
    raise ValueError(f"pooling must be 'softpool' or 'attnpool', got {kind!r}")
