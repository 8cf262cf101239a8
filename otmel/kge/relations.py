"""Relation transforms (OTKGE eq. 4: h_relation = r (x) h) and scores (eq. 5: f = d(h_relation, t)).

Every model scores one query (head, relation) against MANY tails at once: ``query`` turns
(head embedding, relation embedding) into a vector ``q`` and ``score`` compares ``q`` with
the candidate tails by a matrix product, so 1-N scoring against every entity costs one
(B, D) x (D, N) product.

* ComplEx (Trouillon et al. 2016): embeddings of D = 2k reals are k complex numbers
  [re | im]; f = Re(<h, r, conj(t)>) = <h * r, conj(t)>: ``q = h * r`` (complex product) and
  the score is the real inner product of q with [t_re | t_im].
* RotatE (Sun et al. 2019): r is a rotation (k phases); ``q = h * exp(i theta_r)``. The
  paper's distance is the sum of the k complex moduli |q_j - t_j|; we use the squared
  Euclidean distance ||q - t||^2 (the sum of the squared moduli), which a matrix product
  gives against every entity (the sum of moduli would need a (B, N, k) tensor). A departure
  in the distance, not in the transform.
* TransE (Bordes et al. 2013): ``q = h + r``, score ``-||q - t||^2`` (squared L2, for the
  same reason).

N3 (Lacroix et al. 2018): the weighted nuclear 3-norm regulariser, sum over the factors of a
triple of |x|^3 per (complex) coordinate.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODELS = ("complex", "rotate", "transe")


def relation_dim(model: str, dim: int) -> int:
    """Reals per relation embedding: RotatE stores one phase per complex coordinate."""
    return dim // 2 if model == "rotate" else dim


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    k = x.shape[-1] // 2
    return x[..., :k], x[..., k:]


def query(model: str, head: Tensor, rel: Tensor) -> Tensor:
    """(B, D) head, (B, Dr) relation -> (B, D) query vector."""
    if model == "complex":
        h_re, h_im = _halves(head)
        r_re, r_im = _halves(rel)
        return torch.cat([h_re * r_re - h_im * r_im, h_re * r_im + h_im * r_re], dim=-1)
    if model == "rotate":
        h_re, h_im = _halves(head)
        cos, sin = torch.cos(rel), torch.sin(rel)
        return torch.cat([h_re * cos - h_im * sin, h_re * sin + h_im * cos], dim=-1)
    if model == "transe":
        return head + rel
    raise ValueError(f"--model must be one of {MODELS}, got {model!r}")


def score(model: str, q: Tensor, tails: Tensor) -> Tensor:
    """(B, D) queries against (N, D) tails -> (B, N) scores (higher = more plausible)."""
    if model == "complex":
        return q @ tails.T
    # -||q - t||^2 = 2 q.t - ||q||^2 - ||t||^2
    return 2 * q @ tails.T - (q * q).sum(-1, keepdim=True) - (tails * tails).sum(-1)[None, :]


def score_pairs(model: str, q: Tensor, tails: Tensor) -> Tensor:
    """(B, D) queries against their own (B, K, D) candidate tails -> (B, K)."""
    if model == "complex":
        return torch.einsum("bd,bkd->bk", q, tails)
    return -((q[:, None, :] - tails) ** 2).sum(-1)


def n3(model: str, *factors: Tensor) -> Tensor:
    """Sum over factors of |x|^3 (complex modulus for ComplEx/RotatE coordinates), / batch."""
    total = 0.0
    for f in factors:
        if model in ("complex", "rotate") and f.shape[-1] % 2 == 0:
            re, im = _halves(f)
            total = total + torch.sqrt(re ** 2 + im ** 2 + 1e-12).pow(3).sum()
        else:
            total = total + f.abs().pow(3).sum()
    return total / factors[0].shape[0]
